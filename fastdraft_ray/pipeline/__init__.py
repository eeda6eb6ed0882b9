"""The whole FastDraft run as one job: prepare -> PT -> (CP) -> generate -> FT -> evaluate -> report.

``stages.py`` defines each stage (settings, inputs, outputs, how it runs), ``run.py`` drives them (skip, resume or
re-run from the records), ``report.py`` writes the final report. Entry point: ``jobs/pipeline.py``.
"""

"""Serving: the target + draft pair behind an OpenAI-compatible Ray Serve app (app.py), its decoder deployment
(decoder.py), wire format (schema.py) and live metrics (metrics.py)."""

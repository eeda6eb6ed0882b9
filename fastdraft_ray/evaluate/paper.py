"""The FastDraft paper's published numbers that our reports put side by side with a run's own.

One place for them, with where they come from. The paper's target is Phi-3-mini (3.8B); a run here uses whatever
target it is configured with (on CPU the embedded SmolLM2-135M-Instruct), so the comparison shows how far a draft
is from what the method reached at scale, not a like-for-like result.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PaperResult:
    """Published acceptance rates of one draft, per task family, under one decoding protocol."""

    label: str
    citation: str
    target: str
    draft: str
    gamma: int
    temperature: float
    acceptance_rate: dict[str, float] = field(default_factory=dict)


# Acceptance rate alpha of the ~50M-parameter Phi-3-mini draft after PT -> CP -> FT, at gamma = 3 and
# multinomial sampling with T = 0.6, on the four task families (CNN/DailyMail summarisation, TinyStories story
# continuation, Dolly instructions, HumanEval code completion).
FASTDRAFT_PHI3_50M_FT = PaperResult(
    label="paper: 50M draft after FT",
    citation="FastDraft (Zafrir et al., ACL 2025 Findings), arXiv 2411.11055, main results table, Phi-3-mini 50M FT",
    target="microsoft/Phi-3-mini-4k-instruct",
    draft="~50M params, PT -> CP -> FT",
    gamma=3,
    temperature=0.6,
    acceptance_rate={"summarization": 0.369, "story": 0.306, "instruction": 0.370, "code": 0.562},
)

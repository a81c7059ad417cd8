"""A2SF: H2O with a forgetting factor on accumulated attention.

Jo and Shin, "A2SF: Accumulative Attention Scoring with Forgetting Factor for
Token Pruning in Transformer Decoder" (2024, arXiv:2407.20485): H2O's sum of
attention favours old tokens, which have been attended by more queries. A2SF
weights the attention received from the query of step ``q`` by
``alpha ** (n - q)`` at step ``n``, so a token's score is
``sum_q alpha ** (n - q) * S_q``: recent attention counts more, and an old
token must keep being attended to stay. Everything else is H2O's rule, and
it is served as H2O is (``policies.h2o.PagedH2O``, ``"alpha"`` in the
eviction setting): a step of ``T`` queries multiplies the scores so far by
``alpha ** T`` before adding its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_kvcomp.policies.h2o import H2O


@dataclass(frozen=True)
class A2SF(H2O):
    """H2O's kept set with forgetting.

    alpha: forgetting factor in (0, 1]; 1 is H2O. The paper's best values for
        7B models are near 0.1-0.2 for few-shot prompts, higher for long ones.
    """

    alpha: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 < a <= 1.0:
            raise ValueError(f"A2SF alpha={a!r} must be in (0, 1]")

    @property
    def decay(self) -> float:
        return float(self.alpha)

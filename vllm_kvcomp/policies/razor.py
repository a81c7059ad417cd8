"""RazorAttention's data-free scoring of retrieval heads.

Tang et al., "RazorAttention: Efficient KV Cache Compression Through Retrieval
Heads", 2024. On a random token sequence repeated several times, a head that
looks a token up in the context shows it by attending, from a token in one
repeat, to the same token in the previous repeat (echo heads) or to the token
right after it (induction heads). Those heads must keep the whole context; the
others can keep a sink + recent window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from vllm_kvcomp.policies.attention import (
    attention_implementation,
    attention_probs,
    expand_kv,
    register,
    window_mask,
)

ATTENTION_NAME = "kvcomp_razor"


# Query rows scored at once: the explicit probabilities ([batch, heads, rows,
# k_len] float32, and the scores they come from) stay near 256 MiB each at any
# sequence length. Whole, an 8B model's 32 heads take 8 GiB a copy at 8K tokens
# and 32 GiB at 16K, a few copies at a time.
PROB_ELEMENTS = 1 << 26


def _echo_induction_sums(probs: torch.Tensor, period: int, start: int, first: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Echo and induction mass summed over the batch and the scored positions
    of ``probs``, whose rows are the query positions ``first, first + 1, ...``;
    -> ``([heads], [heads], positions summed)``."""
    t = probs.shape[-1]
    if not period <= start < t:
        raise ValueError(f"need period <= start < sequence length, got {period}, {start}, {t}")
    end = first + probs.shape[-2]
    i = torch.arange(min(max(start, first), end), end, device=probs.device)
    echo = probs[:, :, i - first, i - period].float().sum(dim=(0, 2))
    induction = probs[:, :, i - first, i - period + 1].float().sum(dim=(0, 2))
    return echo, induction, probs.shape[0] * len(i)


def echo_induction_scores(probs: torch.Tensor, period: int, start: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean echo and induction attention per query head, ``([heads], [heads])``.

    ``probs``: ``[batch, heads, T, T]`` attention probabilities over a sequence
    in which position ``i >= start`` holds the same token as ``i - period``.
    Echo: mass from ``i`` to ``i - period``; induction: mass to ``i - period + 1``,
    averaged over the positions ``i`` in ``[start, T)`` and the batch.
    """
    echo, induction, n = _echo_induction_sums(probs, period, start)
    return echo / n, induction / n


def per_kv_head(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[..., query_heads]`` -> ``[..., kv_heads]``: the most retrieving query
    head of a group decides, as the group shares one KV cache."""
    return scores.unflatten(-1, (num_kv_heads, -1)).amax(dim=-1)


class _Accumulator:
    """Collects per-layer echo / induction sums from the attention function."""

    def __init__(self, period: int, start: int):
        self.period, self.start = period, start
        self.echo: dict[int, torch.Tensor] = {}
        self.induction: dict[int, torch.Tensor] = {}
        self.count: dict[int, int] = {}

    def add(self, layer: int, probs: torch.Tensor, first: int) -> None:
        echo, induction, n = _echo_induction_sums(probs, self.period, self.start, first)
        self.echo[layer] = self.echo.get(layer, 0) + echo.cpu()
        self.induction[layer] = self.induction.get(layer, 0) + induction.cpu()
        self.count[layer] = self.count.get(layer, 0) + n

    def means(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.echo[layer] / self.count[layer], self.induction[layer] / self.count[layer]


def _scoring_attention(module, query, key, value, attention_mask, scaling, dropout=0.0,
                       kvcomp_razor: _Accumulator | None = None, **kwargs):
    # Full causal attention computed explicitly, so the probabilities can be
    # scored layer by layer instead of kept for every layer at once, and in
    # chunks of query rows, so no [T, T] matrix is held whole.
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    rows = max(1, PROB_ELEMENTS // (batch * heads * k_len))
    v = expand_kv(value, heads).to(torch.promote_types(query.dtype, torch.float32))
    out = []
    for r in range(0, q_len, rows):
        q = query[:, :, r:r + rows]
        first = k_len - q_len + r
        mask = window_mask(q.shape[2], k_len, device=query.device, first=first)
        probs = attention_probs(q, key, mask, scaling)
        if kvcomp_razor is not None:
            kvcomp_razor.add(module.layer_idx, probs, first)
        out.append(torch.matmul(probs, v).to(query.dtype))
        del probs  # before the next chunk's scores are allocated
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def register_attention() -> str:
    return register(ATTENTION_NAME, _scoring_attention)


def repeated_random_tokens(batch: int, period: int, repeats: int, vocab: int,
                           special: set[int], prefix: list[int], generator: torch.Generator
                           ) -> torch.Tensor:
    """``[batch, len(prefix) + period * repeats]``: ``prefix`` then a random run of
    ``period`` ordinary tokens repeated ``repeats`` times. Tokens within a run are
    distinct when the vocabulary allows, so each has one previous occurrence."""
    allowed = torch.tensor([t for t in range(vocab) if t not in special])
    rows = []
    for _ in range(batch):
        if len(allowed) >= period:
            run = allowed[torch.randperm(len(allowed), generator=generator)[:period]]
        else:
            run = allowed[torch.randint(len(allowed), (period,), generator=generator)]
        rows.append(torch.cat([torch.tensor(prefix, dtype=torch.long), run.repeat(repeats)]))
    return torch.stack(rows)


@dataclass
class RazorAttention:
    """Echo / induction scores per (layer, KV head) and gates from them.

    seq_len: tokens of repeated random text per sample (after the BOS token);
        the run length is ``seq_len // repeats``.
    repeats: how often the random run is repeated (>= 2).
    samples: random sequences scored (one forward pass each).
    echo_fraction / induction_fraction: the fractions of all (layer, KV head)
        entries with the highest echo / induction scores that are protected as
        retrieval heads (the paper: about 1 % echo and 14 % induction heads);
        a nonzero fraction protects at least one head.
    seed: of the random tokens.

    Gates: each score is divided by its maximum over all heads; a head's gate
    is half the larger of its two normalised scores, plus 0.5 when it is
    protected. Protected heads thus rank above all others, and among the rest
    the more echo- or induction-like heads rank higher.
    """

    seq_len: int = 1024
    repeats: int = 4
    samples: int = 4
    echo_fraction: float = 0.01
    induction_fraction: float = 0.14
    seed: int = 0

    def __post_init__(self):
        if self.repeats < 2:
            raise ValueError(f"repeats={self.repeats} must be >= 2")
        if self.seq_len // self.repeats < 2:
            raise ValueError(f"seq_len={self.seq_len} is too short for {self.repeats} repeats")
        for name in ("echo_fraction", "induction_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")

    @property
    def period(self) -> int:
        return self.seq_len // self.repeats

    @staticmethod
    def prefix_len(config) -> int:
        return int(config.bos_token_id is not None)

    def sample_ids(self, config, generator: torch.Generator) -> torch.Tensor:
        """``[1, T]``: BOS (when the model has one), then the repeated random run."""
        prefix = [config.bos_token_id] if config.bos_token_id is not None else []
        special = {t for t in (config.bos_token_id, config.eos_token_id,
                               getattr(config, "pad_token_id", None)) if isinstance(t, int)}
        return repeated_random_tokens(1, self.period, self.repeats, config.vocab_size,
                                      special, prefix, generator)

    def score(self, model, progress: Callable[[int], Any] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Echo and induction scores ``[layers, kv_heads]`` (float32, CPU)."""
        config = model.config
        generator = torch.Generator().manual_seed(self.seed)
        device = next(model.parameters()).device
        acc = _Accumulator(self.period, self.prefix_len(config) + self.period)
        with attention_implementation(model, register_attention()), torch.no_grad():
            for _ in range(self.samples):
                ids = self.sample_ids(config, generator)
                # the decoder only: the scores are taken inside it, and the LM
                # head's logits ([T, vocab]) would be memory spent on nothing
                model.base_model(input_ids=ids.to(device), use_cache=False, kvcomp_razor=acc)
                if progress:
                    progress(1)
        echo, induction = (torch.stack(s) for s in zip(*(acc.means(l) for l in sorted(acc.echo))))
        kv_heads = config.num_key_value_heads
        return per_kv_head(echo, kv_heads), per_kv_head(induction, kv_heads)

    def gates(self, echo: torch.Tensor, induction: torch.Tensor) -> torch.Tensor:
        n = echo.numel()
        protected = torch.zeros(n, dtype=torch.bool)
        for scores, fraction in ((echo, self.echo_fraction),
                                 (induction, self.induction_fraction)):
            top = math.ceil(fraction * n)
            if top:
                protected[torch.topk(scores.flatten(), top).indices] = True
        normed = [s / s.max() if s.max() > 0 else torch.zeros_like(s)
                  for s in (echo.float(), induction.float())]
        base = 0.5 * torch.maximum(*normed)
        return base + 0.5 * protected.view_as(base)

"""DuoAttention's optimisation of retrieval / streaming gates.

Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
and Streaming Heads", 2024. Every (layer, KV head) gets a gate g in [0, 1]; its
query heads output ``g * full + (1 - g) * streaming``, where streaming attention
sees only the first ``sink_tokens`` and the last ``recent_tokens`` tokens. With
the model's weights frozen, the gates are fitted so that the mixed model's
final hidden states match the full model's on the answer of a synthetic
multi-passkey retrieval prompt, while an L1 penalty pulls every gate towards
streaming: a gate stays high only where streaming attention would lose the
passkeys.
"""

from __future__ import annotations

import functools
import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from vllm_kvcomp.policies.attention import attend, attention_implementation, register, window_mask

ATTENTION_NAME = "kvcomp_duo"

_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
           "There and back again. ")


def mix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  gates: torch.Tensor | None, scaling: float, sink: int, recent: int
                  ) -> torch.Tensor:
    """``gates[kv_head] * full + (1 - gates) * streaming`` attention output,
    ``[batch, query_heads, q_len, head_dim]``; ``gates=None``: full attention."""
    q_len, k_len = query.shape[2], key.shape[2]
    full = attend(query, key, value, window_mask(q_len, k_len, device=query.device), scaling)
    if gates is None:
        return full
    stream = attend(query, key, value,
                    window_mask(q_len, k_len, sink, recent, device=query.device), scaling)
    # mixed in float32 at least: bf16 would round small gate changes away; as
    # stream + g * (full - stream), autograd keeps one float32 copy for the
    # gates' gradient instead of one of each output
    dtype = torch.promote_types(query.dtype, torch.float32)
    g = gates.to(dtype).repeat_interleave(query.shape[1] // gates.shape[0])[None, :, None, None]
    stream = stream.to(dtype)
    return (stream + g * (full.to(dtype) - stream)).to(query.dtype)


def _mixed_attention(module, query, key, value, attention_mask, scaling, dropout=0.0,
                     kvcomp_gates: torch.Tensor | None = None, kvcomp_sink: int = 0,
                     kvcomp_recent: int = 0, **kwargs):
    # The calibration feeds whole, unpadded sequences without a cache, so the
    # causal (and window) mask is built here and transformers' mask is unused.
    gates = None if kvcomp_gates is None else kvcomp_gates[module.layer_idx]
    out = mix_attention(query, key, value, gates, scaling, kvcomp_sink, kvcomp_recent)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    return register(ATTENTION_NAME, _mixed_attention)


def hidden_states(model, ids: torch.Tensor, gates: torch.Tensor | None = None,
                  sink: int = 0, recent: int = 0) -> torch.Tensor:
    """Final hidden states ``[batch, T, hidden]`` of ``model`` running under
    ``ATTENTION_NAME``, every KV head mixed by ``gates`` ``[layers, kv_heads]``
    (``None``: full attention)."""
    return model.base_model(input_ids=ids, use_cache=False, kvcomp_gates=gates,
                            kvcomp_sink=sink, kvcomp_recent=recent).last_hidden_state


@contextmanager
def checkpointed_layers(model):
    """Run ``model``'s decoder layers under activation checkpointing: each
    layer keeps only its input for the backward pass and recomputes the rest
    there. The gates' gradient must cross every layer above them, so without
    it a step holds every layer's activations at once (of the order of 0.4 GB
    a layer at 2048 tokens on an 8B model, growing with the sequence)."""
    from torch.utils.checkpoint import checkpoint

    layers = list(model.base_model.layers)
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward


def passkey_sample(tokenizer, seq_len: int, passkeys: int, rng: random.Random
                   ) -> tuple[list[int], int]:
    """Token ids of exactly ``seq_len`` tokens: filler text with ``passkeys``
    numbered passkeys at random depths, then a question and the answer listing
    them; returns ``(ids, answer_len)`` (the answer is the last ``answer_len``)."""
    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    keys = [str(rng.randrange(10 ** 5, 10 ** 6)) for _ in range(passkeys)]
    needles = [enc(f" The pass key {n + 1} is {k}. Remember it. {k} is the pass key {n + 1}.")
               for n, k in enumerate(keys)]
    question = enc(" What are the pass keys? The pass keys are")
    answer = enc(" " + ", ".join(keys) + ".")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    room = seq_len - len(bos) - sum(map(len, needles)) - len(question) - len(answer)
    if room < 0:
        raise ValueError(f"seq_len={seq_len} cannot hold {passkeys} passkey(s) and the "
                         f"answer ({seq_len - room} tokens); raise seq_len or lower passkeys")
    filler = enc(_FILLER)
    hay = (filler * (room // max(len(filler), 1) + 1))[:room]
    depths = sorted(rng.randint(0, room) for _ in needles)
    ids, at = list(bos), 0
    for depth, needle in zip(depths, needles):
        ids += hay[at:depth] + needle
        at = depth
    ids += hay[at:] + question + answer
    return ids, len(answer)


@dataclass
class DuoAttention:
    """Fits one gate per (layer, KV head).

    sink_tokens / recent_tokens: the streaming window the gates are fitted for
        (DuoAttention deploys 64 + 256).
    seq_len: tokens per synthetic sample; it must be well beyond sink + recent
        for the passkeys to fall outside the streaming window.
    passkeys: passkeys per sample.
    steps: Adam steps, one fresh sample each.
    lr: Adam's learning rate.
    reg_weight: lambda of the L1 penalty (mean |g| over all gates) added to the
        MSE between the mixed and the full model's final hidden states on the
        answer span.
    seed: of the samples.
    checkpoint_layers: recompute each decoder layer's activations in the
        backward pass instead of keeping them (``checkpointed_layers``): the
        activation memory of about one layer instead of all, for about one more
        forward pass a step; for long ``seq_len`` on large models.

    Gates start at 1 (all retrieval) and are clamped to [0, 1] after every step.
    """

    sink_tokens: int = 64
    recent_tokens: int = 256
    seq_len: int = 2048
    passkeys: int = 4
    steps: int = 300
    lr: float = 0.02
    reg_weight: float = 0.05
    seed: int = 0
    checkpoint_layers: bool = False

    def calibrate(self, model, tokenizer, progress: Callable[[int], Any] | None = None
                  ) -> tuple[torch.Tensor, list[float]]:
        """Fitted gates ``[layers, kv_heads]`` (float32, CPU) and the loss per step."""
        config = model.config
        device = next(model.parameters()).device
        gates = torch.ones(config.num_hidden_layers, config.num_key_value_heads,
                           device=device, requires_grad=True)
        optimizer = torch.optim.Adam([gates], lr=self.lr)
        rng = random.Random(self.seed)
        requires_grad = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)
        losses = []
        try:
            with attention_implementation(model, register_attention()), \
                    (checkpointed_layers(model) if self.checkpoint_layers else nullcontext()):
                for _ in range(self.steps):
                    ids, answer = passkey_sample(tokenizer, self.seq_len, self.passkeys, rng)
                    ids = torch.tensor([ids], device=device)
                    with torch.no_grad():
                        target = hidden_states(model, ids)[:, -answer:]
                    mixed = hidden_states(model, ids, gates, self.sink_tokens,
                                          self.recent_tokens)[:, -answer:]
                    loss = torch.nn.functional.mse_loss(mixed.float(), target.float()) + \
                        self.reg_weight * gates.abs().mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    with torch.no_grad():
                        gates.clamp_(0.0, 1.0)
                    losses.append(loss.item())
                    if progress:
                        progress(1)
        finally:
            for p, rg in zip(model.parameters(), requires_grad):
                p.requires_grad_(rg)
        return gates.detach().float().cpu(), losses

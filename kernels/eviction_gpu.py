"""Eviction on the GPU (Triton) path: the packed range a step does not read,
and SnapKV's selection beside the kernels.

Every eviction policy leaves a request's packed positions in one shape: kept
tokens below ``lo`` (StreamingLLM's sinks, SnapKV's and H2O's kept tokens
moved to the front by ``kernels/compaction.py``), nothing in ``[lo, hi)``
(``hi`` a page boundary: those pages are back in vLLM's pool, the rest of the
page holding ``lo`` is stale) and the tokens from ``hi`` on in place, up to
``Q(start)``. ``evicted_ranges`` gives ``[lo, hi)`` of each request's first
query as torch ops on the device, without a host sync, so a captured decode
graph computes it at every replay; the prefill and decode kernels run their
packed tiles over the stored ``[0, lo)`` and ``[hi, Q(start))`` only and mask
the rest of the tile holding ``lo``. Keys were cached after RoPE, so where a
kept token now sits changes nothing but what the kernels skip. Only
StreamingLLM's range grows along a prefill chunk (``hi`` follows each query's
recent window): the prefill kernel is given its ``recent_tokens`` for that.
``evicted_ranges_reference`` is the same from the policy objects, as the
reference path (``attention_ref.request_attention``) asks them.

SnapKV selects once, in the step whose chunk completes a prompt: the prefill
kernel attends that chunk over the whole cache, then ``snapkv_after_attention``
scores the observation window's queries with the reference's own torch ops
(``attention_ref.snapkv_window_probs``: those queries alone, over the keys
each of them read) and selects as the reference does; the compaction is the
Triton kernel ``triton_compaction.triton_compact``, which writes the bytes
``compaction.compact_kept`` writes. That step is a prefill, never inside a
captured graph, so its host loop costs no replay.

H2O / A2SF score every step by its own attention. A decode step's
probabilities come from the decode kernel itself (``probs``: each read
position's logit, normalised once the splits are merged), so scoring reads
the KV cache no second time; one Triton launch (``triton_scores``) sums them
over each KV head's query group and adds them to the in-page score slots, as
``h2o_ref.add_step_scores`` does (``add_decode_scores``: its torch-op
reference, served with ``KVCOMP_SCORE_KERNEL=0``). A prefill step's
probabilities are the reference's (``attention_ref.request_attention``, a
second pass over the request's cache, prefills only), computed for as many
of the chunk's queries at a time as fit ``SCORE_PIECE_BYTES``. The eviction
steps that follow are the reference's selection (``h2o_ref.evict_steps``:
one batch for all of a layer's evicting requests, the bytes
``h2o_ref.evict_step`` writes request by request, which
``KVCOMP_EVICTION_BATCH=0`` or ``KVCOMP_EVICTION_ROWS=0`` serve instead)
with the Triton compaction, decided from the host lists, so steps holding a
prompt's queries run eagerly (``selects_on_host``); the decode steps past
the prompts can be captured in CUDA graphs (``graph_eviction``: H2O's by
default, ``KVCOMP_EVICTION_GRAPHS`` 1 / 0 for every setting or none) as the
same steps in fixed-shape device work (``graph_after_attention``).
"""

from __future__ import annotations

import torch

from vllm_kvcomp.config import SCORED_EVICTION, KvcompConfig


def _q(cfg: KvcompConfig, n: torch.Tensor) -> torch.Tensor:
    """``cfg.quantized_prefix_len`` on a tensor of token counts."""
    a = cfg.key_token_align
    return torch.div((n - cfg.residual_tokens).clamp(min=0), a, rounding_mode="floor") * a


def _floor_to(x: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(x, b, rounding_mode="floor") * b


def evicted_ranges(cfg: KvcompConfig, block_size: int, seq_lens: torch.Tensor,
                   query_lens: torch.Tensor, prompt_lens: torch.Tensor | None) -> torch.Tensor:
    """``[B, 2]`` int32: packed positions ``[lo, hi)`` that the first query
    of each request's step (``start = seq_lens - query_lens``) does not read;
    ``(0, 0)`` where nothing is evicted (StreamingLLM: ``(lo, lo)``, module
    docstring)."""
    ev = cfg.eviction
    bs = block_size
    n = seq_lens.long()
    start = n - query_lens.long()
    zero = torch.zeros_like(n)
    if ev.method == "streamingllm":
        # lo stays the sinks' end even where nothing is dropped yet: a
        # prefill row's own range grows from there (evicted_recent)
        policy = ev.policy(bs)
        lo = torch.full_like(n, policy.sink_pages * bs)
        hi = torch.maximum(lo, _floor_to(torch.minimum(start + 1 - ev.recent_tokens,
                                                       _q(cfg, start)).clamp(min=0), bs))
        return torch.stack([lo, hi], dim=1).to(torch.int32)
    assert prompt_lens is not None, "SnapKV / H2O / A2SF need each request's prompt length"
    P = prompt_lens.long()
    if ev.method == "snapkv":
        policy = ev.policy(bs)
        qp = _q(cfg, P)
        hi = _floor_to(torch.minimum(P - policy.window, qp).clamp(min=0), bs)
        if policy.budget_tokens is not None:
            budget = torch.full_like(n, policy.budget_tokens)
        else:  # int(ratio * P): floor of the same double product
            budget = (P.double() * policy.budget_ratio).floor().long()
        lo = (budget - (torch.maximum(qp, hi) - hi)).clamp(min=0)
        planned = -torch.div(-lo, bs, rounding_mode="floor") < torch.div(
            hi, bs, rounding_mode="floor")
        hi = torch.where(planned & (start >= P), hi, zero)
    else:
        assert ev.method in SCORED_EVICTION
        lo, hi = scored_layout(cfg, ev.policy(bs), start, P)
    some = hi > lo
    return torch.stack([torch.where(some, lo, zero), torch.where(some, hi, zero)],
                       dim=1).to(torch.int32)


def scored_layout(cfg: KvcompConfig, policy, n: torch.Tensor,
                  P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``policy.layout`` (``policies.h2o.PagedH2O``: ``(K, E)`` after ``n``
    tokens of a request with prompt ``P``) on tensors of counts."""
    bs = policy.block_size
    e = _floor_to(torch.minimum(n - policy.rule.recent_tokens, _q(cfg, n)).clamp(min=0), bs)
    e = torch.where(n >= P, e, torch.zeros_like(e))
    return torch.minimum(torch.full_like(e, policy.heavy_tokens), e), e


def evicted_ranges_reference(cfg: KvcompConfig, block_size: int, seq_lens, query_lens,
                             prompt_lens) -> list[tuple[int, int]]:
    """``evicted_ranges`` from the policy objects, per request."""
    ev = cfg.eviction
    policy = ev.policy(block_size)
    out = []
    for i, (n, t) in enumerate(zip(seq_lens, query_lens)):
        start = n - t
        q0 = cfg.quantized_prefix_len(start)
        lo = hi = 0
        if ev.method == "streamingllm":
            out.append(policy.dropped(start + 1, q0))
            continue
        if ev.method == "snapkv":
            P = prompt_lens[i]
            plan = policy.plan(P, cfg.quantized_prefix_len(P))
            if plan is not None and start >= P:
                lo, hi = plan
        else:
            lo, hi = policy.layout(start, q0, prompt_lens[i])
        out.append((lo, hi) if hi > lo else (0, 0))
    return out


def selects_on_host(cfg: KvcompConfig) -> bool:
    """Whether the GPU path's eviction selects with host-side torch ops
    (SnapKV, H2O, A2SF): a step that does so runs eagerly, never replayed
    from a captured graph, which would skip the selection (a prompt's last
    chunk can be a one-token step inside a uniform decode batch); only
    ``graph_eviction``'s decode steps are captured, as device work."""
    return cfg.eviction is not None and cfg.eviction.method != "streamingllm"


def eviction_rows_config(cfg: KvcompConfig) -> KvcompConfig | None:
    """The config whose eviction rows (``host_rows``) the GPU builder gives
    each step: SnapKV / H2O / A2SF's, unless ``KVCOMP_EVICTION_ROWS=0``
    (``launch_env.EVICTION_ROWS_ENV``) has every layer walk every request."""
    from vllm_kvcomp.launch_env import EVICTION_ROWS_ENV, switch

    if not selects_on_host(cfg) or not switch(EVICTION_ROWS_ENV):
        return None
    return cfg


def step_evicts(cfg: KvcompConfig, md) -> bool:
    """Whether eviction takes part in a step. vLLM's GPU model runner builds
    its warm-up, profiling and CUDA-graph capture batches without prompt
    lengths (``rswa_prefix_lens`` None), while every scheduled step carries
    them: those dummy rows hold no request, so nothing is evicted, scored or
    selected for them. StreamingLLM needs no prompt length."""
    return cfg.eviction.method == "streamingllm" or md.prompt_lens is not None


def step_ranges(cfg: KvcompConfig, block_size: int, md) -> tuple[torch.Tensor, int]:
    """(``evicted_ranges`` of a step's batch, StreamingLLM's recent_tokens
    for the prefill rows' growing ranges, else 0) from its metadata
    (``backend.KvcompMetadata``); once a step where the metadata shares it
    across layers (``eviction_shared``)."""
    shared = md.eviction_shared
    if shared is not None and "ranges" in shared:
        return shared["ranges"]
    qsl = md.query_start_loc
    ranges = evicted_ranges(cfg, block_size, md.seq_lens, qsl[1:] - qsl[:-1], md.prompt_lens)
    ev = cfg.eviction
    got = ranges, ev.recent_tokens if ev.method == "streamingllm" else 0
    if shared is not None:
        shared["ranges"] = got
    return got


def host_rows(cfg: KvcompConfig, block_size: int, md) -> list[int]:
    """The rows of a step (``backend.KvcompMetadata`` with its host lists)
    whose host work after attention can do anything, once a step from the
    host lists: SnapKV's requests with observation-window queries in the
    step whose prompt plans an eviction; H2O / A2SF's requests whose layout
    moves in the step (an eviction step; their prefill rows, scored by the
    reference, are added where the step's decode rows are known). Every
    other row's host work is a no-op, so a layer need not walk it."""
    qsl, lens, prompts = md.query_start_loc_cpu, md.seq_lens_cpu, md.prompt_lens_cpu
    policy = cfg.eviction.policy(block_size)
    snap = cfg.eviction.method == "snapkv"
    rows = []
    for i in range(len(qsl) - 1):
        t = qsl[i + 1] - qsl[i]
        if t == 0:
            continue
        n, P = lens[i], prompts[i]
        start = n - t
        if snap:
            if start < P and n > P - policy.window and \
                    policy.plan(P, cfg.quantized_prefix_len(P)) is not None:
                rows.append(i)
        elif policy.layout(start, cfg.quantized_prefix_len(start), P) != \
                policy.layout(n, cfg.quantized_prefix_len(n), P):
            rows.append(i)
    return rows


def after_attention(query, key, value, out, packed_cache, residual_cache, layout,
                    cfg: KvcompConfig, scale: float, md, residual_block_table,
                    residual_block_size: int, decode_probs: torch.Tensor | None = None,
                    decode_lse: torch.Tensor | None = None) -> None:
    """What eviction does after a step's kernels ran (SnapKV's selection,
    H2O / A2SF's scores and eviction step); ``md``: the step's
    ``backend.KvcompMetadata`` with its host lists; ``decode_probs``: the
    decode kernel's ``probs`` of the step's leading decode rows
    (``decode_lse``: their log-sum-exps where they hold logits,
    ``scores_from_logits``)."""
    if cfg.eviction.method in SCORED_EVICTION:
        scored_after_attention(query, key, value, packed_cache, residual_cache, layout, cfg,
                               scale, md, residual_block_table, residual_block_size,
                               decode_probs, decode_lse)
    elif cfg.eviction.method == "snapkv":
        snapkv_after_attention(query, key, value, out, packed_cache, residual_cache, layout,
                               cfg, scale, md.block_table, residual_block_table,
                               residual_block_size, md.query_start_loc_cpu, md.seq_lens_cpu,
                               md.prompt_lens_cpu, cfg.prompt_as_stored, md.eviction_rows)


def snapkv_after_attention(query, key, value, out, packed_cache, residual_cache, layout,
                           cfg: KvcompConfig, scale: float, block_table, residual_block_table,
                           residual_block_size: int, query_start_loc: list[int],
                           seq_lens: list[int], prompt_lens: list[int],
                           as_stored: bool, rows: list[int] | None = None) -> None:
    """SnapKV's part of a step after the kernels ran (module docstring): for
    each request whose step holds observation-window queries (a one-token
    step too), the window's scores (summed over chunks as the reference
    does), and at the prompt's end the selection and compaction; queries of
    the step past the prompt (a recomputed request's generated tokens)
    attend the kept view again, as the decode steps that produced them did.
    Per-request host lists; tensors on the device, rows as in the batch;
    ``rows``: the only rows to look at (``host_rows``), else all."""
    from vllm_kvcomp.kernels import attention_ref as ar
    from vllm_kvcomp.kernels.triton_compaction import triton_compact

    policy = cfg.eviction.policy(layout.block_size)
    model_dtype = ar.step_model_dtype(cfg, residual_cache, query)
    for i in range(len(seq_lens)) if rows is None else rows:
        n = seq_lens[i]
        qs, qe = query_start_loc[i], query_start_loc[i + 1]
        P = prompt_lens[i]
        start = n - (qe - qs)
        if qe == qs or not (start < P and n > P - policy.window) or \
                policy.plan(P, cfg.quantized_prefix_len(P)) is None:
            continue
        row = block_table[i]
        res_row = residual_block_table[i] if residual_block_table is not None else None
        q_old = cfg.quantized_prefix_len(start)
        window = None
        if start > q_old:
            window = ar.gather_residual(residual_cache, res_row, residual_block_size, q_old,
                                        start)
        step = ar.RequestStep(query[qs:qe], key[qs:qe], value[qs:qe], packed_cache,
                              residual_cache, layout, cfg, row, res_row, residual_block_size,
                              start, scale, model_dtype, as_stored, window, P)
        rest = ar.snapkv_settle(ar.snapkv_window_probs(step), step, compact=triton_compact)
        if rest is not None:
            out[qe - rest.shape[0]: qe] = rest.to(out.dtype)


def scores_by_decode(cfg: KvcompConfig) -> bool:
    """Whether the decode kernel reports its probabilities (H2O / A2SF)."""
    return cfg.eviction is not None and cfg.eviction.method in SCORED_EVICTION


def scores_from_logits() -> bool:
    """Whether the decode kernel leaves those probabilities as base-2 logits
    and each row's log-sum-exp (``kvcomp_decode_attention``'s ``probs_lse``),
    which the score accumulation normalises as it reads them (its ``lse``):
    unless ``KVCOMP_SCORE_FROM_LOGITS=0`` (``launch_env.SCORE_FROM_LOGITS_ENV``).
    The eager and the captured steps read the same switch, so a captured
    step replays the eager step's arithmetic."""
    from vllm_kvcomp.launch_env import SCORE_FROM_LOGITS_ENV, switch

    return switch(SCORE_FROM_LOGITS_ENV)


def decode_read_width(cfg: KvcompConfig, block_size: int, md, nd: int) -> int:
    """The most positions any of a step's ``nd`` leading one-token rows
    reads (``add_decode_scores``' ``W``), from the host lists: the kept
    heavy hitters and recent tokens under eviction, far fewer than the
    longest sequence."""
    if nd == 0:
        return 1
    shared = md.eviction_shared
    if shared is not None and ("width", nd) in shared:
        return shared[("width", nd)]
    lens = torch.tensor(md.seq_lens_cpu[:nd])
    ev = evicted_ranges(cfg, block_size, lens, torch.ones_like(lens),
                        torch.tensor(md.prompt_lens_cpu[:nd]))
    width = max(1, int((lens - (ev[:, 1] - ev[:, 0])).max()))
    if shared is not None:
        shared[("width", nd)] = width
    return width


def add_decode_scores(probs: torch.Tensor, packed_cache: torch.Tensor, layout,
                      cfg: KvcompConfig, block_table: torch.Tensor, seq_lens: torch.Tensor,
                      evicted: torch.Tensor | None, lse: torch.Tensor | None = None) -> None:
    """``h2o_ref.add_step_scores`` for a batch of one-token steps, as torch
    ops on the device without a host sync: ``probs`` ``[B, Hq, W]`` (the
    decode kernel's: over the positions each request read, ``[0, seq_len)``
    less its ``evicted`` range, in order) summed over each KV head's query
    group and added to those positions' score slots, the request's own from
    nothing and the others first multiplied by ``alpha``. The writes add a difference
    (0 at every position not read), so block-table entries past a request's
    pages or into its freed ones, which may be any page by now, change
    nothing. The PyTorch reference of ``triton_scores.triton_add_decode_scores``
    (one launch, unless ``KVCOMP_SCORE_KERNEL=0``: ``score_adder``). ``lse``
    ``[B, Hq]``: ``probs`` holds base-2 logits, normalised here (the decode
    kernel's ``probs_lse``)."""
    from vllm_kvcomp.kernels.h2o_ref import score_view

    B, Hq, L = probs.shape
    if B == 0:
        return
    if lse is not None:
        probs = torch.exp2(probs - lse[:, :, None])
    H = packed_cache.shape[1]
    bs = layout.block_size
    dev = probs.device
    step = probs.view(B, H, Hq // H, L).sum(dim=2)
    t = torch.arange(L, device=dev)[None, :].expand(B, L)
    if evicted is not None:
        ev = evicted.long()
        t = torch.where(t >= ev[:, :1], t + (ev[:, 1:] - ev[:, :1]), t)
    n = seq_lens.long()[:, None]
    read = t < n
    page = torch.div(t, bs, rounding_mode="floor").clamp(max=block_table.shape[1] - 1)
    blk = block_table.long().gather(1, page)[:, None, :].expand(B, H, L)
    heads = torch.arange(H, device=dev)[None, :, None].expand(B, H, L)
    slot = (t % bs)[:, None, :].expand(B, H, L)
    sc = score_view(packed_cache, layout)
    old = sc[blk, heads, slot]
    decay = cfg.eviction.policy(bs).decay
    new = torch.where((t == n - 1)[:, None, :], step, old * decay + step)
    sc.index_put_((blk, heads, slot), torch.where(read[:, None, :], new - old, 0.0),
                  accumulate=True)


def score_adder():
    """The decode scores' accumulation a step runs: the Triton kernel
    (``triton_scores.triton_add_decode_scores``) unless ``KVCOMP_SCORE_KERNEL=0``
    (``launch_env.SCORE_KERNEL_ENV``) asks for ``add_decode_scores``' torch ops."""
    from vllm_kvcomp.launch_env import SCORE_KERNEL_ENV, switch

    if switch(SCORE_KERNEL_ENV):
        from vllm_kvcomp.kernels.triton_scores import triton_add_decode_scores

        return triton_add_decode_scores
    return add_decode_scores


def eviction_batch() -> bool:
    """Whether a layer's H2O / A2SF eviction steps run as one batch
    (``h2o_ref.evict_steps``, the same bytes as ``evict_step`` row by row)
    where the step has its eviction rows: unless ``KVCOMP_EVICTION_BATCH=0``
    (``launch_env.EVICTION_BATCH_ENV``)."""
    from vllm_kvcomp.launch_env import EVICTION_BATCH_ENV, switch

    return switch(EVICTION_BATCH_ENV)


def selector():
    """The batched eviction steps' selection and compaction: the Triton
    selection (``triton_select.triton_select_and_compact``, which sorts
    where a step has more candidates than it takes), or with
    ``KVCOMP_SELECT_KERNEL=0`` (``launch_env.SELECT_KERNEL_ENV``) its reference
    ``h2o_ref.select_and_compact`` (a stable sort)."""
    from vllm_kvcomp.launch_env import SELECT_KERNEL_ENV, switch

    if switch(SELECT_KERNEL_ENV):
        from vllm_kvcomp.kernels.triton_select import triton_select_and_compact

        return triton_select_and_compact
    from vllm_kvcomp.kernels.h2o_ref import select_and_compact

    return select_and_compact


# fp32 probabilities one piece of a prefill chunk's scoring may hold (its
# scores, probabilities and float64 sums are a few times that): a whole
# 8K-token chunk over 32K keys with 32 query heads would be 34 GB, outside
# what vLLM's profiling run set aside (dummy steps score nothing)
SCORE_PIECE_BYTES = 256 << 20


def score_row_pieces(num_queries: int, num_query_heads: int, num_keys: int,
                     piece_bytes: int | None = None) -> list[tuple[int, int]]:
    """Query rows ``[r0, r1)`` whose probabilities over ``num_keys`` keys
    fit ``piece_bytes`` (``SCORE_PIECE_BYTES``) each; one piece for the
    whole step where it fits."""
    cap = SCORE_PIECE_BYTES if piece_bytes is None else piece_bytes
    rows = max(1, cap // (4 * num_query_heads * max(num_keys, 1)))
    return [(r0, min(num_queries, r0 + rows)) for r0 in range(0, num_queries, rows)]


def scored_after_attention(query, key, value, packed_cache, residual_cache, layout,
                           cfg: KvcompConfig, scale: float, md, residual_block_table,
                           residual_block_size: int, decode_probs: torch.Tensor | None,
                           decode_lse: torch.Tensor | None = None) -> None:
    """H2O / A2SF's part of a step after the kernels ran (module docstring):
    the step's scores (its ``decode_probs`` rows from the decode kernel, the
    prefill rows' from the reference), then each request's eviction step
    where its layout moves."""
    from vllm_kvcomp.kernels import attention_ref as ar
    from vllm_kvcomp.kernels import h2o_ref
    from vllm_kvcomp.kernels.triton_compaction import triton_compact

    bs = layout.block_size
    qsl, lens, prompts = md.query_start_loc_cpu, md.seq_lens_cpu, md.prompt_lens_cpu
    nd = 0 if decode_probs is None else decode_probs.shape[0]
    if nd:
        # the step's ranges are row by row, so its leading decode rows' are theirs
        ranges = step_ranges(cfg, bs, md)[0][:nd]
        score_adder()(decode_probs, packed_cache, layout, cfg, md.block_table[:nd],
                      md.seq_lens[:nd], ranges, lse=decode_lse)
    model_dtype = ar.step_model_dtype(cfg, residual_cache, query)
    rows = range(len(qsl) - 1)
    if md.eviction_rows is not None:  # the rows whose layout moves, and the prefill rows
        rows = sorted(set(md.eviction_rows).union(range(nd, len(qsl) - 1)))
    # a row's eviction reads and writes its own pages alone, so all of them may follow
    # every row's scoring
    batch = [] if md.eviction_rows is not None and eviction_batch() else None
    for i in rows:
        n = lens[i]
        qs, qe = qsl[i], qsl[i + 1]
        if qe == qs:
            continue
        start, P, row = n - (qe - qs), prompts[i], md.block_table[i]
        if i >= nd:
            res_row = residual_block_table[i] if residual_block_table is not None else None
            q_old = cfg.quantized_prefix_len(start)
            window = None
            if start > q_old:
                window = ar.gather_residual(residual_cache, res_row, residual_block_size,
                                            q_old, start)
            T = qe - qs
            h2o_ref.begin_step_scores(packed_cache, layout, cfg, row, start, T, P)
            for r0, r1 in score_row_pieces(T, query.shape[1], n):
                probs = []
                ar.request_attention(query[qs:qs + r1], key[qs:qs + r1], value[qs:qs + r1],
                                     packed_cache, residual_cache, layout, cfg, row, res_row,
                                     residual_block_size, start, scale, model_dtype,
                                     cfg.prompt_as_stored, window, prompt_len=P,
                                     probs_out=probs, from_row=r0)
                h2o_ref.add_query_scores(packed_cache, layout, cfg, row, start, T, *probs[0],
                                         first_query=r0)
        if batch is not None:
            batch.append((i, start, n, P))
        else:
            h2o_ref.evict_step(packed_cache, layout, cfg, row, start, n, P, model_dtype,
                               compact=triton_compact, on_device=md.eviction_rows is not None)
    if batch:
        h2o_ref.evict_steps(packed_cache, layout, cfg, md.block_table, *zip(*batch),
                            model_dtype, select=selector())


# --------------------------------------------------------------------------
# decode steps inside CUDA graphs
# --------------------------------------------------------------------------


# captured by default (the others with the switch set to 1): the method whose captured
# engine has served on a GPU at vLLM's default settings to the eager engine's tokens (k4v4,
# bf16, head size 128: benchmarks/results/2026-12-05-h100-late-splits-w4-whole; W4 at the
# Llama-3.1-8B shape), the fixed-shape steps of every bit width, axis and group size having
# matched the eager ones on GPUs (tests/test_eviction_graphs.py); SnapKV, A2SF and a head
# map's split layer have not served captured
def captured_by_default(cfg: KvcompConfig) -> bool:
    return cfg.eviction.method == "h2o" and cfg.head_map is None


def graph_eviction(cfg: KvcompConfig, vllm_config, environ=None) -> bool:
    """Whether SnapKV / H2O / A2SF's decode steps are captured in CUDA graphs
    (``launch_env.EVICTION_GRAPHS_ENV``): a step whose every request is past
    its prompt needs no host decision (``graph_after_attention``), and a step
    that holds a prompt's queries (SnapKV's selection, a prompt's first
    eviction, its scores by the reference) is never a uniform decode batch
    (``patches/prompt_steps.py``), so it runs eagerly. Set to 1: always; to 0:
    never; unset: for ``captured_by_default``'s settings, where vLLM captures
    full decode graphs (not under ``enforce_eager``, ``-O0`` / ``-O1`` or a
    ``cudagraph_mode`` without full graphs: the fixed-shape steps would run
    uncaptured, every row's selection each step, where the host-side steps
    serve) and without micro-batching (``--enable-dbo`` / ``ubatch_size``:
    its micro-batches would share the captured steps' one prompt-length
    buffer, so start-up refuses it with the switch set to 1). ``environ``:
    where the switch is read (default: this process's environment)."""
    from vllm_kvcomp.launch_env import EVICTION_GRAPHS_ENV, switch, switch_named

    if not selects_on_host(cfg) or not switch(EVICTION_GRAPHS_ENV, environ):
        return False
    if switch_named(EVICTION_GRAPHS_ENV, environ):
        return True
    micro_batches = getattr(getattr(vllm_config, "parallel_config", None), "use_ubatching",
                            False)
    # settled before the platform hook and the builders read it (enforce_eager forces NONE)
    mode = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
    no_full_graphs = (getattr(getattr(vllm_config, "model_config", None), "enforce_eager", False)
                      or (mode is not None and not mode.has_full_cudagraphs()))
    return captured_by_default(cfg) and not micro_batches and not no_full_graphs


def decode_probs_width(cfg: KvcompConfig, block_size: int) -> int:
    """At least ``decode_read_width`` of any one-token step past its prompt
    under H2O / A2SF: the kept ``K <= budget - R`` heavy hitters, then the
    positions from ``E`` (a page boundary) up to the query's, which are at
    most ``R`` plus a page or the full-precision window plus a key group and
    a page (``policies.h2o.PagedH2O``). A captured decode step's ``probs``
    have this width whatever the batch holds."""
    ev = cfg.eviction
    return ev.budget_tokens + cfg.residual_tokens + cfg.key_token_align + block_size


def evict_decode_rows(packed_cache: torch.Tensor, layout, cfg: KvcompConfig,
                      block_table: torch.Tensor, seq_lens: torch.Tensor,
                      prompt_lens: torch.Tensor, select=None) -> None:
    """``h2o_ref.evict_step`` of every row of a batch of one-token steps
    (from ``seq_lens - 1`` to ``seq_lens`` tokens), the same bytes written,
    in shapes fixed by the config alone, without a host sync: each row's
    layouts on the device (``scored_layout``), then the selection and
    compaction (``selector``) over ``heavy + (align // bs + 1) * bs``
    candidates (a one-token step moves ``E`` by at most that much past
    ``K <= heavy``). A row whose
    layout stays, a padding row (``seq_lens`` 0) and a row whose step ends
    its prompt (never in a captured step: ``graph_eviction``) keep nothing
    and are left as they are. ``select``: given, it selects after the
    rows' steps are found by torch ops (as ``KVCOMP_DECODE_ROWS_KERNEL=0`` or
    ``KVCOMP_SELECT_KERNEL=0`` have it); by default the selection launch
    works them out itself (``triton_select.triton_select_decode_rows``)."""
    from vllm_kvcomp.kernels import triton_select
    from vllm_kvcomp.kernels.h2o_ref import decode_rows_candidates, moves_nothing
    from vllm_kvcomp.launch_env import DECODE_ROWS_KERNEL_ENV, SELECT_KERNEL_ENV, switch

    bs = layout.block_size
    C = decode_rows_candidates(cfg, bs)
    if select is None and switch(SELECT_KERNEL_ENV) and switch(DECODE_ROWS_KERNEL_ENV) \
            and C <= triton_select.MAX_CANDIDATES:
        return triton_select.triton_select_decode_rows(packed_cache, layout, cfg, block_table,
                                                       seq_lens, prompt_lens)
    policy = cfg.eviction.policy(bs)
    n, P = seq_lens.long(), prompt_lens.long()
    k0, e0 = scored_layout(cfg, policy, n - 1, P)
    k1, e1 = scored_layout(cfg, policy, n, P)
    count = k0 + (e1 - e0).clamp(min=0)
    steps = ~moves_nothing(k0, e0, k1, e1, count) & (n - 1 >= P) & (n > 0)
    zero = torch.zeros_like(n)
    (select or selector())(
        packed_cache, layout, block_table, k0[:, None], e0[:, None],
        torch.where(steps, count, zero)[:, None], torch.where(steps, k1, zero)[:, None],
        C, policy.heavy_tokens)


def graph_after_attention(packed_cache: torch.Tensor, layout, cfg: KvcompConfig, md,
                          ranges: torch.Tensor, decode_probs: torch.Tensor | None,
                          decode_lse: torch.Tensor | None = None) -> None:
    """What eviction does after a decode step whose every row is past its
    prompt (``md.graph_decode``), as device work of fixed shapes that a
    CUDA graph replays: H2O / A2SF's scores from ``decode_probs`` (logits
    with ``decode_lse``, ``scores_from_logits``) and their eviction steps
    (``evict_decode_rows``); SnapKV selected at the prompt's end and does
    nothing more."""
    if decode_probs is None:
        return
    B = decode_probs.shape[0]
    table, lens = md.block_table[:B], md.seq_lens[:B]
    score_adder()(decode_probs, packed_cache, layout, cfg, table, lens, ranges[:B],
                  lse=decode_lse)
    evict_decode_rows(packed_cache, layout, cfg, table, lens, md.prompt_lens[:B])

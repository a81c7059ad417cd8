"""Every Triton launch a vLLM engine issues through the KVCOMP backend, for one
setting and model shape: the backend's own launch code (``KvcompImpl._forward_triton``
and the start-up decode check) driven through the attention steps of an
engine's life, with kernel launches recorded instead of run.

The steps, as vLLM 0.26's GPU model runner makes them:

* start-up: ``check_decode_launch`` (the metadata builder's decode check);
* FULL CUDA-graph capture: one uniform decode batch per capture size
  (``seq_lens`` 1, ``max_seq_len`` = ``max_model_len`` from
  ``build_for_cudagraph_capture``) over the default capture sizes;
* eager decode batches: larger than the largest capture size, and at every
  context length with ``enforce_eager`` (the decode split count follows the
  batch and the longest context);
* prefill: chunks of ``max_num_batched_tokens`` (first, middle, last), short
  prompts of every power-of-two length, several prompts in one step, and
  mixed steps (decodes first, then prefill chunks);

each with the store's hand-over unsplit (the default) and split
(``KVCOMP_STORE_SPLIT``), and the prefill with ``fresh_prefill`` "triton" and
"flash_attn" (the Triton pass over the compressed context that FlashAttention's
fresh part is merged with) and with ``prompt_attention`` "as_stored"; under an
eviction that selects (SnapKV, H2O, A2SF), its compaction of a request's pages.
Tensors are CPU stand-ins with the engine's shapes, strides and dtypes; nothing runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from unittest import mock

import torch

# vLLM 0.26's defaults on an 80+ GB GPU for the LLM class (16384 / 1024) and the
# API server (8192): the largest capture size is min(2 * max_num_seqs, 512)
MAX_NUM_BATCHED_TOKENS = (16384, 8192)
MAX_NUM_SEQS = 1024
CAPTURE_SIZES = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, 513, 16))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Setting:
    """A kvcomp setting on a model shape (``rep`` query heads per KV head)."""

    kvcomp: tuple  # sorted (key, value) pairs of the kvcomp settings
    head_size: int
    dtype: str
    rep: int = 4
    max_model_len: int = 131072

    @property
    def id(self) -> str:
        kv = "-".join(f"{k}{v}" for k, v in self.kvcomp) or "default"
        return f"{kv}-d{self.head_size}-{self.dtype}-rep{self.rep}"


def setting(head_size=128, dtype="bf16", rep=4, **kvcomp) -> Setting:
    return Setting(tuple(sorted(kvcomp.items())), head_size, dtype, rep)


# The settings the engine is checked on: each bit width, window and key group of
# the supported set at least once, each head size and dtype at least once.
ENGINE_SETTINGS = [
    # the default: k4v4, 64-token key groups, one value group a head, the window a
    # ring of 0..63 tokens (k2v2's default below: a ring of 160..287 e4m3 tokens)
    setting(),
    setting(dtype="fp16"),
    setting(head_size=64),
    setting(head_size=256),
    setting(rep=1),
    setting(rep=8, dtype="fp16"),
    setting(residual_tokens=128),
    setting(residual_tokens=32),
    setting(head_size=256, dtype="fp16", residual_tokens=128),
    setting(k_bits=2, v_bits=2),
    setting(k_bits=2, v_bits=2, head_size=256, dtype="fp16"),
    setting(k_bits=8, v_bits=8),
    setting(k_bits=8, v_bits=8, head_size=64, dtype="fp16"),
    setting(k_bits=4, v_bits=2, group_size=32),
    setting(k_bits=4, v_bits=2, group_size=32, residual_tokens=32, head_size=64, dtype="fp16"),
    setting(k_bits=2, v_bits=2, group_size=32, value_group_size=128),
    setting(k_bits=2, v_bits=2, key_axis="token", head_size=64),
    setting(k_bits=16, v_bits=16),
]
# Opt-in GPU paths checked beside them (not on the default path, so not in
# benchmarks/results/gpu_verified.json): Quest's selection and sparse decode,
# the value being its budget_tokens; a head map's split
# layer, the value being the share of KV heads that
# stream (the rest through the packed kernels), at the default sinks and window;
# the window held as a ring (residual_ring: its residual write after the attention);
# the window in float8 e4m3 (residual_dtype), by position and as a ring;
# eviction, the value being its method at a 2048-token
# budget (the kernels skipping each request's evicted range), alone, on
# the retrieval heads of a split layer and (SnapKV) under Quest; other windows
# in e4m3 at the capacity bar (key groups, value groups and the window's
# length are the kernels' constants).
OPT_IN_SETTINGS = [
    setting(quest=2048),
    setting(quest=512, k_bits=2, v_bits=2, head_size=64, dtype="fp16", rep=8),
    setting(head_split=0.5),
    setting(head_split=0.5, head_size=64, dtype="fp16", rep=8),
    setting(residual_ring=True),  # 128-token groups, a 0..127-token ring
    setting(residual_ring=True, k_bits=2, v_bits=2, head_size=64, dtype="fp16", rep=8),
    setting(residual_dtype="fp8_e4m3", residual_tokens=128),
    setting(residual_ring=True, residual_dtype="fp8_e4m3", k_bits=2, v_bits=2, head_size=64,
            dtype="fp16", rep=8),
    setting(residual_ring=True, residual_dtype="fp8_e4m3", group_size=64, value_group_size=128,
            residual_tokens=64),
    setting(residual_ring=True, residual_dtype="fp8_e4m3", k_bits=2, v_bits=2,
            residual_tokens=224, head_size=64, dtype="fp16", rep=8),
    setting(eviction="snapkv"),
    setting(eviction="streamingllm", k_bits=2, v_bits=2, head_size=64, dtype="fp16", rep=8),
    # eager decode steps (KVCOMP_EVICTION_GRAPHS=0, or a setting not captured by default)
    setting(eviction="h2o"),
    setting(eviction="h2o", head_split=0.5),
    setting(eviction="snapkv", quest=512),
    # H2O's decode steps captured (its default): the probabilities at their
    # fixed width, the scores, every row's selection and compaction in each captured batch,
    # the rows' steps worked out in the selection launch (KVCOMP_DECODE_ROWS_KERNEL);
    # "torch_rows": found by torch ops, the selection launch given them
    setting(eviction="h2o", graphs=True),
    setting(eviction="h2o", graphs="torch_rows"),
    setting(head_split=0.5, residual_ring=True, residual_dtype="fp8_e4m3",
            residual_tokens=128),
]


def _steps(max_model_len: int, max_num_batched_tokens: int) -> list[tuple[str, list]]:
    """(name, [(context tokens before the step, tokens in the step) per request]):
    decodes first, as the backend's builder orders a batch."""
    L, C = max_model_len, max_num_batched_tokens
    steps = []
    lens = sorted({2 ** i for i in range(int.bit_length(L))} | {L - 1, 127, 255, 4095})
    for n in lens:  # eager decode batches of every split count
        for b in (1, 8, 64, 512, MAX_NUM_SEQS):
            steps.append((f"decode b{b} ctx{n}", [(min(n, L - 1), 1)] * b))
    steps.append(("prefill first chunk", [(0, C)]))
    steps.append(("prefill middle chunk", [(C, C)]))
    steps.append(("prefill last chunk", [(L - 1000, 1000)]))
    for i in range(int.bit_length(C)):
        steps.append((f"prompt {2 ** i}", [(0, 2 ** i)]))
    steps.append(("several prompts", [(0, 300), (0, 1), (0, 4000)]))
    steps.append(("mixed", [(700, 1)] * 30 + [(0, C - 30 - 5000), (4000, 5000)]))
    steps.append(("mixed one decode", [(129, 1), (256, 2000)]))
    return steps


class _Grab:
    """Stands in for a JIT kernel: ``kernel[grid](*args)`` hands the call to
    ``on_launch`` (which may raise, e.g. Triton's OutOfResources, as a launch
    on the GPU would) and records it."""

    def __init__(self, jit, calls, on_launch):
        self.jit, self.calls, self.on_launch = jit, calls, on_launch

    def __getitem__(self, grid):
        def launch(*args, **kw):
            if self.on_launch is not None:
                self.on_launch(self.jit, args, kw)
            self.calls.append((self.jit, args, kw))
        return launch


@contextlib.contextmanager
def recorded_launches(*modules, on_launch=None):
    """Within: every JIT kernel of these modules records its launches instead
    of running, and the launchers take their GPU branches (not interpreted)."""
    from triton.runtime.jit import JITFunction

    calls, saved = [], []
    for m in modules:
        for name, obj in list(vars(m).items()):
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                saved.append((m, name, obj))
                setattr(m, name, _Grab(obj, calls, on_launch))
        if hasattr(m, "interpreted"):
            saved.append((m, "interpreted", m.interpreted))
            m.interpreted = lambda: False
    try:
        yield calls
    finally:
        for m, name, obj in saved:
            setattr(m, name, obj)


def _residual_view(spec, num_blocks: int) -> torch.Tensor:
    """The residual group's tensor as vLLM hands it over: a view in its dtype of
    pages padded to the packed page size."""
    es = spec.dtype.itemsize
    page = spec.page_size_bytes // es
    shape = (num_blocks, 2, spec.num_kv_heads, spec.block_size, spec.head_size)
    raw = torch.zeros(num_blocks * page, dtype=spec.dtype)
    inner = shape[1] * shape[2] * shape[3] * shape[4]
    return raw.view(num_blocks, page)[:, :inner].view(shape)


def _impl(s: Setting, cfg, flash_attn: bool):
    from vllm_kvcomp import backend

    with mock.patch.object(backend, "current_config", lambda: cfg):
        impl = backend.KvcompImpl(num_heads=2 * s.rep, head_size=s.head_size,
                                  scale=s.head_size ** -0.5, num_kv_heads=2)
    if flash_attn:
        # fresh_prefill="flash_attn": vLLM's FlashAttention runs outside Triton,
        # so stand-ins of its two calls; the Triton context pass is what counts
        def fa(q, **kw):
            return torch.empty_like(q), torch.empty(q.shape[1], q.shape[0])
        impl._flash_attn = (fa, 3, lambda *a: None)
    return impl


def engine_launches(s: Setting, on_launch=None, max_model_len: int | None = None) -> list:
    """[(jit, args, kwargs, default)] of every launch the engine's steps issue
    for ``s``; ``default`` is False for the opt-in paths (split store,
    FlashAttention prefill). ``on_launch(jit, args, kwargs, default)`` sees
    each as it is issued."""
    from vllm_kvcomp import backend
    from vllm_kvcomp.config import KvcompConfig
    from vllm_kvcomp.backend import KvcompBackend, KvcompMetadata
    from vllm_kvcomp.kernels import decode_launch, triton_decode, triton_prefill, triton_store
    from vllm_kvcomp.residual_layer import packed_spec, residual_spec

    from vllm_kvcomp.config import QuestConfig
    from vllm_kvcomp.kernels import triton_compaction, triton_quest, triton_stream
    from vllm_kvcomp.stream_layer import stream_spec

    L = max_model_len or s.max_model_len
    kvcomp = dict(s.kvcomp)
    budget = kvcomp.pop("quest", None)
    streaming_share = kvcomp.pop("head_split", None)
    method = kvcomp.pop("eviction", None)
    graphs = kvcomp.pop("graphs", False)
    cfg = KvcompConfig(**kvcomp)
    if method is not None:
        from vllm_kvcomp.config import EvictionConfig

        ev = {"method": method} if method == "streamingllm" else \
            {"method": method, "budget_tokens": 2048}
        cfg = dataclasses.replace(cfg, eviction=EvictionConfig.from_dict(ev))
    if budget is not None:
        cfg = dataclasses.replace(cfg, quest=QuestConfig(budget, dense_layers=0))
    dtype = DTYPES[s.dtype]
    H, D, Hq = 2, s.head_size, 2 * s.rep
    # (retrieval, streaming) KV heads of a split layer; the packed pages and
    # the window hold the retrieval heads only
    head_split = None
    if streaming_share is not None:
        ns = round(H * streaming_share)
        head_split = (list(range(ns, H)), list(range(ns)))
    H_packed = len(head_split[0]) if head_split else H
    with mock.patch("vllm_kvcomp.backend.current_config", lambda: cfg):
        bs = KvcompBackend.get_preferred_block_size(16)
    quest = cfg.quest.policy(bs) if cfg.quest is not None else None
    pspec = packed_spec(cfg, bs, H_packed, D, dtype)
    rspec = residual_spec(pspec, concurrent_steps=2)
    layout = pspec.layout
    nb = 64
    packed = torch.zeros(nb, H_packed, layout.head_page_bytes, dtype=torch.uint8)
    residual = _residual_view(rspec, nb) if cfg.needs_residual_cache else None
    max_reqs = MAX_NUM_SEQS
    block_table = torch.zeros(max_reqs, -(-L // bs), dtype=torch.int32)
    res_table = torch.zeros(max_reqs, -(-L // rspec.block_size), dtype=torch.int32)
    if head_split:
        sspec = stream_spec(cfg, pspec, len(head_split[1]), concurrent_steps=2)
        stream = _residual_view(sspec, nb)
        stream_table = torch.zeros(max_reqs, -(-L // sspec.block_size), dtype=torch.int32)

    def forward(impl, reqs, max_seq_len=None):
        qlens = [q for _, q in reqs]
        T, B = sum(qlens), len(reqs)
        qsl = torch.zeros(max_reqs + 1, dtype=torch.int32)
        qsl[1:B + 1] = torch.tensor(qlens).cumsum(0)
        seq_lens = torch.tensor([c + q for c, q in reqs], dtype=torch.int32)
        nd = sum(1 for q in qlens if q == 1) if max(qlens) > 1 else B
        md = KvcompMetadata(num_actual_tokens=T, num_reqs=B, query_start_loc=qsl[:B + 1],
                            seq_lens=seq_lens, block_table=block_table[:B],
                            slot_mapping=torch.zeros(T, dtype=torch.int64), block_size=bs,
                            max_query_len=max(qlens),
                            max_seq_len=max_seq_len or int(seq_lens.max()), num_decodes=nd)
        if cfg.eviction is not None:
            # SnapKV / StreamingLLM: prompts longer than any step, the kernels
            # take the evicted ranges; H2O: one-token prompts, so its decode
            # steps read what a long generation keeps (the scores' width).
            # The selection beside them (host-side torch ops) launches no kernel.
            P = 1 if cfg.eviction.method == "h2o" else 1 << 30
            md.prompt_lens = torch.full((B,), P, dtype=torch.int32)
            md.query_start_loc_cpu = qsl[:B + 1].tolist()
            md.seq_lens_cpu = seq_lens.tolist()
            md.prompt_lens_cpu = md.prompt_lens.tolist()
            md.graph_decode = graphs and max(qlens) == 1
        res_md = None
        if residual is not None:
            res_md = KvcompMetadata(num_actual_tokens=T, num_reqs=B, query_start_loc=qsl[:B + 1],
                                    seq_lens=seq_lens, block_table=res_table[:B],
                                    slot_mapping=torch.zeros(T, dtype=torch.int64),
                                    block_size=rspec.block_size, max_query_len=max(qlens),
                                    max_seq_len=md.max_seq_len, num_decodes=nd)
        # q, k, v as slices of one qkv projection, as the model hands them over
        qkv = torch.empty(T, (Hq + 2 * H) * D, dtype=dtype)
        q, k, v = qkv.split([Hq * D, H * D, H * D], dim=-1)
        out = torch.empty(T, Hq * D, dtype=dtype)
        lay = backend._layout(impl.config, bs, D, dtype.itemsize)
        if head_split:
            stream_md = KvcompMetadata(
                num_actual_tokens=T, num_reqs=B, query_start_loc=qsl[:B + 1],
                seq_lens=seq_lens, block_table=stream_table[:B],
                slot_mapping=torch.zeros(T, dtype=torch.int64), block_size=sspec.block_size,
                max_query_len=max(qlens), max_seq_len=md.max_seq_len, num_decodes=nd)
            impl.head_split = head_split
            impl._forward_triton_split(q, k, v, out, packed, residual, md, res_md, lay, quest,
                                       stream, stream_md)
        else:
            impl._forward_triton(q, k, v, out, packed, residual, md, res_md, lay, quest)

    from vllm_kvcomp.kernels import triton_scores, triton_select
    from vllm_kvcomp.launch_env import DECODE_ROWS_KERNEL_ENV

    mods = (triton_decode, triton_prefill, triton_store, triton_quest, triton_stream,
            triton_compaction, triton_scores, triton_select)
    # an opt-in setting's launches are all off the default path
    opt_in_path = s not in ENGINE_SETTINGS
    calls, default = [], [not opt_in_path]

    def seen(jit, args, kw):
        if on_launch is not None:
            on_launch(jit, args, kw, default[0])
        calls.append((jit, args, kw, default[0]))

    from vllm_kvcomp.kernels import eviction_gpu

    with recorded_launches(*mods, on_launch=seen), \
            mock.patch.object(eviction_gpu, "after_attention", lambda *a, **k: None), \
            mock.patch.dict(os.environ,
                            {DECODE_ROWS_KERNEL_ENV: "0"} if graphs == "torch_rows" else {}):
        impl = _impl(s, cfg, flash_attn=False)
        try:  # the builder's start-up check: its outputs are garbage here, so it raises
            decode_launch.check_decode_launch(cfg, bs, D, dtype, s.rep, torch.device("cpu"),
                                              check_on_cpu=True)
        except RuntimeError:
            pass
        impl._decode_launch = dict(decode_launch.DECODE_LAUNCH)
        for split in (False, True):
            default[0] = not split and not opt_in_path
            with mock.patch.object(triton_store, "_SPLIT_DEFAULT", split):
                for b in CAPTURE_SIZES:
                    forward(impl, [(0, 1)] * b, max_seq_len=L)
                for C in MAX_NUM_BATCHED_TOKENS:
                    for _, reqs in _steps(L, C):
                        forward(impl, reqs)
        default[0] = False
        fa = _impl(s, cfg, flash_attn=True)
        stored = _impl(s, dataclasses.replace(cfg, prompt_attention="as_stored"),
                       flash_attn=False)
        for opt_in in (fa, stored):
            opt_in._decode_launch = impl._decode_launch
            for C in MAX_NUM_BATCHED_TOKENS:
                for _, reqs in _steps(L, C):
                    if max(q for _, q in reqs) > 1:
                        forward(opt_in, reqs)
        if cfg.eviction is not None and eviction_gpu.selects_on_host(cfg):
            # the compaction after a selection (after_attention's, stood in for
            # above) of a 2048-token budget's kept tokens, and of a count no
            # multiple of 16 (Triton specializes the count on that)
            for n_kept in (2048, 2047):
                kept = torch.arange(n_kept).expand(H_packed, n_kept).contiguous()
                triton_compaction.triton_compact(packed, layout, block_table[1], kept, dtype)
    return calls

"""Eviction's decode steps in CUDA graphs (``KVCOMP_EVICTION_GRAPHS``), under
the interpreter: the fixed-shape eviction step of a batch of one-token rows
(``eviction_gpu.evict_decode_rows``) leaves, byte for byte, the cache that
``h2o_ref.evict_step`` leaves row by row; the captured step's ``probs`` width
holds every read; the backend's Triton steps with their decode steps taken
that way give the eager steps' outputs bit for bit; the builder's persistent
prompt lengths; and the runner hook that keeps a prompt's one-token step out
of a captured graph."""
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_eviction_batch import CASES, IDS, _config
from test_eviction_gpu import SCORED_CASES, STEP_CASES, _inputs, _run
from test_triton_compaction import random_pages

from vllm_kvcomp.backend import PADDING_PROMPT_LEN
from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels import eviction_gpu, h2o_ref
from vllm_kvcomp.kernels.eviction_gpu import (
    decode_probs_width,
    evict_decode_rows,
    evicted_ranges,
    graph_eviction,
    scored_layout,
)
from vllm_kvcomp.kernels.h2o_ref import score_view
from vllm_kvcomp.kernels.triton_compaction import triton_compact
from vllm_kvcomp.launch_env import (DECODE_ROWS_KERNEL_ENV, EVICTION_GRAPHS_ENV,
                                    SCORE_FROM_LOGITS_ENV, SELECT_KERNEL_ENV)
from vllm_kvcomp.layout import PageLayout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _moves(cfg, policy, start, n, P):
    return h2o_ref._eviction_layouts(cfg, policy, start, n, P) is not None


def _decode_rows(cfg, bs):
    """(start, n, prompt) of one-token rows past their prompts: every
    moving step of two prompts' first decodes (the first eviction after the
    prompt's, the window's key group handed over, a page crossed) and some
    that move nothing."""
    policy = cfg.eviction.policy(bs)
    rows = []
    for P in (bs + 1, 3 * bs + 5):
        span = [(n - 1, n, P) for n in range(P + 1, P + 5 * bs)]
        moving = [s for s in span if _moves(cfg, policy, *s)]
        still = [s for s in span if not _moves(cfg, policy, *s)]
        rows += moving[:4] + still[:: max(1, len(still) // 2)][:2]
    return rows


@pytest.mark.parametrize("select_kernel,rows_kernel", [("0", "0"), ("1", "0"), ("1", "1")],
                         ids=["sort", "kernel", "rows-in-kernel"])
@pytest.mark.parametrize("bits,axis,G,bs,H,method", CASES, ids=IDS)
def test_fixed_shape_step_is_the_per_row_steps(monkeypatch, bits, axis, G, bs, H, method,
                                               select_kernel, rows_kernel):
    """``evict_decode_rows`` over a batch of decodes (some moving, some not),
    a padding row (no tokens), a row whose step ends its prompt and one
    inside its prompt: byte for byte the cache ``evict_step`` leaves for the
    decodes; the other rows' pages, and pages of no row, untouched. The rows'
    steps worked out by torch ops and selected by the sort or the launch, or
    worked out inside the launch (``KVCOMP_DECODE_ROWS_KERNEL``)."""
    monkeypatch.setenv(DECODE_ROWS_KERNEL_ENV, rows_kernel)
    monkeypatch.setenv(SELECT_KERNEL_ENV, select_kernel)
    if rows_kernel == "1":  # the launch is what runs
        from vllm_kvcomp.kernels import triton_select

        real, calls = triton_select.triton_select_decode_rows, []
        monkeypatch.setattr(triton_select, "triton_select_decode_rows",
                            lambda *a: calls.append(1) or real(*a))
    cfg = _config(bits, axis, G, bs, method)
    policy = cfg.eviction.policy(bs)
    layout = PageLayout(cfg, bs, 64, 2)
    decodes = _decode_rows(cfg, bs)
    assert sum(_moves(cfg, policy, *s) for s in decodes) >= 4
    assert any(not _moves(cfg, policy, *s) for s in decodes)
    prompt_end, inside = (4 * bs + 2, 4 * bs + 3, 4 * bs + 3), (bs, bs + 1, 3 * bs)
    assert _moves(cfg, policy, *prompt_end)  # eager: it would compact, so must be skipped
    rows = decodes + [prompt_end, inside]
    pages = -(-max(n for _, n, _ in rows) // bs) + 1
    R = len(rows) + 1  # the padding row last, its table row zeros
    ids = list(range(1, (R - 1) * pages + 3))
    random.Random(bs + H).shuffle(ids)
    table = torch.zeros(R, pages, dtype=torch.int32)
    table[: R - 1] = torch.tensor(ids[: (R - 1) * pages], dtype=torch.int32).view(R - 1, pages)
    cache = random_pages(layout, H, len(ids) + 1, bs + H)
    g = torch.Generator().manual_seed(H)
    sv = score_view(cache, layout)
    sv.copy_(torch.randint(0, 3, sv.shape, generator=g).float())  # ties everywhere

    want = cache.clone().to(DEVICE)
    dev_table = table.to(DEVICE)
    for r, (start, n, P) in enumerate(decodes):
        h2o_ref.evict_step(want, layout, cfg, dev_table[r], start, n, P, torch.bfloat16,
                           compact=triton_compact, on_device=True)
    got = cache.clone().to(DEVICE)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([n for _, n, _ in rows] + [0], **i32)
    prompts = torch.tensor([P for _, _, P in rows] + [0], **i32)
    evict_decode_rows(got, layout, cfg, dev_table, seq_lens, prompts)
    assert rows_kernel == "0" or calls
    got, want = got.cpu(), want.cpu()
    assert not torch.equal(want, cache)
    bad = (got != want).nonzero()
    assert bad.shape[0] == 0, f"{bad.shape[0]} bytes differ, first {bad[:4].tolist()}"
    left = table[len(decodes):].flatten().long()
    assert torch.equal(got[left], cache[left])


@pytest.mark.parametrize("kvcomp", [
    {"eviction": {"method": "h2o", "budget_tokens": 64}},
    {"eviction": {"method": "h2o", "budget_tokens": 40, "recent_tokens": 36},
     "residual_tokens": 100, "group_size": 64},
    {"eviction": {"method": "a2sf", "budget_tokens": 48, "recent_tokens": 20, "alpha": 0.5},
     "residual_tokens": 16, "k_bits": 2, "v_bits": 2, "key_axis": "token"},
    {"eviction": {"method": "a2sf", "budget_tokens": 300, "recent_tokens": 3},
     "residual_tokens": 0, "k_bits": 16, "v_bits": 16},
], ids=["h2o", "h2o-long-window", "a2sf-token", "a2sf-no-window"])
@pytest.mark.parametrize("bs", [16, 32])
def test_probs_width_holds_every_decode_read(kvcomp, bs):
    """Every one-token step past its prompt reads at most
    ``decode_probs_width`` positions (the layout of its start, as the decode
    kernel walks it), whatever the prompt and the step; and the bound is met
    within a page and a key group, so it costs no more than it must."""
    cfg = KvcompConfig.from_dict(kvcomp)
    width = decode_probs_width(cfg, bs)
    most = 0
    for P in (1, 7, bs, 3 * bs + 1, 200):
        n = torch.arange(P + 1, P + 1200)
        ev = evicted_ranges(cfg, bs, n, torch.ones_like(n), torch.full_like(n, P))
        most = max(most, int((n - (ev[:, 1] - ev[:, 0])).max()))
    assert most <= width
    assert width - most <= bs + cfg.key_token_align + 1


def test_scored_layout_is_the_policy_layout():
    """``scored_layout`` on tensors is ``PagedH2O.layout`` of each count."""
    for kvcomp in ({"eviction": {"method": "h2o", "budget_tokens": 64}},
                   {"eviction": {"method": "a2sf", "budget_tokens": 70, "recent_tokens": 9},
                    "residual_tokens": 40, "group_size": 32}):
        cfg = KvcompConfig.from_dict(kvcomp)
        policy = cfg.eviction.policy(16)
        n = torch.arange(0, 400)
        for P in (0, 5, 50, 130):
            k, e = scored_layout(cfg, policy, n, torch.full_like(n, P))
            want = [policy.layout(int(x), cfg.quantized_prefix_len(int(x)), P) for x in n]
            assert list(zip(k.tolist(), e.tolist())) == want


# ------------------------------------------------ the backend's Triton steps

GRAPH_CASES = SCORED_CASES + [STEP_CASES[0]]


@pytest.mark.parametrize("kvcomp,bs,prompts,schedule", GRAPH_CASES,
                         ids=[c[0]["eviction"]["method"] + str(i)
                              for i, c in enumerate(GRAPH_CASES)])
def test_graph_decode_steps_give_the_eager_steps(monkeypatch, kvcomp, bs, prompts, schedule):
    """The Triton steps with every decode step past the prompts taken as a
    captured step (``graph_decode``: the probs at ``decode_probs_width``,
    the eviction by ``evict_decode_rows``) give every output of the eager
    steps with their eviction rows bit for bit, and the captured steps'
    eviction did compact (H2O / A2SF)."""
    from test_eviction_batch import _through_evictions

    cfg = KvcompConfig.from_dict(kvcomp)
    total = sum(map(sum, schedule))
    q, k, v = _inputs(total, prompts, 8, seed=len(schedule))
    scored = cfg.eviction.method != "snapkv"
    if scored:
        schedule = _through_evictions(cfg, bs, prompts, schedule, 4)
    eager = _run(cfg, prompts, schedule, q, k, v, bs, triton=True, by_rows=True)
    steps = []
    real = eviction_gpu.evict_decode_rows

    def counted(cache, layout, cfg, table, lens, prompt_lens):
        steps.append(bool(any(_moves(cfg, cfg.eviction.policy(bs), n - 1, n, P)
                              for n, P in zip(lens.tolist(), prompt_lens.tolist()))))
        return real(cache, layout, cfg, table, lens, prompt_lens)

    monkeypatch.setattr(eviction_gpu, "evict_decode_rows", counted)
    monkeypatch.setattr(eviction_gpu, "after_attention",
                        _only_eager(eviction_gpu.after_attention))
    got = _run(cfg, prompts, schedule, q, k, v, bs, triton=True, by_rows=True, graph=True)
    assert torch.equal(got, eager)
    if scored:
        assert len(steps) >= 10 and any(steps)


# H2O's case: A2SF's decay is applied by the same score kernel whichever way it normalises
@pytest.mark.parametrize("kvcomp,bs,prompts,schedule", SCORED_CASES[:1],
                         ids=[SCORED_CASES[0][0]["eviction"]["method"]])
def test_scores_from_logits_give_the_normalising_steps(monkeypatch, kvcomp, bs, prompts,
                                                       schedule):
    """With ``KVCOMP_SCORE_FROM_LOGITS`` on (the default) every decode step's scores come
    from the decode kernel's logits and log-sum-exps (the score accumulation
    normalises them), eager and captured steps alike: the captured steps give
    the eager ones bit for bit, and both give the normalising path's outputs
    (to 1e-5: the same kept tokens, scores equal up to exp2's last bits); the
    normalising path's captured steps give its eager ones bit for bit."""
    from test_eviction_batch import _through_evictions

    cfg = KvcompConfig.from_dict(kvcomp)
    total = sum(map(sum, schedule))
    q, k, v = _inputs(total, prompts, 8, seed=len(schedule))
    schedule = _through_evictions(cfg, bs, prompts, schedule, 4)
    monkeypatch.setenv(SCORE_FROM_LOGITS_ENV, "0")
    normalising = _run(cfg, prompts, schedule, q, k, v, bs, triton=True, by_rows=True)
    assert torch.equal(_run(cfg, prompts, schedule, q, k, v, bs, triton=True, by_rows=True,
                            graph=True), normalising)
    monkeypatch.setenv(SCORE_FROM_LOGITS_ENV, "1")
    with_lse = []
    real = eviction_gpu.score_adder

    def adder():
        add = real()

        def add_logged(*args, lse=None):
            with_lse.append(lse is not None)
            return add(*args, lse=lse)

        return add_logged

    monkeypatch.setattr(eviction_gpu, "score_adder", adder)
    eager = _run(cfg, prompts, schedule, q, k, v, bs, triton=True, by_rows=True)
    captured = _run(cfg, prompts, schedule, q, k, v, bs, triton=True, by_rows=True,
                    graph=True)
    assert with_lse and all(with_lse)
    assert torch.equal(captured, eager)
    torch.testing.assert_close(eager, normalising, atol=1e-5, rtol=1e-5)


def _only_eager(after_attention):
    def eager_only(*args, **kwargs):
        md = args[9]
        assert not md.graph_decode
        return after_attention(*args, **kwargs)

    return eager_only


# ------------------------------------------------ the builder

def _builder(monkeypatch, cfg, rows=8):
    from vllm_kvcomp.backend import KvcompMetadataBuilder
    from vllm_kvcomp.kernels.eviction_gpu import eviction_rows_config

    monkeypatch.setenv(EVICTION_GRAPHS_ENV, "1")
    builder = KvcompMetadataBuilder.__new__(KvcompMetadataBuilder)
    builder.kv_cache_spec = SimpleNamespace(block_size=16)
    builder.on_cpu, builder.host_lists = False, True
    builder.rows_config = eviction_rows_config(cfg)
    builder.max_model_len = 4096
    builder.prompt_lens_buffer = torch.full((rows,), PADDING_PROMPT_LEN, dtype=torch.int32)
    return builder


def _cam(lens, prompts, q_lens=None):
    i32 = dict(dtype=torch.int32)
    q_lens = q_lens or [1 if n else 0 for n in lens]
    qsl = torch.tensor([0] + list(np.cumsum(q_lens)), **i32)
    B = len(lens)
    return SimpleNamespace(
        num_reqs=B, num_actual_tokens=int(qsl[-1]), max_query_len=max(q_lens),
        max_seq_len=max(lens), query_start_loc=qsl, query_start_loc_cpu=qsl,
        seq_lens=torch.tensor(lens, **i32), seq_lens_cpu=torch.tensor(lens, **i32),
        block_table_tensor=torch.zeros(B, 16, **i32), slot_mapping=torch.zeros(B, **i32),
        rswa_prefix_lens=None if prompts is None else torch.tensor(prompts, **i32))


def test_builder_keeps_prompt_lengths_where_a_captured_step_reads_them(monkeypatch):
    """Where decode steps are captured (graph_eviction) the builder writes each step's prompt
    lengths into one persistent buffer (what a capture's kernels read) and
    calls a step a captured one only where every row is past its prompt
    (padding rows apart); a capture batch reads that buffer too."""
    cfg = KvcompConfig.from_dict({"eviction": {"method": "h2o", "budget_tokens": 48}})
    builder = _builder(monkeypatch, cfg)
    buf = builder.prompt_lens_buffer
    md = builder.build(0, _cam([100, 90, 0], [40, 80, 7]))
    assert md.graph_decode and md.prompt_lens.data_ptr() == buf.data_ptr()
    assert buf[:3].tolist() == [40, 80, 7] and buf[3:].tolist() == [PADDING_PROMPT_LEN] * 5
    # a prompt's one-token last chunk: eager
    assert not builder.build(0, _cam([100, 80], [40, 80])).graph_decode
    # a chunk: eager
    assert not builder.build(0, _cam([100, 90], [40, 80], q_lens=[1, 5])).graph_decode
    cap = builder.build_for_cudagraph_capture(_cam([1, 1, 1, 1], None))
    assert cap.graph_decode and cap.prompt_lens.data_ptr() == buf.data_ptr()
    assert cap.max_seq_len == 4096 and cap.prompt_lens.shape == (4,)


def test_cudagraph_support_follows_the_setting(monkeypatch, tmp_path):
    """Uniform decode batches are captured for H2O without a head map by
    default, for SnapKV / H2O / A2SF with KVCOMP_EVICTION_GRAPHS=1, never with
    0; left unset, never with micro-batching, enforce_eager or graphs without
    full decode graphs either (their steps decide on the host). The runner
    hook keeps prompt steps eager in exactly the engines that capture."""
    from vllm.config import CUDAGraphMode
    from vllm.platforms import current_platform
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_kvcomp.backend import KvcompMetadataBuilder
    from vllm_kvcomp.names import BACKEND_NAME
    from vllm_kvcomp.patches.prompt_steps import eager_prompt_steps

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda *a: False)
    captured, never = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE, AttentionCGSupport.NEVER

    def support(eviction, env=None, head_map=None, **configs):
        kvcomp = {"eviction": eviction, **({"head_map": head_map} if head_map else {})}
        vc = SimpleNamespace(additional_config={"kvcomp": kvcomp}, **configs,
                             attention_config=SimpleNamespace(
                                 backend=SimpleNamespace(name=BACKEND_NAME)))
        if env is None:
            monkeypatch.delenv(EVICTION_GRAPHS_ENV, raising=False)
        else:
            monkeypatch.setenv(EVICTION_GRAPHS_ENV, env)
        got = KvcompMetadataBuilder.get_cudagraph_support(vc, None)
        if eviction["method"] != "streamingllm":
            assert eager_prompt_steps(vc) is (got == captured), (eviction, env, configs)
        return got

    h2o = {"method": "h2o", "budget_tokens": 64}
    a2sf = {"method": "a2sf", "budget_tokens": 64}
    snap = {"method": "snapkv", "budget_tokens": 64}
    split = tmp_path / "map.json"
    split.write_text(json.dumps({"layers": [["retrieval", "streaming"]]}))
    split = str(split)
    assert support(h2o) == captured
    assert support(a2sf) == support(snap) == support(h2o, head_map=split) == never
    assert support(h2o, "0") == never
    assert support(a2sf, "1") == support(snap, "1") == support(h2o, "1", head_map=split) == \
        captured
    ubatch = {"parallel_config": SimpleNamespace(use_ubatching=True)}
    eager = {"model_config": SimpleNamespace(enforce_eager=True)}
    assert support(h2o, **ubatch) == support(h2o, **eager) == never
    for mode, want in ((CUDAGraphMode.NONE, never), (CUDAGraphMode.PIECEWISE, never),
                       (CUDAGraphMode.FULL_DECODE_ONLY, captured),
                       (CUDAGraphMode.FULL_AND_PIECEWISE, captured)):
        assert support(h2o, compilation_config=SimpleNamespace(cudagraph_mode=mode)) == want
    assert support(h2o, "1", compilation_config=SimpleNamespace(
        cudagraph_mode=CUDAGraphMode.PIECEWISE)) == captured
    assert support(h2o, "1", **ubatch) == captured  # refused at start-up (below)
    # StreamingLLM decides nothing on the host: its decode steps are captured as any
    assert support({"method": "streamingllm"}, "0") == captured


# ------------------------------------------------ the runner hook

class _Runner:
    """The state the hook reads, and the method it wraps (its arguments back)."""

    def __init__(self, computed, prompts):
        self.vllm_config = None
        self.input_batch = SimpleNamespace(num_computed_tokens_cpu=np.array(computed),
                                           num_prompt_tokens=np.array(prompts))

    def _determine_batch_execution_and_padding(self, num_tokens, num_reqs, **kwargs):
        return kwargs.get("force_uniform_decode")


@pytest.mark.parametrize("eager", [True, False])
def test_runner_calls_a_batch_with_a_prompt_step_not_uniform(monkeypatch, eager):
    """The wrapped runner calls a batch that holds a request inside its
    prompt (its one-token last chunk) not a uniform decode batch, so it is
    not replayed from a captured graph; a batch of decodes past their
    prompts, a capture's own choice and any engine without the setting are
    left as vLLM has them; rows past the batch are not read."""
    from vllm_kvcomp.patches import prompt_steps

    class Runner(_Runner):
        pass

    monkeypatch.setattr(prompt_steps, "eager_prompt_steps", lambda vc: eager)
    prompt_steps._wrap(Runner)
    decodes = Runner([100, 50, 3], [40, 50, 9])
    assert decodes._determine_batch_execution_and_padding(num_tokens=2, num_reqs=2) is None
    ending = Runner([100, 49, 3], [40, 50, 9])
    want = False if eager else None
    assert ending._determine_batch_execution_and_padding(num_tokens=2, num_reqs=2) is want
    assert ending._determine_batch_execution_and_padding(2, 2) is want
    assert ending._determine_batch_execution_and_padding(
        num_tokens=2, num_reqs=2, force_uniform_decode=True) is True
    assert prompt_steps.holds_prompt_step(np.array([5, 9]), np.array([5, 10]), 1) is False


def test_hook_installs_once_whatever_the_switch(monkeypatch):
    """Both model runners are wrapped when the plugin loads, and once; the
    switch is read per engine (``eager_prompt_steps``), not here."""
    from vllm.v1.worker.gpu import model_runner as v2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_kvcomp.patches import prompt_steps

    def unwrapped(fn):  # the plugin, loaded as the tests started, has wrapped them
        return fn.__wrapped__ if getattr(fn, "__kvcomp_wrapped__", False) else fn

    orig = unwrapped(GPUModelRunner._determine_batch_execution_and_padding)
    monkeypatch.setattr(GPUModelRunner, "_determine_batch_execution_and_padding", orig)
    v2_execute = unwrapped(v2.GPUModelRunner.execute_model)
    v2_uniform = unwrapped(v2.get_uniform_token_count)
    monkeypatch.setattr(v2.GPUModelRunner, "execute_model", v2_execute)
    monkeypatch.setattr(v2, "get_uniform_token_count", v2_uniform)
    monkeypatch.setattr(prompt_steps, "_APPLIED", False)
    monkeypatch.setenv(EVICTION_GRAPHS_ENV, "0")
    prompt_steps.apply()
    wrapped = GPUModelRunner._determine_batch_execution_and_padding
    assert wrapped is not orig and wrapped.__kvcomp_wrapped__
    assert v2.GPUModelRunner.execute_model.__kvcomp_wrapped__
    assert v2.get_uniform_token_count.__kvcomp_wrapped__
    monkeypatch.setattr(prompt_steps, "_APPLIED", False)
    prompt_steps.apply()
    assert GPUModelRunner._determine_batch_execution_and_padding is wrapped


def test_builder_pads_prompt_lengths_of_a_padded_captured_batch(monkeypatch):
    """Model Runner V2 gives one prompt length per scheduled request, fewer
    than the rows of a batch padded to a captured size: the padding rows
    count as inside an endless prompt, and the step is still a captured one."""
    from vllm_kvcomp.backend import padded_prompt_lens

    cfg = KvcompConfig.from_dict({"eviction": {"method": "a2sf", "budget_tokens": 48}})
    builder = _builder(monkeypatch, cfg)
    cam = _cam([100, 90, 0, 0], [40, 80, 1, 1])
    cam.rswa_prefix_lens = cam.rswa_prefix_lens[:2]
    md = builder.build(0, cam)
    assert md.graph_decode and md.eviction_rows is None  # a captured step reads no host list
    assert builder.prompt_lens_buffer[:4].tolist() == [40, 80] + [PADDING_PROMPT_LEN] * 2
    assert md.prompt_lens_cpu == [40, 80, PADDING_PROMPT_LEN, PADDING_PROMPT_LEN]
    # a copy, not a view of the runner's (pinned, reused) rows
    src = torch.tensor([5, 6, 7], dtype=torch.int32)
    got = padded_prompt_lens(src, 3)
    src[0] = 99
    assert got.tolist() == [5, 6, 7]


def _v2_module():
    """A stand-in for vLLM's Model Runner V2 module: a runner whose
    ``execute_model`` asks the module's ``get_uniform_token_count`` after
    updating its request states, as vLLM 0.26's does."""
    import types

    mod = types.ModuleType("v2_stand_in")

    def get_uniform_token_count(num_reqs, num_tokens, max_query_len):
        return max_query_len if num_tokens == num_reqs * max_query_len else None

    class GPUModelRunner:
        def __init__(self, computed, prompts):
            self.vllm_config = None
            self.req_states = SimpleNamespace(
                req_id_to_index={f"r{i}": i for i in range(len(computed))},
                num_computed_tokens_np=np.array(computed),
                prompt_len=SimpleNamespace(np=np.array(prompts)))

        def execute_model(self, scheduler_output):
            counts = list(scheduler_output.num_scheduled_tokens.values())
            return mod.get_uniform_token_count(len(counts), sum(counts), max(counts))

    mod.GPUModelRunner, mod.get_uniform_token_count = GPUModelRunner, get_uniform_token_count
    return mod


@pytest.mark.parametrize("eager", [True, False])
def test_runner_v2_calls_a_batch_with_a_prompt_step_not_uniform(monkeypatch, eager):
    """Model Runner V2 (vLLM 0.26's default for Llama-like models): a batch of
    one-token steps holding a prompt's last token is not uniform, so no FULL
    graph is replayed for it; decodes past their prompts, requests the runner
    does not hold (dummy runs), calls outside a step and engines without the
    setting are left as vLLM has them."""
    from vllm_kvcomp.patches import prompt_steps

    mod = _v2_module()
    monkeypatch.setattr(prompt_steps, "eager_prompt_steps", lambda vc: eager)
    prompt_steps._wrap_v2(mod)
    step = SimpleNamespace(num_scheduled_tokens={"r0": 1, "r1": 1})
    assert mod.GPUModelRunner([100, 50], [40, 50]).execute_model(step) == 1
    ending = mod.GPUModelRunner([100, 49], [40, 50])
    assert ending.execute_model(step) == (None if eager else 1)
    dummy = SimpleNamespace(num_scheduled_tokens={"x0": 1, "x1": 1})
    assert ending.execute_model(dummy) == 1
    assert mod.get_uniform_token_count(2, 2, 1) == 1


def test_micro_batches_with_captured_eviction_are_refused(monkeypatch):
    """Dual batch overlap builds two micro-batches' metadata before either
    runs, and the captured steps keep one prompt-length buffer: with the
    switch set to 1, refused at start-up naming both; unset or 0, accepted
    and served eagerly."""
    from vllm_kvcomp.config import KvcompConfigError
    from vllm_kvcomp.validation import validate_vllm_config

    vc = SimpleNamespace(
        additional_config={"kvcomp": {"eviction": {"method": "h2o", "budget_tokens": 64}}},
        model_config=None, speculative_config=None, kv_transfer_config=None,
        cache_config=SimpleNamespace(cache_dtype="auto"),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, use_ubatching=True))
    monkeypatch.setenv(EVICTION_GRAPHS_ENV, "1")
    with pytest.raises(KvcompConfigError, match="micro-batching.*KVCOMP_EVICTION_GRAPHS"):
        validate_vllm_config(vc)
    cfg = KvcompConfig.from_dict(vc.additional_config["kvcomp"])
    for unset_or_off in ("", "0"):
        monkeypatch.setenv(EVICTION_GRAPHS_ENV, unset_or_off)
        assert not graph_eviction(cfg, vc)
        try:
            validate_vllm_config(vc)
        except KvcompConfigError as e:
            assert "micro-batching" not in str(e)
        except AttributeError:
            pass  # the checks after the parallel ones read what the stand-in lacks

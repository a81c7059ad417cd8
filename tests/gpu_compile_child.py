"""Child process of ``test_gpu_compile.py``: compiles the Triton kernels for
sm_90 on a CPU box. Runs without ``TRITON_INTERPRET`` (under it ``@triton.jit``
builds interpreter functions, which ``triton.compile`` cannot take).

    python tests/gpu_compile_child.py '<json list of cases>'   # prints RESULT <json>
"""
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from unittest import mock

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import vllm_kvcomp.kernels.triton_decode as triton_decode  # noqa: E402
from engine_launches import recorded_launches  # noqa: E402
import vllm_kvcomp.kernels.triton_prefill as triton_prefill  # noqa: E402
import vllm_kvcomp.kernels.triton_quest as triton_quest  # noqa: E402
import vllm_kvcomp.kernels.triton_store as triton_store  # noqa: E402
from vllm_kvcomp.config import KvcompConfig  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
SM90_BACKEND = make_backend(SM90)
# an H100's / H200's shared memory per block (opt-in): a launch that needs more
# fails on the device with OutOfResources, where the prefill launcher falls back
SM90_MAX_SHARED = 232448
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def bind_sm90(jit, args, kw):
    """(key, build) of a launch as Triton's JIT binds it on an sm_90 device:
    defaults filled in, integers equal to 1 and 16-byte divisibility of
    integers and pointers specialized. ``build()`` compiles it."""
    binder = create_function_from_signature(jit.signature, jit.params, SM90_BACKEND)
    bound, specialization, options = binder(*args, **kw)
    key = (jit.fn.__name__, repr(specialization), repr(sorted(options.items())))

    def build():
        opts, signature, constexprs, attrs = jit._pack_args(
            SM90_BACKEND, kw, bound, specialization, options)
        return triton.compile(ASTSource(jit, signature, constexprs, attrs), target=SM90,
                              options=opts.__dict__)
    return key, build


def compile_sm90(jit, args, kw):
    return bind_sm90(jit, args, kw)[1]()


class EngineCompiler:
    """Compiles launches as Triton's JIT would on an sm_90 device: the same
    argument specialization (integers equal to 1, 16-byte divisibility of
    integers and pointers) and options, one build per distinct key. A build
    needing more shared memory than sm_90 has raises OutOfResources, as the
    launch would on the device."""

    def __init__(self):
        self.built, self.errors, self.default_keys = {}, {}, set()

    def __call__(self, jit, args, kw, default=True):
        key, build = bind_sm90(jit, args, kw)
        if default:
            self.default_keys.add(key)
        if key in self.errors:
            raise self.errors[key]
        if key not in self.built:
            try:
                kernel = build()
            except Exception as e:
                self.errors[key] = e
                raise
            shared = kernel.metadata.shared
            if shared > SM90_MAX_SHARED:
                self.errors[key] = OutOfResources(shared, SM90_MAX_SHARED, "shared memory")
                raise self.errors[key]
            self.built[key] = dict(summary(jit, kernel), ptx_sha=ptx_digest(kernel.asm["ptx"]))

    def default_path_fingerprint(self) -> str:
        """One digest of the PTX of every build the default path uses."""
        return hashlib.sha256(" ".join(sorted(
            self.built[k]["ptx_sha"] for k in self.default_keys if k in self.built)).encode()
        ).hexdigest()[:16]


def ptx_digest(ptx: str) -> str:
    """Digest of PTX without its debug information (source lines, files,
    labels): a comment or a moved line in a kernel's source leaves it as is,
    any change to the code it builds does not."""
    keep = [line for line in re.sub(r"//.*", "", ptx).split("\n")
            if not line.strip().startswith((".loc", ".file", ".section", ".b8", ".b32", "$L__"))]
    return hashlib.sha256(re.sub(r"\$L__\w+", "L", "\n".join(keep)).encode()).hexdigest()[:16]


def engine_case(c) -> dict:
    """Every launch of an engine's life for one setting (engine_launches.py)."""
    from engine_launches import ENGINE_SETTINGS, OPT_IN_SETTINGS, engine_launches

    s = next(x for x in ENGINE_SETTINGS + OPT_IN_SETTINGS if x.id == c["setting"])
    comp = EngineCompiler()
    try:
        calls = engine_launches(s, on_launch=comp)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:3000]}
    return {"launches": len(calls), "builds": sorted(v["kernel"] for v in comp.built.values()),
            "fell_back": len(comp.errors), "default_path": comp.default_path_fingerprint()}


def main_loop_stats(ptx: str) -> tuple[int, int, int]:
    """(MMAs, ``bar.sync``, instructions) of the loop (a backward branch's
    body) holding the most MMAs: one step of a kernel's main loop."""
    lines = ptx.split("\n")
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"^(\$L__BB\d+_\d+):", line))}
    best = (-1, 0, 0)
    for i, line in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and labels.get(m.group(1), i) < i:
            body = lines[labels[m.group(1)]:i]
            best = max(best, (sum("mma.sync" in b for b in body),
                              sum("bar.sync" in b for b in body),
                              sum(1 for b in body if b.strip() and not b.strip().startswith(
                                  ("$", "//", "{", "}", ".")))))
    return best


def summary(jit, kernel) -> dict:
    ptx = kernel.asm["ptx"]
    loop_mma, loop_barriers, loop_instructions = main_loop_stats(ptx)
    return {"kernel": jit.fn.__name__, "cubin_bytes": len(kernel.asm["cubin"]),
            "mma": ptx.count("mma.sync") + ptx.count("wgmma.mma_async"),
            "inline_lop3": ptx.count("lop3.b32"), "loop_barriers": loop_barriers,
            "loop_mma": loop_mma, "loop_instructions": loop_instructions}


def decode_case(c) -> list:
    from vllm_kvcomp.kernels.decode_batch import DecodeBatch

    D, dtype = c["D"], DTYPES[c["dtype"]]
    cfg = KvcompConfig(k_bits=c["bits"][0], v_bits=c["bits"][1], group_size=c.get("G", D),
                       residual_tokens=16, key_axis=c["axis"], value_group_size=c.get("VG"))
    b = DecodeBatch(cfg, [1, D + 26, 3 * D + 11], H=2, D=D, rep=4, block_size=D,
                    dtype=dtype, seed=11)
    with recorded_launches(triton_decode, triton_store) as calls:
        triton_decode.kvcomp_decode_attention(*b.args("cpu"), max(b.lens), num_splits=3,
                                              **c.get("kw", {}))
    return [summary(jit, compile_sm90(jit, a, kw)) for jit, a, kw in calls]


def prefill_store_case(c) -> list:
    from test_triton_prefill import mixed_plans
    from test_triton_store import Step

    # Those test modules switch the interpreter on for their own runs; a kernel
    # module decorated or a launcher run after that would be the interpreter's.
    os.environ.pop("TRITON_INTERPRET", None)

    cfg = KvcompConfig(k_bits=c["bits"][0], v_bits=c["bits"][1], group_size=32,
                       residual_tokens=32)
    step = Step(cfg, mixed_plans(cfg), H=2, D=c["D"], rep=4, dtype=DTYPES[c["dtype"]], seed=5)
    d = step.dev()
    with recorded_launches(triton_prefill, triton_store) as calls:
        triton_prefill.kvcomp_prefill_attention(
            d["query"], d["key"], d["value"], d["packed"], d["residual"], d["block_table"],
            d["residual_block_table"], d["query_start_loc"], d["seq_lens"], step.layout, cfg,
            step.scale, step.bs_r, step.max_query_len, torch.empty_like(d["query"]))
        # the context-only pass with LSE of the FlashAttention split
        T, Hq = d["query"].shape[:2]
        triton_prefill.kvcomp_prefill_attention(
            d["query"], d["key"], d["value"], d["packed"], d["residual"], d["block_table"],
            d["residual_block_table"], d["query_start_loc"], d["seq_lens"], step.layout, cfg,
            step.scale, step.bs_r, step.max_query_len, torch.empty_like(d["query"]),
            include_fresh=False, lse=torch.empty(Hq, T))
        triton_store.kvcomp_store(
            d["key"], d["value"], d["packed"], d["residual"], d["block_table"],
            d["residual_block_table"], d["residual_slot_mapping"], d["query_start_loc"],
            d["seq_lens"], step.layout, cfg, step.bs_r, step.max_query_len)
        # each hand-over piece in a program of its own (KVCOMP_STORE_SPLIT)
        triton_store.kvcomp_store(
            d["key"], d["value"], d["packed"], d["residual"], d["block_table"],
            d["residual_block_table"], d["residual_slot_mapping"], d["query_start_loc"],
            d["seq_lens"], step.layout, cfg, step.bs_r, 1, split_handover=True)
    return [summary(jit, compile_sm90(jit, a, kw)) for jit, a, kw in calls]


def quest_case(c) -> list:
    """Quest's scoring, selection and sparse decode launches on a batch past
    its 4-page budget."""
    from vllm_kvcomp.kernels.decode_batch import DecodeBatch
    from vllm_kvcomp.policies.quest import Quest

    D, dtype, bs = c["D"], DTYPES[c["dtype"]], c.get("BS", c["D"])
    cfg = KvcompConfig(k_bits=c["bits"][0], v_bits=c["bits"][1], group_size=c.get("G", D),
                       residual_tokens=16)
    b = DecodeBatch(cfg, [1, D + 26, 9 * bs + 11], H=2, D=D, rep=c.get("rep", 4),
                    block_size=bs, dtype=dtype, seed=11)
    quest = Quest(4 * bs, bs)
    a = b.args("cpu")
    with recorded_launches(triton_quest, triton_decode) as calls:
        sel = triton_quest.quest_select(a[0], a[3], a[5], a[7], b.layout, cfg, quest)
        triton_quest.quest_decode_attention(*a[:8], sel, *a[8:], quest)
        # the scoring launch with one query head at a time (a launch choice)
        triton_quest.quest_page_scores(a[0], a[3], a[5], a[7], b.layout, cfg, quest,
                                       block_p=32, split_heads=True, num_warps=8)
    return [summary(jit, compile_sm90(jit, args, kw)) for jit, args, kw in calls]


def compact_case(c) -> list:
    """The compaction of a request's pages after an eviction's selection, at
    a kept count no multiple of a page or key group; ``batch``: several
    requests' in one launch."""
    from vllm_kvcomp.kernels import triton_compaction
    from vllm_kvcomp.layout import PageLayout

    D, dtype, bs, G = c["D"], DTYPES[c["dtype"]], c["BS"], c["G"]
    ev = {"method": c["method"], "budget_tokens": 2048}
    cfg = KvcompConfig.from_dict({"k_bits": c["bits"][0], "v_bits": c["bits"][1],
                                  "key_axis": c["axis"], "group_size": G,
                                  "residual_tokens": 0, "eviction": ev})
    layout = PageLayout(cfg, bs, D, dtype.itemsize)
    H = 2
    cache = torch.zeros(64, H, layout.head_page_bytes, dtype=torch.uint8)
    row = torch.zeros(64, dtype=torch.int32)
    kept = torch.arange(1001).expand(H, 1001).contiguous()
    with recorded_launches(triton_compaction) as calls:
        if c.get("batch"):  # H2O / A2SF's batched step (h2o_ref.evict_steps): 3 requests
            triton_compaction.triton_compact_batch(
                cache, layout, row.expand(3, 64), kept.expand(3, H, 1001),
                torch.tensor([1001, 1001, 700]))
        else:
            triton_compaction.triton_compact(cache, layout, row, kept, dtype)
    return [summary(jit, compile_sm90(jit, a, kw)) for jit, a, kw in calls]


def scores_case(c) -> list:
    """H2O's decode scores accumulated by the Triton kernel
    (``triton_scores``) as a decode step hands them over: the
    default config's k4v4 pages and block size with score slots, the decode
    kernel's fp32 probabilities over a read width that is a multiple of 16
    and one that is not (Triton specializes the width and strides on that),
    and its base-2 logits with their log-sum-exps (``lse``)."""

    from vllm_kvcomp.backend import KvcompBackend
    from vllm_kvcomp.kernels import triton_scores
    from vllm_kvcomp.layout import PageLayout

    D, H, rep = c["D"], c["H"], c["rep"]
    cfg = KvcompConfig.from_dict({"eviction": {"method": "h2o", "budget_tokens": 2048}})
    with mock.patch("vllm_kvcomp.backend.current_config", lambda: cfg):
        bs = KvcompBackend.get_preferred_block_size(16)
    layout = PageLayout(cfg, bs, D, 2)
    cache = torch.zeros(64, H, layout.head_page_bytes, dtype=torch.uint8)
    table = torch.zeros(1024, 64, dtype=torch.int32)
    lens = torch.full((1024,), 4000, dtype=torch.int32)
    with recorded_launches(triton_scores) as calls:
        for B, W, lse in ((32, 2175, False), (1, 2048, False), (32, 2175, True)):
            probs = torch.zeros(B, H * rep, W)
            ranges = torch.zeros(B, 2, dtype=torch.int32)
            triton_scores.triton_add_decode_scores(
                probs, cache, layout, cfg, table[:B], lens[:B], ranges,
                lse=torch.zeros(B, H * rep) if lse else None)
    return [summary(jit, compile_sm90(jit, a, kw)) for jit, a, kw in calls]


def select_case(c) -> list:
    """The selection of a batch of eviction steps (``triton_select``) as a
    captured H2O 2048 decode step gives it (8 KV heads, 1,040 candidates of
    which 1,024 kept, 256 requests) and as a small budget does (a 64-wide
    block); the same with the rows' steps worked out in the launch
    (``triton_select_decode_rows``, ``KVCOMP_DECODE_ROWS_KERNEL``) for H2O 2048
    and 256."""
    from vllm_kvcomp.kernels import triton_select
    from vllm_kvcomp.layout import PageLayout

    cfg = KvcompConfig.from_dict({"eviction": {"method": "h2o", "budget_tokens": 2048}})
    layout = PageLayout(cfg, cfg.group_size, 128, 2)
    H = 8
    cache = torch.zeros(64, H, layout.head_page_bytes, dtype=torch.uint8)
    with recorded_launches(triton_select) as calls:
        for R, C, kmax in ((256, 1040, 1024), (3, 48, 32)):
            table = torch.zeros(R, 64, dtype=torch.int32)
            col = torch.zeros(R, 1, dtype=torch.long)
            with mock.patch("vllm_kvcomp.kernels.triton_compaction.triton_compact_batch"):
                triton_select.triton_select_and_compact(cache, layout, table, col, col, col,
                                                        col, C, kmax)
        for budget, R in ((2048, 256), (256, 3)):
            rows_cfg = KvcompConfig.from_dict(
                {"eviction": {"method": "h2o", "budget_tokens": budget}})
            lens = torch.zeros(R, dtype=torch.int32)
            with mock.patch("vllm_kvcomp.kernels.triton_compaction.triton_compact_batch"):
                triton_select.triton_select_decode_rows(
                    cache, layout, rows_cfg, torch.zeros(R, 64, dtype=torch.int32), lens, lens)
    return [summary(jit, compile_sm90(jit, a, kw)) for jit, a, kw in calls]


def main(cases):
    out = {}
    for c in cases:
        fn = {"decode": decode_case, "prefill_store": prefill_store_case,
              "engine": engine_case, "quest": quest_case, "compact": compact_case,
              "scores": scores_case, "select": select_case}[c["what"]]
        try:
            out[c["id"]] = fn(c)
        except Exception as e:  # reported per case; the test names it
            out[c["id"]] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    print("RESULT " + json.dumps(out), flush=True)


GPU_VERIFIED = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "gpu_verified.json"


def record(results_dir: str) -> None:
    """After the GPU check (benchmarks/gpu_check.sh) passed on a device with
    this tree's kernels: write each engine setting's default-path fingerprint
    with the results folder that shows the run."""
    from engine_launches import ENGINE_SETTINGS

    prints = {}
    for s in ENGINE_SETTINGS:
        res = engine_case({"setting": s.id})
        assert "error" not in res, (s.id, res)
        prints[s.id] = res["default_path"]
    GPU_VERIFIED.write_text(json.dumps(dict(
        results=results_dir, triton=triton.__version__, default_path=prints), indent=1) + "\n")
    print(f"wrote {GPU_VERIFIED}")


if __name__ == "__main__":
    if sys.argv[1] == "--record":
        record(sys.argv[2])
    else:
        main(json.loads(sys.argv[1]))

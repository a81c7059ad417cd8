"""The Triton kernels compile for an H100 (sm_90), here on a CPU box.

CI never has a GPU and the interpreter runs only the portable code paths (fp32
IEEE dots, no inline PTX), so a kernel edit could break the GPU path unseen.
``gpu_compile_child.py`` captures each kernel launch (arguments, constexprs,
num_warps/stages) as the launcher issues it for a bf16 or fp16 model on a GPU
and hands it to ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``: Triton's
front end, LLVM and the bundled ``ptxas`` build the cubin. Nothing runs.

The engine cases are not a hand-picked list: ``engine_launches.py`` drives the
backend's own launch code through every kind of step an engine runs (start-up
check, CUDA-graph capture over the default sizes, eager decodes, prefill
chunks, mixed steps, split store, the FlashAttention split), and each distinct
launch is built with the specialization Triton's JIT gives it on the device.
Two child processes share the cases (~8 min on two cores, cold Triton cache).
"""
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from e2e_util import child_result, env_without_interpreter
from engine_launches import ENGINE_SETTINGS, OPT_IN_SETTINGS

HERE = Path(__file__).parent

DECODE = [((4, 4), "channel", 128, None, "bf16"), ((2, 2), "channel", 128, 16, "bf16"),
          ((4, 2), "channel", 64, 8, "bf16"), ((2, 2), "token", 64, None, "bf16"),
          ((8, 8), "channel", 128, None, "bf16"), ((16, 16), "channel", 128, None, "bf16"),
          ((4, 4), "channel", 128, None, "fp16"), ((2, 2), "token", 128, 16, "fp16"),
          ((8, 8), "token", 64, None, "fp16")]
DECODE_IDS = [f"k{b[0]}v{b[1]}-{a}-d{D}-e{e}-{t}" for b, a, D, e, t in DECODE]
# The DECODE cases take the default launch (warp tiles where they apply); the
# key-fold cases below pin the shared tile (warp_tiles=1), the launch they compare.
WARP_TILES = [((4, 4), "channel", "bf16"), ((2, 2), "channel", "bf16"), ((4, 4), "token", "fp16")]
PREFILL_STORE = [((4, 4), 128, "bf16"), ((2, 2), 64, "bf16"), ((16, 16), 128, "bf16"),
                 ((4, 2), 128, "fp16")]
PREFILL_STORE_IDS = [f"k{b[0]}v{b[1]}-d{D}-{t}" for b, D, t in PREFILL_STORE]
# Quest (scoring, selection, sparse decode): (bits, head size, dtype, query heads
# a KV head, block size, key group)
QUEST = [((4, 4), 128, "bf16", 4, 128, 128), ((2, 2), 128, "fp16", 8, 128, 32),
         ((4, 16), 64, "bf16", 1, 32, 32)]
QUEST_IDS = [f"k{b[0]}v{b[1]}-d{D}-{t}-rep{r}-bs{bs}-g{g}" for b, D, t, r, bs, g in QUEST]
# Compaction after an eviction's selection: (bits, key axis, key group, block
# size, head size, dtype, method; H2O / A2SF pages carry score slots)
COMPACT = [((4, 4), "channel", 128, 128, 128, "bf16", "snapkv"),
           ((2, 2), "channel", 32, 128, 128, "fp16", "h2o"),
           ((8, 8), "channel", 64, 64, 64, "bf16", "a2sf"),
           ((16, 16), "channel", 128, 16, 128, "bf16", "h2o"),
           ((2, 2), "token", 64, 16, 64, "bf16", "snapkv"),
           ((4, 2), "token", 32, 32, 256, "fp16", "a2sf")]
COMPACT_IDS = [f"k{b[0]}v{b[1]}-{a}-g{g}-bs{bs}-d{D}-{t}-{m}" for b, a, g, bs, D, t, m in COMPACT]
# H2O / A2SF's batched compaction (h2o_ref.evict_steps), on those cases
COMPACT_BATCH_IDS = [i for i, c in zip(COMPACT_IDS, COMPACT) if c[-1] != "snapkv"]
# H2O / A2SF's decode scores by the Triton kernel (not on the default path, which has
# no eviction): the default config's k4v4 pages, 8 KV heads of 4 query heads
SCORES = dict(id="scores-k4v4-d128-h8-rep4", what="scores", D=128, H=8, rep=4)
# the Triton selection of a batch of H2O / A2SF eviction steps (KVCOMP_SELECT_KERNEL)
SELECT = dict(id="select-h2o", what="select")


def _cases():
    cases = [dict(id="decode-" + i, what="decode", bits=b, axis=a, D=D, dtype=t,
                  kw={"elem_bits": e}) for i, (b, a, D, e, t) in zip(DECODE_IDS, DECODE)]
    cases.append(dict(id="decode-no-split-fold", what="decode", bits=(4, 4), axis="channel",
                      D=128, dtype="bf16", kw={"key_fold": "bf16", "warp_tiles": 1}))
    cases.append(dict(id="decode-fp16-fold", what="decode", bits=(4, 4), axis="channel",
                      D=128, dtype="bf16", kw={"key_fold": "fp16", "warp_tiles": 1}))
    cases.append(dict(id="decode-split-fold", what="decode", bits=(4, 4), axis="channel",
                      D=128, dtype="bf16", kw={"key_fold": "split", "warp_tiles": 1}))
    for b, a, t in WARP_TILES:
        cases.append(dict(id=f"decode-warp-tiles-k{b[0]}v{b[1]}-{a}-{t}", what="decode", bits=b,
                          axis=a, D=128, dtype=t, kw={"warp_tiles": 4}))
    # KIVI-2's 32-token key groups, values in one group: 128-token warp tiles,
    # one key group a slice (decode_tiles_and_slices)
    cases.append(dict(id="decode-key-slices-k2v2-bf16", what="decode", bits=(2, 2),
                      axis="channel", D=128, dtype="bf16", G=32, VG=128, kw={}))
    cases += [dict(id="prefill-store-" + i, what="prefill_store", bits=b, D=D, dtype=t)
              for i, (b, D, t) in zip(PREFILL_STORE_IDS, PREFILL_STORE)]
    cases += [dict(id="quest-" + i, what="quest", bits=b, D=D, dtype=t, rep=r, BS=bs, G=g)
              for i, (b, D, t, r, bs, g) in zip(QUEST_IDS, QUEST)]
    cases += [dict(id="compact-" + i, what="compact", bits=b, axis=a, G=g, BS=bs, D=D, dtype=t,
                   method=m) for i, (b, a, g, bs, D, t, m) in zip(COMPACT_IDS, COMPACT)]
    cases += [dict(id="compact-batch-" + i, what="compact", bits=b, axis=a, G=g, BS=bs, D=D,
                   dtype=t, method=m, batch=True)
              for i, (b, a, g, bs, D, t, m) in zip(COMPACT_IDS, COMPACT) if m != "snapkv"]
    cases.append(SCORES)
    cases.append(SELECT)
    return cases


ENGINE_IDS = [s.id for s in ENGINE_SETTINGS]
OPT_IN_IDS = [s.id for s in OPT_IN_SETTINGS]


@pytest.fixture(scope="module")
def compiled():
    # two children side by side (CI has two cores); a child's memory grows with
    # every kernel it builds (11-14 GB for half the cases, past what two can
    # share on a 2-core machine), so six shares, each in a fresh child
    cases = _cases() + [dict(id="engine-" + i, what="engine", setting=i)
                        for i in ENGINE_IDS + OPT_IN_IDS]
    shares = [cases[i::6] for i in range(6)]

    def run(share):
        return child_result([str(HERE / "gpu_compile_child.py"), json.dumps(share)],
                            timeout=2400, env=env_without_interpreter())[0]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, shares))
    return {k: v for r in results for k, v in r.items()}


@pytest.mark.parametrize("setting", ENGINE_IDS + OPT_IN_IDS)
def test_engine_launches_compile_for_sm90(compiled, setting):
    """Every launch the engine issues for this setting, from the start-up check
    through CUDA-graph capture to prefill chunks and mixed steps, split store
    included (engine_launches.py), builds for sm_90 as Triton's JIT would
    specialize it there."""
    res = compiled["engine-" + setting]
    assert "error" not in res, res["error"]
    built = set(res["builds"])
    assert {"_kvcomp_store_kernel", "_kvcomp_prefill_kernel", "_kvcomp_decode_kernel",
            "_kvcomp_decode_merge_kernel"} <= built, res
    # the hand-over split and unsplit, the prefill with and without its fresh tokens
    assert res["builds"].count("_kvcomp_store_kernel") >= 2, res
    assert res["builds"].count("_kvcomp_prefill_kernel") >= 2, res
    opt_in = dict(next((s.kvcomp for s in OPT_IN_SETTINGS if s.id == setting), ()))
    if "quest" in opt_in:  # Quest's decode steps: selection, then the dense decode on it
        assert {"_quest_score_kernel", "_quest_select_kernel", "_quest_rewrite_kernel"} <= built
    if "head_split" in opt_in:  # the streaming heads' step, decode-only and mixed batches
        assert res["builds"].count("_stream_kernel") >= 2, res
    if opt_in.get("eviction") in ("snapkv", "h2o", "a2sf"):  # compaction after a selection
        assert "_kvcomp_compact_kernel" in built, res
    if opt_in.get("graphs"):  # a captured decode step's scores and selection
        select = ("_kvcomp_select_kernel" if opt_in["graphs"] == "torch_rows" else
                  "_kvcomp_select_rows_kernel")
        assert {"_kvcomp_decode_scores_kernel", select} <= built, res


@pytest.mark.parametrize("setting", ENGINE_IDS)
def test_default_gpu_path_is_what_last_ran_on_a_gpu(compiled, setting):
    """The code the default GPU path builds (PTX without debug information,
    every launch of the engine's steps but the opt-in split store and
    FlashAttention prefill) is the code that last passed the GPU check on a
    device (benchmarks/results/gpu_verified.json names its results). A kernel
    change that moves it fails here until it has run on a GPU: run
    benchmarks/gpu_check.sh there, record its results folder, then
    `python tests/gpu_compile_child.py --record <folder>`; or keep the change
    off the default path, behind a setting."""
    verified = json.loads((HERE.parent / "benchmarks/results/gpu_verified.json").read_text())
    res = compiled["engine-" + setting]
    assert "error" not in res, res["error"]
    assert res["default_path"] == verified["default_path"].get(setting), (
        f"the default GPU path for {setting} builds code that has not run on a GPU "
        f"(last GPU-verified: {verified['results']}); see this test's docstring")


def _kernels(compiled, case_id):
    res = compiled[case_id]
    assert "error" not in res, res
    return {k["kernel"]: k for k in res}


@pytest.mark.parametrize("case", DECODE_IDS)
def test_decode_compiles_for_sm90(compiled, case):
    k = _kernels(compiled, "decode-" + case)
    assert set(k) == {"_kvcomp_decode_kernel", "_kvcomp_decode_merge_kernel"}
    assert all(v["cubin_bytes"] > 0 for v in k.values())
    main = k["_kvcomp_decode_kernel"]
    assert main["mma"] > 0, main  # the dots became tensor-core instructions
    if "k16v16" not in case and "k8v8" not in case:
        # 2/4-bit codes are unpacked by the inline PTX that the interpreter never runs
        assert main["inline_lop3"] > 0, main


@pytest.mark.parametrize("bits,axis,dtype", WARP_TILES)
def test_warp_tiles_compile_without_loop_barriers(compiled, bits, axis, dtype):
    """The warp-tile loop builds for sm_90 and keeps its two points: the scores
    of a slice stay in one warp, so the packed loop has far fewer barriers
    than the shared tile (7 vs 24 at k4v4 when this was written), and its
    transposed dots (query heads as the 8-wide N) need fewer MMAs than the
    shared tile's 16-row M padding (48 vs 80 in the whole kernel)."""
    k = _kernels(compiled, f"decode-warp-tiles-k{bits[0]}v{bits[1]}-{axis}-{dtype}")
    main = k["_kvcomp_decode_kernel"]
    assert main["mma"] > 0 and main["inline_lop3"] > 0, main
    shared = _kernels(compiled, "decode-fp16-fold")["_kvcomp_decode_kernel"]
    assert main["loop_barriers"] * 2 < shared["loop_barriers"], (main, shared)
    assert main["mma"] < shared["mma"], (main, shared)


def test_key_slices_compile(compiled):
    """The warp-tile loop over 128-token tiles whose slices each fold their
    own key group's scales builds for sm_90: tensor-core dots, PTX unpacking,
    and the few barriers of warp tiles."""
    main = _kernels(compiled, "decode-key-slices-k2v2-bf16")["_kvcomp_decode_kernel"]
    assert main["mma"] > 0 and main["inline_lop3"] > 0, main
    shared = _kernels(compiled, "decode-fp16-fold")["_kvcomp_decode_kernel"]
    assert main["loop_barriers"] * 2 < shared["loop_barriers"], (main, shared)


def test_key_folds_mma_counts(compiled):
    """bf16 per-channel keys: the hi + lo query-scale operands are one more
    dot per key phase, and only where asked for; the fp16 fold costs no
    extra dot (its key dots are fp16 MMAs instead of bf16 ones)."""
    def mma(case):
        return _kernels(compiled, case)["_kvcomp_decode_kernel"]["mma"]

    split, plain, fp16 = mma("decode-split-fold"), mma("decode-no-split-fold"), \
        mma("decode-fp16-fold")
    assert split > plain and fp16 == plain, (split, plain, fp16)


@pytest.mark.parametrize("case", PREFILL_STORE_IDS)
def test_prefill_and_store_compile_for_sm90(compiled, case):
    k = _kernels(compiled, "prefill-store-" + case)
    assert "_kvcomp_prefill_kernel" in k and "_kvcomp_store_kernel" in k, list(k)
    assert all(v["cubin_bytes"] > 0 for v in k.values())
    assert k["_kvcomp_prefill_kernel"]["mma"] > 0


@pytest.mark.parametrize("case", QUEST_IDS)
def test_quest_compiles_for_sm90(compiled, case):
    """Quest's page scoring, top-k selection and batch rewrite build for
    sm_90, and the dense decode kernel on the selected pages (one KV head a
    rewritten request), split-K with its merge, its dots as tensor-core
    instructions."""
    k = _kernels(compiled, "quest-" + case)
    assert set(k) == {"_quest_score_kernel", "_quest_select_kernel", "_quest_rewrite_kernel",
                      "_kvcomp_decode_kernel", "_kvcomp_decode_merge_kernel"}
    assert all(v["cubin_bytes"] > 0 for v in k.values())
    assert k["_kvcomp_decode_kernel"]["mma"] > 0, k


@pytest.mark.parametrize("case", COMPACT_IDS)
def test_compaction_compiles_for_sm90(compiled, case):
    """The compaction after an eviction's selection (per-channel keys
    requantized in channel slices, every other region copied as words, the
    score slots of H2O / A2SF with them) builds for sm_90, its tiles
    separated by barriers (each read whole before it is written)."""
    k = _kernels(compiled, "compact-" + case)
    assert set(k) == {"_kvcomp_compact_kernel"}
    main = k["_kvcomp_compact_kernel"]
    assert main["cubin_bytes"] > 0 and main["loop_barriers"] > 0, main


@pytest.mark.parametrize("case", COMPACT_BATCH_IDS)
def test_batched_compaction_compiles_for_sm90(compiled, case):
    """H2O / A2SF's compaction of several requests in one launch
    (``triton_compact_batch``, a request grid axis and each request's kept
    count read on the device) builds for sm_90, its tiles separated by
    barriers as for one request."""
    k = _kernels(compiled, "compact-batch-" + case)
    assert set(k) == {"_kvcomp_compact_kernel"}
    main = k["_kvcomp_compact_kernel"]
    assert main["cubin_bytes"] > 0 and main["loop_barriers"] > 0, main


def test_score_kernel_compiles_for_sm90(compiled):
    """The decode-score kernel (``triton_scores``) builds for sm_90 at both
    specializations a decode step gives it (read widths a multiple of 16
    and not, one request and many) and with the logits' normalisation (``lse``)."""
    res = compiled[SCORES["id"]]
    assert "error" not in res, res
    assert len(res) == 3 and {k["kernel"] for k in res} == {"_kvcomp_decode_scores_kernel"}, res
    assert all(k["cubin_bytes"] > 0 for k in res), res


def test_select_kernel_compiles_for_sm90(compiled):
    """The selection kernels (``triton_select``) build for sm_90 at a captured
    H2O 2048 step's width (2,048-wide blocks, 8 warps) and a small one, with the
    rows' steps given and worked out in the launch."""
    res = compiled[SELECT["id"]]
    assert "error" not in res, res
    assert sorted(k["kernel"] for k in res) == ["_kvcomp_select_kernel"] * 2 + [
        "_kvcomp_select_rows_kernel"] * 2, res
    assert all(k["cubin_bytes"] > 0 for k in res), res

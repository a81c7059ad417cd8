"""The upstream decode baselines of ``benchmarks/bench_decode_kernel.py``.

vLLM's own int4_per_token_head (TritonAttention) and TurboQuant
(turboquant_k3v4_nc, turboquant_4bit_nc) paths, caches filled by upstream's
store ops, are checked the way ``--check`` checks them on the GPU: the output
of the decode call, issued as the backend issues it, against an fp32 attention
over the K/V the kernel reads (the dequantized cache). Tiny shape, Triton
interpreter on CPU (~25 s on 2 cores). A wrongly issued call must fail.
"""
from pathlib import Path

import pytest
import torch
from e2e_util import child_result

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = dict(Hq=4, H=2, D=128, lens=(40, 70))  # two requests, 3 and 5 blocks of 16
UPSTREAM = ["int4", "tq_k3v4", "tq_4bit"]


def _check_in_child(names, tamper=None):
    """``check_baselines`` in a child interpreter: making upstream's kernels run
    under the Triton interpreter on CPU drops vLLM modules from
    ``sys.modules`` (see ``_upstream_triton_ready``); re-importing them in the
    test process would register vLLM's custom ops twice and break every later
    test that imports vLLM."""
    code = (
        "import importlib.util, json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"  # e2e_util
        "def load(name, path):\n"
        "    spec = importlib.util.spec_from_file_location(name, path)\n"
        "    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); return mod\n"
        f"bench = load('bench_decode_kernel', {str(ROOT / 'benchmarks' / 'bench_decode_kernel.py')!r})\n"
        f"tests = load('bench_baselines_tests', {str(Path(__file__).resolve())!r})\n"
        f"tamper = getattr(tests, {tamper!r}) if {tamper!r} else None\n"
        f"res = bench.check_baselines({names!r}, {DEVICE!r}, tamper=tamper, **tests.SHAPE)\n"
        "print('RESULT ' + json.dumps(res))\n")
    return child_result(["-c", code], timeout=600)[0]


def test_upstream_decode_matches_reference_on_its_cache():
    res = _check_in_child(UPSTREAM)
    assert [r["baseline"] for r in res] == UPSTREAM
    for r in res:
        assert "failed" not in r, r
        assert r["ok"], r
        assert r["max_err"] <= r["tol"], r
        # The reference really is the quantized cache: the kernel is far closer
        # to it than to the K/V before the store (quantization error ~0.1).
        assert r["max_err"] < r["max_err_unquantized"] / 5, r
        # ... and it holds the K/V that were stored, each token where the block
        # table says (a misplaced block reads as an O(1) error here).
        assert r["max_err_unquantized"] < 0.5, r
        assert r["ref_max"] > 0.1, r


def _wrong_scale(bl):
    bl.impl.scale = 1.0  # the backend's softmax scale, not the reference's D**-0.5


def _short_seq_lens(bl):
    bl.seq_lens.sub_(8)  # the metadata the kernel reads; the reference keeps all tokens


@pytest.mark.parametrize("name, tamper", [("int4", "_wrong_scale"), ("tq_4bit", "_short_seq_lens")])
def test_check_fails_on_a_wrongly_issued_call(name, tamper):
    (r,) = _check_in_child([name], tamper)
    assert "failed" not in r, r
    assert r["ok"] is False, r
    assert r["max_err"] > 2 * r["tol"], r

"""KVCOMP_PREFILL_LAUNCH / KVCOMP_DECODE_LAUNCH: the parsers of the kernels'
launch overrides and what the kernel modules take from them (each variable is
read once, when its module is imported: checked in a subprocess)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="Triton is not installed")

from vllm_kvcomp.launch_env import (  # noqa: E402
    DECODE_LAUNCH_ENV,
    PREFILL_LAUNCH_ENV,
    parse_decode_launch,
    parse_prefill_launch,
)
from vllm_kvcomp.kernels.triton_prefill import _BUILTIN_LAUNCH  # noqa: E402


def test_parse_full_and_partial_specs():
    assert parse_prefill_launch("block_rows=128,block_n=64,num_warps=8,num_stages=3") == {
        "block_rows": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}
    assert parse_prefill_launch(" num_warps = 8 , ") == {"num_warps": 8}
    assert parse_prefill_launch("num_stages=1") == {"num_stages": 1}  # any count >= 1
    assert parse_prefill_launch("") == {}


@pytest.mark.parametrize("spec, what", [
    ("block_m=64", "block_m"),          # unknown key
    ("block_rows", "block_rows"),       # no value
    ("block_n=48", "power of two"),
    ("num_warps=6", "power of two"),
    ("block_rows=0", "power of two"),
    ("num_stages=0", ">= 1"),
    ("block_n=sixty", "integer"),
])
def test_parse_rejects_bad_specs(spec, what):
    with pytest.raises(ValueError, match=PREFILL_LAUNCH_ENV) as e:
        parse_prefill_launch(spec)
    assert what in str(e.value)


def _import_with(env_value: str) -> subprocess.CompletedProcess:
    code = ("from vllm_kvcomp.kernels.triton_prefill import PREFILL_LAUNCH as L; "
            "print(sorted(L.items()))")
    env = {**os.environ, PREFILL_LAUNCH_ENV: env_value, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)


def test_env_overrides_module_defaults_at_import():
    r = _import_with("block_rows=32,num_warps=2")
    assert r.returncode == 0, r.stderr
    # the keys named change, the others keep the built-in defaults
    assert r.stdout.strip() == str(sorted(
        {**_BUILTIN_LAUNCH, "block_rows": 32, "num_warps": 2}.items()))
    bad = _import_with("block_rows=100")
    assert bad.returncode != 0 and "ValueError" in bad.stderr
    assert PREFILL_LAUNCH_ENV in bad.stderr


# ---------------------------------------------------- KVCOMP_DECODE_LAUNCH


def test_parse_decode_launch():
    assert parse_decode_launch("warp_tiles=2,num_warps=2,num_stages=2,max_registers=160") == {
        "warp_tiles": 2, "num_warps": 2, "num_stages": 2, "max_registers": 160}
    assert parse_decode_launch("block_n=64") == {"block_n": 64}
    # any split count: one for every step (what comparing eager and captured steps needs)
    assert parse_decode_launch("num_splits=3") == {"num_splits": 3}
    assert parse_decode_launch("") == {}


@pytest.mark.parametrize("spec, what", [
    ("block_rows=64", "block_rows"),    # a prefill key
    ("warp_tiles=3", "power of two"),
    ("max_registers=0", ">= 1"),
    ("num_splits=0", ">= 1"),
    ("num_splits=65", "<= 64"),
])
def test_parse_decode_launch_rejects_bad_specs(spec, what):
    with pytest.raises(ValueError, match=DECODE_LAUNCH_ENV) as e:
        parse_decode_launch(spec)
    assert what in str(e.value)


def test_decode_env_read_at_import():
    code = ("from vllm_kvcomp.kernels.decode_launch import DECODE_LAUNCH as L; "
            "print(sorted(L.items()))")
    env = {**os.environ, DECODE_LAUNCH_ENV: "warp_tiles=2, num_warps=2", "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str([("num_warps", 2), ("warp_tiles", 2)])

"""The engine tests' fork server (``engine_forkserver.py``) runs an engine as
a fresh process would: the same tokens and logprobs as a plain process, an
engine that fails or runs past its time fails the test, and a job whose
import-time environment differs is not run by a server that imported with
another."""
import pytest

import e2e_util
from e2e_util import run_engine, token_prompts

SPEC = dict(backend="kvcomp", kvcomp={"k_bits": 4, "v_bits": 4},
            prompts=token_prompts([300, 40], seed=5), max_tokens=8, logprobs=True,
            engine=dict(max_model_len=1024, max_num_batched_tokens=128))


def test_forked_engine_equals_a_plain_process(tiny_llama, monkeypatch):
    forked = run_engine({**SPEC, "model": tiny_llama})
    assert e2e_util._SERVER, "the engine did not run on the fork server"
    monkeypatch.setenv("KVCOMP_TEST_FORKSERVER", "0")
    plain = run_engine({**SPEC, "model": tiny_llama})
    assert forked["tokens"] == plain["tokens"]
    assert forked["logprobs"] == plain["logprobs"]
    assert forked["kv_cache_tokens"] == plain["kv_cache_tokens"] is not None


def test_forked_engine_failures_fail(tiny_llama):
    with pytest.raises(AssertionError, match="k_bits=3"):
        run_engine({**SPEC, "model": tiny_llama, "kvcomp": {"k_bits": 3}})
    with pytest.raises(AssertionError):
        run_engine({**SPEC, "model": tiny_llama}, timeout=1)


def test_another_import_environment_gets_its_own_server(tiny_llama):
    run_engine({**SPEC, "model": tiny_llama})
    first = e2e_util._SERVER[0]
    run_engine({**SPEC, "model": tiny_llama}, env={"OMP_NUM_THREADS": "2"})
    assert e2e_util._SERVER[0] is not first
    assert e2e_util._SERVER[0].import_env["OMP_NUM_THREADS"] == "2"

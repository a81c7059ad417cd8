"""Helpers shared by the end-to-end tests: fresh-process engines, prompts."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
KV_SIZE_RE = re.compile(r"GPU KV cache size: ([\d,]+) tokens")


def child_result(args: list, timeout: int, env: dict | None = None) -> tuple[object, str]:
    """Run ``python *args`` in a fresh process (environment ``env``, default
    this one); return the JSON of the last ``RESULT <json>`` line it printed
    and its whole output. Fails the test, with the output's tail, if it exits
    non-zero or prints no result."""
    # Output goes to files, not pipes, and the child gets a process group of its
    # own that is killed once it exits: an engine's worker that outlives it (a
    # tensor-parallel rank, seldom) would otherwise hold the pipes open and keep
    # a core busy for the rest of the suite.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, text=True,
                                env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    text = stdout + stderr
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    assert returncode == 0 and lines, text[-4000:]
    return json.loads(lines[-1][len("RESULT "):]), text


def env_without_interpreter(**extra) -> dict:
    """This environment without conftest's ``TRITON_INTERPRET`` switch."""
    return {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **extra}


def run_engine(spec: dict, timeout: int = 1200, env: dict | None = None) -> dict:
    """Run tests/engine_runner.py on ``spec`` (with extra environment
    variables ``env``); return its RESULT plus the KV capacity vLLM logged
    (``kv_cache_tokens``)."""
    # Engines run as a user's would: the interpreter switch that conftest
    # sets for the in-process kernel tests is passed on only when asked for.
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(spec, f)
        f.flush()
        result, text = child_result([str(HERE / "engine_runner.py"), "@" + f.name], timeout,
                                    env_without_interpreter(**(env or {})))
    m = KV_SIZE_RE.search(text)
    result["kv_cache_tokens"] = int(m.group(1).replace(",", "")) if m else None
    return result


def token_prompts(lengths, seed, vocab=400, shared_prefix=0, offset=3):
    """Random token-id prompts; the first ``shared_prefix`` tokens are common
    to all of them (so later requests hit the prefix cache)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(offset, vocab) for _ in range(shared_prefix)]
    return [{"prompt_token_ids": prefix + [rng.randrange(offset, vocab) for _ in range(n)]}
            for n in lengths]

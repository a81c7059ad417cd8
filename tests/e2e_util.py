"""Helpers shared by the end-to-end tests: fresh-process engines, prompts, and
vLLM's start-up config path for the start-up checks."""
import atexit
import copy
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine_forkserver import ENGINE_IMPORT_DEFAULTS
from engine_forkserver import IMPORT_ENV as FORK_IMPORT_ENV
from engine_forkserver import MARK as FORK_MARK

HERE = Path(__file__).parent
KV_SIZE_RE = re.compile(r"GPU KV cache size: ([\d,]+) tokens")


def child_result(args: list, timeout: int, env: dict | None = None) -> tuple[object, str]:
    """Run ``python *args`` in a fresh process (environment ``env``, default
    this one); return the JSON of the last ``RESULT <json>`` line it printed
    and its whole output. Fails the test, with the output's tail, if it exits
    non-zero or prints no result. An engine script is forked from a process
    that has imported vLLM already (``engine_forkserver.py``) where its
    environment allows."""
    env = dict(os.environ if env is None else env)
    env.setdefault("VLLM_PORT", str(next_port_base()))
    try:
        returncode, stdout, stderr = (_forked_child(args, timeout, env)
                                      or _plain_child(args, timeout, env))
    finally:
        _remove_shared_memory(int(env["VLLM_PORT"]))
    text = stdout + stderr
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    assert returncode == 0 and lines, text[-4000:]
    return json.loads(lines[-1][len("RESULT "):]), text


# Each engine child scans for its ports from a base of its own, below Linux's
# ephemeral range (32768-60999): an engine left to vLLM's default binds port 0,
# closes it and binds it again for its process-group store, and between the two
# an engine of the other pytest worker (or any outgoing connection) can take the
# same ephemeral port (EADDRINUSE at start-up). Bases are spaced per pytest
# worker and per call, so engines running at the same time never scan the same ports.
# The first slot is drawn per process: a run cut short leaves vLLM's CPU
# tensor-parallel shared memory, named after the engine's port, behind.
_PORT_FIRST, _PORT_RANGE, _PORT_CALL_SPAN = 20000, 12000, 20
_PORT_CALLS = iter(range(random.SystemRandom().randrange(1 << 16), 1 << 30))
_PORT_LOCK = threading.Lock()


def next_port_base() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), index + 1)
    with _PORT_LOCK:
        call = next(_PORT_CALLS)
    span = _PORT_RANGE // workers
    return _PORT_FIRST + index * span + (call % (span // _PORT_CALL_SPAN)) * _PORT_CALL_SPAN


def _remove_shared_memory(port_base: int) -> None:
    """Remove what vLLM's CPU tensor-parallel all-reduce left in /dev/shm for
    an engine whose ports start at ``port_base`` (``<port>-...-cpushm_<rank>``):
    its workers are killed, not shut down, so nothing else unlinks it, and a
    later engine on the same port would fail to create it (EEXIST)."""
    ports = range(port_base, port_base + _PORT_CALL_SPAN)
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for name in names:
        port = name.split("-", 1)[0]
        if "cpushm" in name and port.isdigit() and int(port) in ports:
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass


def _plain_child(args: list, timeout: int, env: dict) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python *args`` in a fresh process."""
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
        return returncode, out.read(), err.read()


# the scripts a fork server may run (they take ENGINE_IMPORT_DEFAULTS)
FORKED_SCRIPTS = ("engine_runner.py", "eviction_pool_child.py")
# this process's fork server (one at a time: each holds ~0.8 GB, and the
# machine's memory is shared with the Triton compile tests' children)
_SERVER: list = []
_SERVER_LOCK = threading.Lock()


class ForkServer:
    """A running ``engine_forkserver.py`` whose imports saw ``import_env``."""

    def __init__(self, import_env: dict):
        env = {k: v for k, v in os.environ.items() if k not in FORK_IMPORT_ENV}
        env.update({k: v for k, v in import_env.items() if v is not None})
        self.import_env = import_env
        self.proc = subprocess.Popen([sys.executable, str(HERE / "engine_forkserver.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, start_new_session=True)
        assert self._answer() == {"ready": True}

    def fork(self, job: dict) -> int:
        """The pid of a child running ``job`` (``engine_forkserver.py``)."""
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._answer()["pid"]

    def _answer(self) -> dict:
        """The server's next answer (lines vLLM logged to its output skipped)."""
        seen = []
        for line in self.proc.stdout:
            if line.startswith(FORK_MARK):
                return json.loads(line[len(FORK_MARK):])
            seen.append(line)
        raise AssertionError("the engine fork server exited: " + "".join(seen)[-4000:])

    def close(self) -> None:
        # children run on in sessions of their own, reaped by init once it is gone
        self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait()


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie nobody reaps has finished)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _close_server() -> None:
    with _SERVER_LOCK:
        while _SERVER:
            _SERVER.pop().close()


atexit.register(_close_server)


def _forked_child(args: list, timeout: int, env: dict) -> tuple[int, str, str] | None:
    """``_plain_child``'s result for an engine script, run by a child of this
    process's fork server (started, or replaced, for the environment's
    import-time variables); None where ``args`` is not an engine script or
    ``KVCOMP_TEST_FORKSERVER=0``."""
    import time

    if os.environ.get("KVCOMP_TEST_FORKSERVER") == "0" or not args or \
            Path(args[0]).name not in FORKED_SCRIPTS:
        return None
    import_env = {k: env.get(k, ENGINE_IMPORT_DEFAULTS.get(k)) for k in FORK_IMPORT_ENV}
    with tempfile.TemporaryDirectory() as d:
        out, err, status = (os.path.join(d, n) for n in ("out", "err", "status"))
        job = {"argv": list(args), "env": env, "out": out, "err": err, "status": status}
        with _SERVER_LOCK:
            if _SERVER and _SERVER[0].import_env != import_env:
                _SERVER.pop().close()
            if not _SERVER:
                _SERVER.append(ForkServer(import_env))
            pid = _SERVER[0].fork(job)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        try:  # the child's process group: an engine's workers die with it
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        while _alive(pid):
            time.sleep(0.05)
        returncode = int(Path(status).read_text()) if os.path.exists(status) else -9
        read = lambda p: Path(p).read_text(errors="replace") if os.path.exists(p) else ""
        return returncode, read(out), read(err)


def bench_smoke(script: str, *args, out: Path) -> tuple[dict, str]:
    """(the JSON it wrote to ``out``, its stdout): ``benchmarks/<script>``
    with ``args`` under the Triton interpreter in a child; a non-zero exit fails."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(HERE.parent / "benchmarks" / script), *args,
                        "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(out.read_text()), r.stdout


def env_without_interpreter(**extra) -> dict:
    """This environment without conftest's ``TRITON_INTERPRET`` switch."""
    return {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **extra}


_SHARED: dict[str, dict] = {}


def run_engine(spec: dict, timeout: int = 1200, env: dict | None = None,
               shared: bool = False) -> dict:
    """Run tests/engine_runner.py on ``spec`` (with extra environment
    variables ``env``); return its RESULT plus the KV capacity vLLM logged
    (``kv_cache_tokens``). ``shared``: a reference run that several tests
    compare against; an identical spec and environment run earlier in this
    pytest process gives its result without another engine."""
    if shared:
        key = json.dumps([spec, env], sort_keys=True)
        if key not in _SHARED:
            _SHARED[key] = run_engine(spec, timeout, env)
        return copy.deepcopy(_SHARED[key])
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


def eviction_pool_run(tmp_path, spec: dict) -> dict:
    """``eviction_pool_child.py`` (one engine watched step by step, its
    docstring says what it reports) on ``spec``, as a user's engine runs."""
    f = Path(tmp_path) / "pool_spec.json"
    f.write_text(json.dumps(spec))
    result, _ = child_result([str(HERE / "eviction_pool_child.py"), "@" + str(f)], 1800,
                             env_without_interpreter())
    return result


def check_snapkv_pool(r: dict, requests: int) -> None:
    """What a SnapKV pool run (``eviction_pool_run``, 32-token pages, a
    512-token budget, prompts over 3,000 tokens among others, some aborted)
    must show: every checked step held the policy's pages, a long prompt
    holds 16 pages once processed (512 tokens; one more once decode packs
    past the prompt's last packed page), given-back pages served others,
    every request finished or was aborted and the pool ends as it started."""
    assert r["checked"] > 0 and r["mismatches"] == [], r
    longs = [held for P, held, _ in r["held_after_prompt"].values() if P > 3000]
    assert longs and all(h in (16, 17) for h in longs), r["held_after_prompt"]
    assert r["reused"] > 0, r
    assert r["aborted"] > 0 and r["finished"] + r["aborted"] == requests, r
    assert r["free_end"] == r["free_start"] and r["usage"] == 0, r


def logged_kv_tokens(model: str, *kvcomp: dict, max_model_len: int = 4096) -> list[int]:
    """The "GPU KV cache size" vLLM logs for ``model`` (bf16, 128-token pages)
    with upstream's CPU_ATTN cache, then with each kvcomp setting, in that
    order; one short request each."""
    engine = dict(max_model_len=max_model_len, dtype="bfloat16", block_size=128)
    prompts = token_prompts([5], seed=3)
    specs = [dict(spec=dict(model=model, backend=backend, kvcomp=kv, engine=engine,
                            prompts=prompts, max_tokens=2))
             for backend, kv in [("CPU_ATTN", None)] + [("kvcomp", kv) for kv in kvcomp]]
    return [r["kv_cache_tokens"] for r in run_engines(*specs)]


def run_engines(*runs: dict) -> list[dict]:
    """``run_engine(**run)`` for each of ``runs`` (results in that order), two
    engines at a time: an engine computes on one thread (engine_runner.py)
    and CI has two cores."""
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_engine, **run) for run in runs]
        return [f.result() for f in futures]


def token_prompts(lengths, seed, vocab=400, shared_prefix=0, offset=3):
    """Random token-id prompts; the first ``shared_prefix`` tokens are common
    to all of them (so later requests hit the prefix cache)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(offset, vocab) for _ in range(shared_prefix)]
    return [{"prompt_token_ids": prefix + [rng.randrange(offset, vocab) for _ in range(n)]}
            for n in lengths]


# The policy end-to-end tests' workload (eviction, SnapKV, Quest, head map):
# 32-token pages, key groups and full-precision window, so that budgets and
# windows of a few pages act on these prompts; three prompts past a 512-token
# prefill chunk (1400 spans three) and one of 40 tokens that no budget or
# window here reaches.
POLICY_BASE = {"k_bits": 4, "v_bits": 4, "group_size": 32, "residual_tokens": 32,
               "block_size": 32}
POLICY_K16 = {**POLICY_BASE, "k_bits": 16, "v_bits": 16}
POLICY_LENGTHS = (900, 300, 1400, 40)


def policy_spec(model, kvcomp, lengths=POLICY_LENGTHS, max_tokens=24, rounds=1,
                batches=None, **engine) -> dict:
    """An engine spec of that workload (prefix caching on) with ``kvcomp``;
    ``engine`` overrides its LLM arguments."""
    spec = dict(model=model, backend="kvcomp", kvcomp=kvcomp,
                engine={**dict(max_model_len=2048, max_num_batched_tokens=512, max_num_seqs=4,
                               enable_prefix_caching=True), **engine},
                prompts=token_prompts(list(lengths), seed=11), max_tokens=max_tokens,
                rounds=rounds)
    if batches is not None:
        spec["batches"] = batches
    return spec


def engine_config(model, kvcomp=None, **kwargs):
    """The config vLLM's start-up builds (``EngineArgs.create_engine_config``,
    where the backend's checks run) for ``model`` with the KVCOMP backend,
    ``kvcomp`` settings and other engine arguments; no engine starts."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, attention_backend="kvcomp", max_model_len=2048,
                      additional_config={"kvcomp": kvcomp or {}}, **kwargs).create_engine_config()


def model_variant(model, tmp_path, **config_changes):
    """A copy of ``model``'s directory (files linked, weights are not read by
    start-up) whose config.json has ``config_changes`` applied, e.g. another
    architecture or KV head count."""
    d = Path(tmp_path) / "variant"
    d.mkdir()
    for f in os.listdir(model):
        if f != "config.json":
            os.symlink(os.path.join(model, f), d / f)
    with open(os.path.join(model, "config.json")) as fh:
        cfg = json.load(fh)
    cfg.update(config_changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)

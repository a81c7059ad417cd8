"""A process that imports vLLM once and forks a fresh child for each test
engine script (``engine_runner.py``, ``eviction_pool_child.py``).

Importing vLLM takes about 7 s of a test engine's 9 to 10 s on two cores,
and the suite starts many engines. A child forked from this
process starts with the imports done and nothing else shared: it runs the
script as ``python script args`` would (``__main__``, its own environment,
its output to the files it is given), so each engine is still a fresh
process, as the tests need.

What the imports read from the environment at import time (the Triton
interpreter switch, torch.compile's switch, the compute threads) is fixed
when this process starts: ``IMPORT_ENV`` names those variables, and a job
whose environment gives any of them another value is not run here
(``e2e_util`` replaces the server by one started with its values).

Protocol (one line each way, JSON; this process's answers start with
``FORKSERVER``, as vLLM's import may log to the same stream): a job
``{"argv": [script, args...], "env": {...}, "out": path, "err": path,
"status": path}`` is answered with ``{"pid": child pid}``; the child writes
its exit code to ``status`` before it exits. Children are reaped here as
they exit (SIGCHLD ignored); one that outlives a replaced server is reaped
by whatever adopts it, or stays a zombie, which the requester counts as
gone. The requester polls the pid and then reads the status file: no status
file means the child was killed.
"""
import json
import os
import signal
import sys

MARK = "FORKSERVER "
# What the engine scripts give these variables unless the test does
# (engine_runner.py, eviction_pool_child.py), before anything imports torch.
ENGINE_IMPORT_DEFAULTS = {
    # One compute thread, as vLLM's CPU worker takes on two cores when it binds
    # its threads (one core is left to the engine core): two threads wait at
    # every parallel region for a core that anything else on the machine may
    # hold (an engine took up to 3x as long).
    "OMP_NUM_THREADS": "1",
    # No torch.compile: the model runs eager already, and what vLLM still compiles
    # is its sampler's helpers (a random sample at warm-up, where these engines
    # sample greedily, and the logprobs' rank count). Compiling them probes the
    # CPU's vector instructions with a fresh Python process per probe, each
    # importing torch (ten here): 12-30 s of a 20-40 s test engine on two cores.
    # The helpers run as plain PyTorch instead, with the same results; the
    # backend's code paths are the same.
    "TORCH_COMPILE_DISABLE": "1",
}
# read by torch, Triton or vLLM's modules while they are imported
IMPORT_ENV = ("TRITON_INTERPRET", "OMP_NUM_THREADS", "TORCH_COMPILE_DISABLE",
              "VLLM_TARGET_DEVICE", "PYTHONPATH", "CUDA_VISIBLE_DEVICES")


def _run_child(job: dict) -> None:
    """In the forked child: become ``python argv...`` and exit with its code."""
    import runpy
    import traceback

    os.setsid()
    for fd, path in ((1, job["out"]), (2, job["err"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(job["env"])
    script = job["argv"][0]
    sys.argv = list(job["argv"])
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    with open(job["status"], "w") as f:
        f.write(str(code))
    os._exit(code)


def main() -> None:
    from vllm import LLM, SamplingParams  # noqa: F401  (the imports children inherit)

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    sys.stdout.write(MARK + json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(job)
        sys.stdout.write(MARK + json.dumps({"pid": pid}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

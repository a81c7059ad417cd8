"""Soak `vllm serve --attention-backend kvcomp` over HTTP on loopback.

Starts the server (vLLM's own CLI through ``vllm-kvcomp``) on 127.0.0.1, sends
``--requests`` completions with ``--concurrency`` in flight: prompts of random
token ids from 1 token up to past ``max_model_len`` (those must be rejected
with a 4xx, never left waiting), streaming and not, some cancelled
mid-stream, on a pool small enough (``--blocks``) to force preemption. Checks:

* every request that was not cancelled or rejected returns exactly its
  ``max_tokens`` (``ignore_eos``), none gets a 5xx, none times out;
* at the end vLLM's own pool is back to full: its ``vllm:kv_cache_usage_perc``
  gauge (1 - free blocks / pool, from the scheduler's block pool) reads 0
  and no request is running or waiting.

With ``--shared-prefix F`` that share of the prompts starts with a piece of
one of four fixed token sequences, so that prefix caching finds hits
(``vllm:prefix_cache_hits_total`` is reported).

With ``--burst N`` the random load is followed by N requests sent at once,
each a distinct ``max_model_len / 8``-token prompt asking for
``max_model_len / 4`` tokens: their prompts fit the pool together, their
outputs do not, so the scheduler must preempt (a random load preempts only
when long requests happen to overlap). Each must still return exactly its
tokens.

Prints ``RESULT <json>`` and exits 1 when a check fails. Bounded: every
request has a deadline, the whole run ``--deadline`` seconds.

    python benchmarks/soak_serve.py --model DIR --requests 1000 --concurrency 16
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(text: str) -> dict[str, float]:
    out = {}
    for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:num_preemptions_total",
                 "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
        vals = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
        out[name] = sum(float(v) for v in vals) if vals else None
    return out


async def _one(session, url, model, rng, args, stats, fixed=None):
    n = rng.choice([1, rng.randrange(2, 64), rng.randrange(64, args.max_model_len)])
    max_tokens = rng.randrange(1, args.max_tokens + 1)
    too_long = rng.random() < args.too_long
    if fixed:
        n, max_tokens = fixed
    elif too_long:
        n = args.max_model_len + rng.randrange(1, 64)
    else:
        n = min(n, args.max_model_len - max_tokens)
    stream = rng.random() < 0.5
    cancel_after = rng.randrange(1, max_tokens + 1) if stream and rng.random() < args.cancel else None
    prompt = [rng.randrange(3, args.vocab) for _ in range(n)]
    if not fixed and not too_long and rng.random() < args.shared_prefix:
        shared = rng.choice(args.prefixes)
        k = rng.randrange(1, min(n, len(shared)) + 1)
        prompt[:k] = shared[:k]
    body = dict(model=model, prompt=prompt,
                max_tokens=max_tokens, temperature=0, ignore_eos=True, stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    import aiohttp

    try:
        async with session.post(url, json=body,
                                timeout=aiohttp.ClientTimeout(total=args.request_timeout)) as r:
            if r.status >= 500:
                stats["5xx"] += 1
                return
            if r.status >= 400:
                stats["rejected" if too_long else "unexpected_4xx"] += 1
                return
            if too_long:
                stats["too_long_accepted"] += 1
            if not stream:
                got = (await r.json())["usage"]["completion_tokens"]
            else:
                got, chunks = None, 0
                async for line in r.content:
                    line = line.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    msg = json.loads(line[6:])
                    if msg.get("usage"):
                        got = msg["usage"]["completion_tokens"]
                    if msg.get("choices"):
                        chunks += 1
                        if cancel_after is not None and chunks >= cancel_after:
                            stats["cancelled"] += 1
                            return  # leaving the block closes the connection: an abort
            if got == max_tokens:
                stats["complete"] += 1
            else:
                stats["short"] += 1
    except asyncio.TimeoutError:
        stats["timed_out"] += 1
    except aiohttp.ClientError as e:
        stats["client_error"] += 1
        stats.setdefault("errors", []).append(repr(e)[:200])


async def _load(base, model, args):
    import aiohttp

    rng = random.Random(args.seed)
    stats = {k: 0 for k in ("complete", "short", "cancelled", "rejected", "unexpected_4xx",
                            "too_long_accepted", "5xx", "timed_out", "client_error")}
    sem = asyncio.Semaphore(args.concurrency)
    async with aiohttp.ClientSession() as session:
        async def run(i):
            async with sem:
                await _one(session, base + "/v1/completions", model, random.Random(rng.random()),
                           args, stats)
        await asyncio.gather(*(run(i) for i in range(args.requests)))
        if args.burst:
            burst = {k: 0 for k in stats if k != "errors"}
            burst_args = argparse.Namespace(**{**vars(args), "too_long": 0.0, "cancel": 0.0})
            await asyncio.gather(*(_one(session, base + "/v1/completions", model,
                                        random.Random(rng.random()), burst_args, burst,
                                        fixed=(args.max_model_len // 8, args.max_model_len // 4))
                                   for _ in range(args.burst)))
            stats["burst"] = burst
        # the engine frees an aborted request's blocks on its next step
        for _ in range(60):
            async with session.get(base + "/metrics") as r:
                m = _metrics(await r.text())
            if (m["vllm:kv_cache_usage_perc"] == 0 and not m["vllm:num_requests_running"]
                    and not m["vllm:num_requests_waiting"]):
                break
            await asyncio.sleep(1)
    stats["metrics_at_end"] = m
    return stats


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=36, help="--num-gpu-blocks-override")
    ap.add_argument("--kvcomp", default='{"k_bits": 4, "v_bits": 4}')
    ap.add_argument("--cancel", type=float, default=0.15, help="share of streams cancelled")
    ap.add_argument("--too-long", type=float, default=0.03, help="share of prompts too long")
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--deadline", type=float, default=3600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--burst", type=int, default=0,
                    help="requests sent at once after the load, sized to force preemption")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="extra `vllm serve` argument (repeatable)")
    ap.add_argument("--shared-prefix", type=float, default=0.0,
                    help="share of prompts that start with a piece of one of four fixed "
                         "token sequences (prefix-cache hits)")
    args = ap.parse_args()
    with open(os.path.join(args.model, "config.json")) as f:
        args.vocab = json.load(f)["vocab_size"]
    fixed_rng = random.Random(args.seed + 1)
    args.prefixes = [[fixed_rng.randrange(3, args.vocab) for _ in range(args.max_model_len)]
                     for _ in range(4)]

    port = _free_port()
    cli = os.path.join(os.path.dirname(sys.executable), "vllm-kvcomp")
    cmd = [cli, "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(args.max_model_len), "--attention-backend", "kvcomp",
           "--additional-config", json.dumps({"kvcomp": json.loads(args.kvcomp)}),
           "--num-gpu-blocks-override", str(args.blocks), "--enable-prefix-caching",
           "--max-num-seqs", "8", *args.serve_arg]
    if "cpu" in subprocess.run([sys.executable, "-c", "import torch; print('cuda' if "
                                "torch.cuda.is_available() else 'cpu')"],
                               capture_output=True, text=True).stdout:
        cmd.append("--enforce-eager")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log = open(os.environ.get("SOAK_SERVER_LOG", os.devnull), "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    try:
        import urllib.request

        base = f"http://127.0.0.1:{port}"
        while True:
            if server.poll() is not None:
                print("RESULT " + json.dumps({"error": "server exited at start-up"}))
                return 1
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                if time.time() - t0 > 600:
                    print("RESULT " + json.dumps({"error": "server did not start in 600 s"}))
                    return 1
                time.sleep(1)
        t1 = time.time()
        stats = asyncio.run(asyncio.wait_for(_load(base, args.model, args), args.deadline))
        stats["load_s"] = round(time.time() - t1, 1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    m = stats["metrics_at_end"]
    served = stats["complete"] + stats["cancelled"] + stats["rejected"]
    burst_ok = not args.burst or stats["burst"]["complete"] == args.burst
    stats["ok"] = (served == args.requests and burst_ok and m["vllm:kv_cache_usage_perc"] == 0
                   and not m["vllm:num_requests_running"] and not m["vllm:num_requests_waiting"])
    print("RESULT " + json.dumps(stats), flush=True)
    return 0 if stats["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

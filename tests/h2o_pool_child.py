"""Serve a mixed run in one process and watch vLLM's block pool (H2O / A2SF).

argv[1]: JSON ``{"model", "kvcomp", "engine", "lengths": [...], "max_tokens",
"abort_every", "in_flight", "seed"}``. Requests are added a few at a time;
every ``abort_every``-th is aborted a few steps after it starts. After every
step, for each request past its prompt, the packed pages it holds are read
from the eviction manager and compared with the policy's layout
(``PagedH2O.freed_pages``) for its processed tokens; page ids a request gave
back are tracked and counted when another request holds them later. Prints
``RESULT <json>``.
"""
import json
import os
import random
import sys
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# one compute thread, as in engine_runner.py
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _external(request_id):
    # the engine appends a suffix to the id a request was added with
    return request_id.rsplit("-", 1)[0]


def main(spec):
    from vllm import LLM, SamplingParams

    from vllm_kvcomp.spec import KvcompEvictionManager

    rng = random.Random(spec.get("seed", 0))
    kwargs = dict(max_model_len=4096, enforce_eager=True, seed=0, dtype="float32",
                  enable_prefix_caching=True, disable_log_stats=False)
    kwargs.update(spec.get("engine", {}))
    llm = LLM(spec["model"], attention_backend="kvcomp",
              additional_config={"kvcomp": spec["kvcomp"]}, **kwargs)
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    kvm = sched.kv_cache_manager
    pool = kvm.block_pool
    mgr = next(m for m in kvm.coordinator.single_type_managers
               if isinstance(m, KvcompEvictionManager))
    spec_ev = mgr.kv_cache_spec
    policy = spec_ev.policy
    free0 = pool.get_num_free_blocks()

    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True)
    pending = [(f"r{i}", n) for i, n in enumerate(spec["lengths"])]
    prompt_len = dict(pending)
    abort_at = {rid: rng.randrange(1, 12) for j, (rid, _) in enumerate(pending)
                if spec.get("abort_every") and j % spec["abort_every"] == 0}
    age, freed_ids, last_rows = {}, {}, {}
    checked, mismatches, reused, finished, aborted = 0, [], set(), 0, 0
    most_held = {}
    while pending or engine.has_unfinished_requests():
        while pending and len(sched.running) + len(sched.waiting) < spec.get("in_flight", 6):
            rid, n = pending.pop(0)
            ids = [rng.randrange(3, 400) for _ in range(n)]
            engine.add_request(rid, {"prompt_token_ids": ids}, params)
            age[rid] = 0
        for out in engine.step():
            if out.finished:
                finished += 1
        live = {_external(r) for r in sched.requests}
        for rid in list(age):
            age[rid] += 1
            if abort_at.get(rid) == age[rid] and rid in live:
                engine.abort_request([rid])
                aborted += 1
                age.pop(rid)
        for rid, row in list(last_rows.items()):
            now = mgr.req_to_blocks.get(rid)
            for i, b in enumerate(row):
                if b is not None and (now is None or i >= len(now) or now[i].is_null):
                    freed_ids.setdefault(b, rid)
        last_rows = {}
        for rid, blocks in mgr.req_to_blocks.items():
            last_rows[rid] = [None if b.is_null else b.block_id for b in blocks]
            for b in last_rows[rid]:
                if b is not None and b in freed_ids and freed_ids[b] != rid:
                    reused.add(b)
                    freed_ids.pop(b)
        for rid, req in sched.requests.items():
            blocks = mgr.req_to_blocks.get(rid)
            P = prompt_len[_external(rid)]
            if not blocks or req.num_computed_tokens <= P:
                continue
            row = [not b.is_null for b in blocks]
            # the manager freed for the tokens processed when it last
            # scheduled the request: one step behind at most
            ok = False
            for c in (req.num_computed_tokens, req.num_computed_tokens - 1):
                lo, hi = policy.freed_pages(c, spec_ev.packed_tokens(c), P)
                if row == [not lo <= i < hi for i in range(len(blocks))]:
                    ok = True
            checked += 1
            if not ok:
                mismatches.append((rid, P, req.num_computed_tokens, row.count(True)))
            most_held[rid] = max(most_held.get(rid, 0), row.count(True))
    result = dict(checked=checked, mismatches=mismatches[:5], reused=len(reused),
                  finished=finished, aborted=aborted, free_start=free0,
                  free_end=pool.get_num_free_blocks(), usage=kvm.usage,
                  most_held=most_held, block_size=spec_ev.block_size,
                  preemptions=sum(getattr(m, "value", 0) for m in llm.get_metrics()
                                  if m.name == "vllm:num_preemptions"))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    arg = sys.argv[1]
    main(json.loads(Path(arg[1:]).read_text() if arg.startswith("@") else arg))

"""Serve a mixed run in one process and watch vLLM's block pool (eviction).

argv[1]: JSON ``{"model", "kvcomp", "engine", "long": [lengths], "short":
[lengths] (shuffled) or "lengths": [...] (in order), "max_tokens",
"abort_every", "in_flight", "seed"}``. Requests are added a few at a time;
every ``abort_every``-th is aborted a few steps after it starts. After every
step, for each request past its prompt, the packed pages it holds are read
from the eviction manager and checked against the policy's layout
(``_layout_ok``); page ids a request gave back are tracked and reported when
another request holds them later. Prints ``RESULT <json>``.
"""
import json
import os
import random
import sys
from pathlib import Path

from engine_forkserver import ENGINE_IMPORT_DEFAULTS

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# one compute thread, no torch.compile (engine_forkserver.py says why)
for _name, _value in ENGINE_IMPORT_DEFAULTS.items():
    os.environ.setdefault(_name, _value)


def _external(request_id):
    # the engine appends a suffix to the id a request was added with
    return request_id.rsplit("-", 1)[0]


def _layout_ok(policy, spec_ev, req, P, row) -> bool | None:
    """Whether ``row`` (pages held, in order) is the policy's layout for a
    request with a ``P``-token prompt; ``None``: not checked at this step."""
    from vllm_kvcomp.policies.h2o import PagedH2O

    n = req.num_computed_tokens
    if not isinstance(policy, PagedH2O):  # SnapKV: decided once, at the prompt's end
        # freed at the first scheduling after the completing step
        if n <= P + 1 or req.num_output_tokens < 2:
            return None
        lo, hi = policy.freed_pages(P, spec_ev.packed_tokens(P))
        return row == [not lo <= i < hi for i in range(len(row))]
    if n <= P:
        return None
    # evicting during decode: the manager freed for the tokens processed when
    # it last scheduled the request, one step behind at most
    for c in (n, n - 1):
        lo, hi = policy.freed_pages(c, spec_ev.packed_tokens(c), P)
        if row == [not lo <= i < hi for i in range(len(row))]:
            return True
    return False


def main(spec):
    from vllm import LLM, SamplingParams

    from vllm_kvcomp.spec import KvcompEvictionManager

    rng = random.Random(spec.get("seed", 0))
    kwargs = dict(max_model_len=8192, enforce_eager=True, seed=0, dtype="float32",
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
    bs = spec_ev.block_size
    free0 = pool.get_num_free_blocks()

    lengths = spec.get("lengths")
    if lengths is None:
        lengths = spec["long"] + spec["short"]
        rng.shuffle(lengths)
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True)
    pending = [(f"r{i}", n) for i, n in enumerate(lengths)]
    prompt_len = dict(pending)
    abort_at = {rid: rng.randrange(1, 12) for j, (rid, _) in enumerate(pending)
                if spec.get("abort_every") and j % spec["abort_every"] == 0}
    age = {}
    freed_ids = {}  # block id -> request that gave it back
    last_rows = {}
    checked, mismatches, reused, finished, aborted = 0, [], set(), 0, 0
    held_after_prompt, most_held = {}, {}
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
        # pages given back since the last step, and pages in use by someone else
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
            if not blocks:
                continue
            row = [not b.is_null for b in blocks]
            ok = _layout_ok(spec_ev.policy, spec_ev, req, P, row)
            if ok is None:
                continue
            checked += 1
            if not ok:
                mismatches.append((rid, P, req.num_computed_tokens, row.count(True)))
            held_after_prompt.setdefault(rid, (P, row.count(True), len(row)))
            most_held[rid] = max(most_held.get(rid, 0), row.count(True))
    result = dict(checked=checked, mismatches=mismatches[:5], reused=len(reused),
                  finished=finished, aborted=aborted, free_start=free0,
                  free_end=pool.get_num_free_blocks(), usage=kvm.usage,
                  held_after_prompt=held_after_prompt, most_held=most_held, block_size=bs,
                  preemptions=sum(getattr(m, "value", 0) for m in llm.get_metrics()
                                  if m.name == "vllm:num_preemptions"))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    arg = sys.argv[1]
    main(json.loads(Path(arg[1:]).read_text() if arg.startswith("@") else arg))

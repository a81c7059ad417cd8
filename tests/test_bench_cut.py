"""``bench_e2e.generate_until``, the loop of a cut run (``--cut-after``), on a stand-in for
vLLM's ``LLMEngine``: tokens are counted as each step hands them out, requests still running
at the deadline are aborted, and the times are those of the steps that made the tokens.
(The loop has run against vLLM 0.26's own engine on the CPU; this checks its bookkeeping.)"""
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_e2e import generate_until  # noqa: E402


class Engine:
    """Each step gives every running request (at most ``batch``, admitted in order)
    one token; a request finishes at ``max_tokens``. A step takes one second."""

    def __init__(self, batch, max_tokens):
        self.batch, self.max_tokens = batch, max_tokens
        self.waiting, self.running, self.made, self.aborted = [], [], {}, []
        self.now = 0.0

    def add_request(self, rid, prompt, params):
        self.waiting.append(rid)
        self.made[rid] = 0

    def has_unfinished_requests(self):
        return bool(self.waiting or self.running)

    def abort_request(self, ids):
        self.aborted += ids
        self.waiting = [r for r in self.waiting if r not in ids]
        self.running = [r for r in self.running if r not in ids]

    def step(self):
        while self.waiting and len(self.running) < self.batch:
            self.running.append(self.waiting.pop(0))
        self.now += 1.0
        outs = []
        for rid in list(self.running):
            self.made[rid] += 1
            done = self.made[rid] == self.max_tokens
            outs.append(SimpleNamespace(request_id=rid, finished=done,
                                        outputs=[SimpleNamespace(token_ids=[7])]))
            if done:
                self.running.remove(rid)
        return outs


def test_a_run_that_ends_before_its_deadline_is_whole():
    eng = Engine(batch=2, max_tokens=3)
    tokens, first, last, finished, secs = generate_until(
        eng, [None] * 3, None, deadline_s=100, clock=lambda: eng.now)
    assert tokens == [3, 3, 3] and finished == {0, 1, 2} and eng.aborted == []
    # requests 0 and 1 run steps 1-3; request 2 is admitted when they finish
    assert first == {0: 1.0, 1: 1.0, 2: 4.0} and last == {0: 3.0, 1: 3.0, 2: 6.0}
    assert secs == 6.0


def test_the_deadline_aborts_what_still_runs_and_counts_what_was_made():
    eng = Engine(batch=2, max_tokens=3)
    tokens, first, last, finished, secs = generate_until(
        eng, [None] * 4, None, deadline_s=4, clock=lambda: eng.now)
    # four steps: 0 and 1 finish at step 3, 2 and 3 get one token at step 4
    assert tokens == [3, 3, 1, 1] and finished == {0, 1}
    assert sorted(eng.aborted) == ["2", "3"] and not eng.has_unfinished_requests()
    assert first[2] == 4.0 and 3 in last and secs == 4.0


def test_the_table_marks_only_runs_the_deadline_cut(capsys):
    from bench_e2e import print_tables

    base = dict(workload="W4", requests=256, kv_cache_tokens=1000, ttft_p50=1.0, ttft_p99=2.0,
                tpot_p50=0.02, tpot_p99=0.03, cut_after_s=420.0)
    print_tables([dict(base, setting="bf16", output_tok_s=100.0, completed=256),
                  dict(base, setting="fp8", output_tok_s=150.0, completed=40)],
                 "H200", ["W4"], 54.3, False, "2026-12-05")
    out = capsys.readouterr().out
    assert "| 256/256 |" in out and "| 40/256 (cut at 420 s) |" in out

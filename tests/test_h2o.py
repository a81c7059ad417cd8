"""H2O and A2SF kept sets against a float reference of the papers' rules, and
their start-up refusal (not served yet)."""
import math

import pytest
import torch

from vllm_kvcomp.config import KvcompConfig, KvcompConfigError
from vllm_kvcomp.policies.a2sf import A2SF
from vllm_kvcomp.policies.h2o import H2O


def _float_rule(q, k, P, budget, recent, alpha):
    """Position by position in float64 Python: the prompt's queries attend
    causally (nothing evicted yet), each later query attends the kept tokens
    and itself; a token's score is sum_q alpha ** (n - q) * S_q summed over
    its KV head's query heads (alpha 1: H2O); after the prompt and after each
    step, the lowest scores outside the last ``recent`` tokens are evicted
    down to ``budget`` (ties: the earlier token). Returns the kept positions
    per KV head after every step from the prompt on."""
    T, Hq, D = q.shape
    H = k.shape[1]
    rep = Hq // H
    score = [[0.0] * T for _ in range(H)]
    kept = [set() for _ in range(H)]
    history = []
    for t in range(T):
        for h in range(H):
            kept[h].add(t)
            keys = sorted(j for j in kept[h] if j <= t) if t >= P else list(range(t + 1))
            for j in range(T):
                score[h][j] *= alpha
            for r in range(rep):
                s = [sum(float(q[t, h * rep + r, d]) * float(k[j, h, d]) for d in range(D))
                     / math.sqrt(D) for j in keys]
                m = max(s)
                e = [math.exp(x - m) for x in s]
                z = sum(e)
                for j, x in zip(keys, e):
                    score[h][j] += x / z
        if t >= P - 1:
            n = t + 1
            for h in range(H):
                movable = sorted((j for j in kept[h] if j < n - recent),
                                 key=lambda j: (score[h][j], j))
                for j in movable[: max(0, len(kept[h]) - budget)]:
                    kept[h].discard(j)
            history.append([sorted(s) for s in kept])
    return history


def _policy_run(policy, q, k, P):
    """The same sequence through the policy: probabilities of each step's
    queries over the kept keys, ``accumulate``, ``evict``."""
    T, Hq, D = q.shape
    H = k.shape[1]
    rep = Hq // H
    scores = torch.zeros(H, T, dtype=torch.float64)
    kept = torch.zeros(H, T, dtype=torch.bool)

    def probs(t0, t1, visible):
        s = torch.einsum("thd,jhd->htj", q[t0:t1].double(),
                         k.double().repeat_interleave(rep, 1)) / math.sqrt(D)
        s.masked_fill_(~visible, float("-inf"))
        return torch.softmax(s, -1)

    causal = torch.arange(T)[None, :] <= torch.arange(P)[:, None]
    scores = policy.accumulate(scores, probs(0, P, causal[None]), H)
    kept[:, :P] = True
    kept = policy.evict(scores, kept, P)
    history = [[row.nonzero().squeeze(1).tolist() for row in kept]]
    for t in range(P, T):
        kept[:, t] = True
        vis = kept.repeat_interleave(rep, 0)[:, None, :]
        scores = policy.accumulate(scores, probs(t, t + 1, vis), H)
        kept = policy.evict(scores, kept, t + 1)
        history.append([row.nonzero().squeeze(1).tolist() for row in kept])
    return history


@pytest.mark.parametrize("rep", [1, 4, 8])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_kept_sets_match_the_papers_rule(rep, alpha):
    g = torch.Generator().manual_seed(rep * 10 + int(alpha * 10))
    H, D = 2, 8
    for P, T, budget, recent in ((37, 60, 20, 8), (50, 71, 33, 5)):
        q = torch.randn(T, H * rep, D, generator=g) * 1.5
        k = torch.randn(T, H, D, generator=g)
        policy = H2O(budget, recent) if alpha == 1.0 else A2SF(budget, recent, alpha)
        got = _policy_run(policy, q, k, P)
        want = _float_rule(q, k, P, budget, recent, alpha)
        assert got == want
        assert all(len(s) == budget for step in got for s in step)


def test_forgetting_changes_what_is_kept():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(60, 4, 8, generator=g) * 2, torch.randn(60, 2, 8, generator=g)
    assert _policy_run(H2O(16, 4), q, k, 30)[-1] != _policy_run(A2SF(16, 4, 0.2), q, k, 30)[-1]


def test_bad_policy_parameters():
    with pytest.raises(ValueError, match="recent_tokens=9 exceeds"):
        H2O(8, 9)
    with pytest.raises(ValueError, match="alpha=0 must be in"):
        A2SF(8, 4, 0)


@pytest.mark.parametrize("method", ["h2o", "a2sf"])
def test_serving_them_is_a_named_start_up_error(method):
    with pytest.raises(KvcompConfigError, match=f"method='{method}' is not available yet"):
        KvcompConfig.from_dict({"eviction": {"method": method, "budget_tokens": 512}})

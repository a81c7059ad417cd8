"""The Triton selection of a batch of eviction steps
(``triton_select.triton_select_and_compact``, ``KVCOMP_SELECT_KERNEL``)
against its PyTorch reference ``h2o_ref.select_and_compact`` (a stable sort
of the padded candidates), under the interpreter: the same cache, byte for
byte, over random requests and scores of many shapes, ties everywhere."""
import random

import pytest
import torch
from test_eviction_batch import CASES, IDS, _config
from test_triton_compaction import random_pages

from vllm_kvcomp.kernels import eviction_gpu, h2o_ref
from vllm_kvcomp.kernels.h2o_ref import score_view
from vllm_kvcomp.kernels.triton_select import triton_select_and_compact
from vllm_kvcomp.launch_env import DECODE_ROWS_KERNEL_ENV, SELECT_KERNEL_ENV
from vllm_kvcomp.layout import PageLayout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(bs, H, R, C, kmax, scores, seed):
    """R requests of random candidate runs (``k0`` kept heavy hitters, a
    range from ``e0``; counts up to ``C``), some keeping nothing, over a
    cache whose score slots ``scores`` fills."""
    rnd = random.Random(seed)
    cfg = _config((4, 4), "channel", 16, bs, "h2o")
    layout = PageLayout(cfg, bs, 64, 2)
    k0, e0, count, k1 = [], [], [], []
    for r in range(R):
        a = rnd.randint(0, kmax)
        e = a + rnd.choice([0, rnd.randint(0, 3 * bs)])
        n = rnd.randint(a, C) if r % 4 else C  # some at the full width
        keep = 0 if r % 5 == 3 else rnd.randint(1, min(n, kmax)) if n else 0
        k0.append(a), e0.append(e), count.append(n), k1.append(keep)
    pages = -(-(max(e0) + C) // bs) + 1
    ids = list(range(1, R * pages + 1))
    rnd.shuffle(ids)
    table = torch.tensor(ids, dtype=torch.int32).view(R, pages)
    cache = random_pages(layout, H, R * pages + 1, seed)
    g = torch.Generator().manual_seed(seed)
    sv = score_view(cache, layout)
    sv.copy_(scores(sv.shape, g))
    cols = [torch.tensor(x)[:, None] for x in (k0, e0, count, k1)]
    return layout, table, cache, cols


SCORE_KINDS = {
    # few distinct values: ties at the threshold in most rows
    "ties": lambda shape, g: torch.randint(0, 3, shape, generator=g).float(),
    # accumulated attention mass: non-negative, spread over magnitudes
    "mass": lambda shape, g: torch.rand(shape, generator=g) ** 4 * 10,
    # any finite value (the kernel's keys order negative scores too)
    "signed": lambda shape, g: torch.randn(shape, generator=g) * 1e3,
}


@pytest.mark.parametrize("kind", sorted(SCORE_KINDS))
@pytest.mark.parametrize("bs,H,R,C,kmax", [(16, 2, 9, 40, 28), (32, 8, 6, 100, 70),
                                          (16, 1, 12, 16, 16), (64, 2, 5, 200, 150)])
def test_selection_is_the_stable_sort(kind, bs, H, R, C, kmax):
    """Byte for byte the cache of the reference's selection and compaction:
    each head keeps its ``k1`` best candidates (an equal score keeping the
    later token), requests keeping nothing untouched."""
    layout, table, cache, cols = _batch(bs, H, R, C, kmax, SCORE_KINDS[kind], seed=bs + H + R)
    dev = [x.to(DEVICE) for x in cols]
    want = cache.clone().to(DEVICE)
    h2o_ref.select_and_compact(want, layout, table.to(DEVICE), *dev, C, kmax)
    got = cache.clone().to(DEVICE)
    triton_select_and_compact(got, layout, table.to(DEVICE), *dev, C, kmax)
    got, want = got.cpu(), want.cpu()
    assert not torch.equal(want, cache)
    bad = (got != want).nonzero()
    assert bad.shape[0] == 0, f"{bad.shape[0]} bytes differ, first {bad[:4].tolist()}"


@pytest.mark.parametrize("bits,axis,G,bs,H,method", CASES, ids=IDS)
def test_batched_steps_with_the_kernel_are_the_per_request_steps(monkeypatch, bits, axis, G,
                                                                  bs, H, method):
    """``evict_steps`` and ``evict_decode_rows`` with ``KVCOMP_SELECT_KERNEL=1``
    (and the rows' steps found by torch ops, ``KVCOMP_DECODE_ROWS_KERNEL=0``:
    test_eviction_graphs covers the rows worked out in the launch) leave the
    bytes of ``evict_step`` request by request (every format's compaction
    after the kernel's selection)."""
    from test_eviction_batch import _setup
    from test_eviction_graphs import _decode_rows

    from vllm_kvcomp.kernels.triton_compaction import triton_compact

    monkeypatch.setenv(SELECT_KERNEL_ENV, "1")
    monkeypatch.setenv(DECODE_ROWS_KERNEL_ENV, "0")
    assert eviction_gpu.selector() is triton_select_and_compact
    cfg, layout, steps, table, cache, rows = _setup(bits, axis, G, bs, H, method, seed=bs + H)
    decodes = _decode_rows(cfg, bs)
    table = table.to(DEVICE)
    want = cache.clone().to(DEVICE)
    for r, (start, n, P) in zip(rows, steps):
        h2o_ref.evict_step(want, layout, cfg, table[r], start, n, P, torch.bfloat16,
                           compact=triton_compact, on_device=True)
    got = cache.clone().to(DEVICE)
    h2o_ref.evict_steps(got, layout, cfg, table, rows, *zip(*steps), torch.bfloat16,
                        select=eviction_gpu.selector())
    assert torch.equal(got.cpu(), want.cpu()) and not torch.equal(want.cpu(), cache)
    # one-token decodes, each row its own pages (the first rows of the table)
    n_rows = min(len(decodes), table.shape[0])
    want = cache.clone().to(DEVICE)
    for r, (start, n, P) in enumerate(decodes[:n_rows]):
        if table.shape[1] * bs >= n:
            h2o_ref.evict_step(want, layout, cfg, table[r], start, n, P, torch.bfloat16,
                               compact=triton_compact, on_device=True)
    got = cache.clone().to(DEVICE)
    fits = [(s, n, P) if table.shape[1] * bs >= n else (0, 0, 1) for s, n, P in decodes[:n_rows]]
    i32 = dict(dtype=torch.int32, device=DEVICE)
    eviction_gpu.evict_decode_rows(got, layout, cfg, table[:n_rows],
                                   torch.tensor([n for _, n, _ in fits], **i32),
                                   torch.tensor([P for _, _, P in fits], **i32))
    assert torch.equal(got.cpu(), want.cpu())


def test_a_selection_past_the_launch_bound_is_sorted(monkeypatch):
    """More candidates than ``MAX_CANDIDATES`` (a prompt's last chunk can bring
    its whole length) go to the reference's sort, not to a launch whose block
    would hold them all."""
    from vllm_kvcomp.kernels import triton_select

    calls = []
    monkeypatch.setattr(h2o_ref, "select_and_compact", lambda *a: calls.append(a[-2:]))
    monkeypatch.setattr(triton_select, "_kvcomp_select_kernel", None)  # never launched
    layout, table, cache, cols = _batch(16, 2, 3, 48, 32, SCORE_KINDS["ties"], seed=1)
    C = triton_select.MAX_CANDIDATES + 1
    triton_select_and_compact(cache, layout, table, *cols, C, 32)
    assert calls == [(C, 32)]


def test_selection_kernel_serves_unless_switched_off(monkeypatch):
    """The Triton selection serves unless ``KVCOMP_SELECT_KERNEL=0``."""
    monkeypatch.delenv(SELECT_KERNEL_ENV, raising=False)
    assert eviction_gpu.selector() is triton_select_and_compact
    monkeypatch.setenv(SELECT_KERNEL_ENV, "0")
    assert eviction_gpu.selector() is h2o_ref.select_and_compact

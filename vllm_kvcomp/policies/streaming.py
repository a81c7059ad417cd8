"""StreamingLLM eviction: attention sinks plus a window of recent tokens.

Xiao, Tian, Chen, Han, Lewis, "Efficient Streaming Language Models with
Attention Sinks" (ICLR 2024, arXiv:2309.17453): a model keeps working when its
cache holds only the first few tokens of the sequence (the "attention sinks",
which absorb the attention mass that softmax must put somewhere) and the most
recent ones; everything in between can be dropped, for every head alike.

Here the cache is paged, and what is given back to vLLM's pool is whole packed
pages, so the kept ranges are rounded outwards to page boundaries: a kept token
is never dropped, and a dropped page never holds a token that some query still
reads. Keys are cached after RoPE, so positions stay the true ones and nothing
is re-rotated.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_kvcomp.config import check_positive_ints


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class StreamingLLM:
    """Which packed positions a query still sees under StreamingLLM eviction.

    sink_tokens (S): the first S tokens of the sequence are kept for good.
    recent_tokens (R): the last R tokens of the sequence, the query's own
        token included, are kept.
    block_size: tokens per packed page; only whole pages are dropped.

    For a query whose sequence holds ``n`` tokens (its own included) and
    which reads packed positions ``[0, q)`` (the rest of the sequence is in
    the full-precision residual window or fresh, always visible), the dropped
    positions are the pages

        ``[ceil(S / bs) * bs,  floor(min(n - R, q) / bs) * bs)``

    i.e. the sink range rounded up to a whole page, the recent range extended
    down to a page boundary, and never above the page that ``q`` falls in.
    That last bound matters because the page holding position ``q`` is still
    being filled (the hand-over writes into it); dropping it would hand a
    page still written to back to the pool. Everything in ``[0, q)`` outside the
    dropped pages is visible. Both ends grow with ``n`` and ``q``, so a page
    dropped for some query is dropped for every later one: what the block
    manager frees for the processed tokens is never read again.
    """

    sink_tokens: int
    recent_tokens: int
    block_size: int

    def __post_init__(self) -> None:
        check_positive_ints(self, ("sink_tokens", "recent_tokens", "block_size"), "StreamingLLM")

    @property
    def sink_pages(self) -> int:
        """Pages ``[0, sink_pages)`` are never dropped."""
        return _cdiv(self.sink_tokens, self.block_size)

    def dropped_pages(self, n: int, q: int) -> tuple[int, int]:
        """Page range ``[lo, hi)`` dropped (``lo >= hi``: none); see the class."""
        bs = self.block_size
        hi = max(0, min(n - self.recent_tokens, q)) // bs
        return self.sink_pages, max(self.sink_pages, hi)

    def dropped(self, n: int, q: int) -> tuple[int, int]:
        """Position range ``[lo, hi)`` dropped (empty when ``lo == hi``)."""
        lo, hi = self.dropped_pages(n, q)
        return lo * self.block_size, hi * self.block_size

    def kept_ranges(self, n: int, q: int) -> list[tuple[int, int]]:
        """Visible packed positions within ``[0, q)``: sorted, disjoint,
        non-empty half-open ranges."""
        lo, hi = self.dropped(n, q)
        ranges = [(0, min(lo, q)), (max(hi, lo), q)] if hi > lo else [(0, q)]
        return [(a, b) for a, b in ranges if b > a]

    def max_held_pages(self, extra_tokens: int) -> int:
        """Packed pages a request holds at most when the pages below the
        recent range lag ``extra_tokens`` behind the newest written token
        (recent window, residual window and the tokens of unsettled steps)."""
        return self.sink_pages + _cdiv(extra_tokens + self.block_size - 1, self.block_size)

"""Prompt builders and scoring shared by training, the harness and the tests.

Everything here works on token ids and is pure (no model, no engine), so the
training data and the evaluation prompts are built the same way, and the
tests can check it quickly.

Prompts are assembled from pieces encoded separately. Each piece after the
first starts with a space and every haystack cut sits just after a
sentence-ending token, so -- with a byte-level BPE that splits before spaces
-- the concatenation is the token sequence the tokenizer would give for the
whole text (``tests/test_quality.py`` checks this on the trained tokenizer).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

PASSKEY_INTRO = ("There is a pass key hidden inside a lot of irrelevant text. "
                 "Find it and remember it. I will ask you for the pass key.")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
KEY_DIGITS = 5

KV_INTRO = "Some secret numbers are hidden in the text below. Remember every one of them."
KV_NEEDLE = " The secret number of the {word} is {key}."
KV_QUESTION = " The secret number of the {word} is"
KV_WORDS = (
    "apple anchor arrow badge barrel basket bell bridge bucket button cabin candle canoe "
    "carpet castle cherry clock cloud compass copper crown crystal desert diamond dragon "
    "drum eagle engine falcon feather fiddle forest fountain garden glacier globe harbor "
    "helmet hammer island jacket kettle ladder lantern lemon letter lion magnet maple marble "
    "meadow mirror needle ocean orchard otter palace pepper pillow planet pocket pond rabbit "
    "river rocket saddle sail shadow shield silver spider spoon stone sugar summit tiger "
    "tower tractor trumpet tunnel turtle valley velvet violin wagon walnut whale window "
    "wizard zebra"
).split()

Encode = Callable[[str], list]


def random_key(rng: random.Random, digits: int = KEY_DIGITS) -> str:
    """A pass key of ``digits`` digits, no leading zero."""
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def sentence_end_ids(vocab: dict) -> set:
    """Ids of tokens that end a sentence (their text ends in . ! or ?).

    ``vocab`` maps token strings (byte-level, as ``tokenizer.get_vocab()``)
    to ids."""
    return {i for t, i in vocab.items() if t and t[-1] in ".!?"}


def boundaries(ids: Sequence[int], ends: set) -> list:
    """Positions p (0 < p <= len) such that ids[p-1] ends a sentence: a piece
    cut at p starts a new sentence."""
    return [p + 1 for p, t in enumerate(ids) if t in ends]


@dataclass
class Haystack:
    """A long token stream of real text and its sentence boundaries."""

    ids: list
    ends: set

    def __post_init__(self):
        self.cuts = boundaries(self.ids, self.ends)

    def window(self, rng: random.Random, max_len: int) -> list:
        """Up to ``max_len`` tokens that start and end at sentence boundaries
        (the stream is read cyclically when it is shorter than asked)."""
        import bisect

        if max_len <= 0 or not self.cuts:
            return []
        start = self.cuts[rng.randrange(len(self.cuts))] % len(self.ids)
        out = []
        pos = start
        while len(out) < max_len:
            take = self.ids[pos:pos + max_len - len(out)]
            out.extend(take)
            pos = 0
            if len(take) == 0:
                break
        # cut back to the last sentence end inside the window
        local = boundaries(out, self.ends)
        j = bisect.bisect_right(local, max_len) - 1
        return out[:local[j]] if j >= 0 else out


def insert_at_depth(filler: list, piece: list, depth: float, ends: set) -> tuple:
    """Insert ``piece`` into ``filler`` at the sentence boundary nearest to
    ``depth`` (0 = start, 1 = end). Returns (ids, insertion position)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} outside [0, 1]")
    cands = [0] + boundaries(filler, ends)
    if cands[-1] != len(filler):
        cands.append(len(filler))
    target = depth * len(filler)
    pos = min(cands, key=lambda c: (abs(c - target), c))
    return filler[:pos] + list(piece) + filler[pos:], pos


@dataclass
class PasskeyPrompt:
    ids: list          # prompt token ids (with BOS)
    key: str           # the answer
    answer_ids: list   # tokens the model should generate (" 12345")
    needle_pos: int    # token index where the needle starts
    depth: float
    context: int


def build_passkey(encode: Encode, hay: Haystack, context: int, depth: float, key: str,
                  rng: random.Random, bos_id: int | None = 0) -> PasskeyPrompt:
    """A passkey-retrieval prompt of at most ``context`` tokens: intro, real
    text with the needle at ``depth``, question. The answer is ``" " + key``."""
    head = ([bos_id] if bos_id is not None else []) + encode(PASSKEY_INTRO)
    needle = encode(PASSKEY_NEEDLE.format(key=key))
    question = encode(PASSKEY_QUESTION)
    budget = context - len(head) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"context {context} too short for a passkey prompt")
    filler = hay.window(rng, budget)
    body, pos = insert_at_depth(filler, needle, depth, hay.ends)
    ids = head + body + question
    return PasskeyPrompt(ids=ids, key=key, answer_ids=encode(" " + key),
                         needle_pos=len(head) + pos, depth=depth, context=context)


def build_kv_retrieval(encode: Encode, hay: Haystack, length: int, rng: random.Random,
                       n_pairs: int = 8, n_questions: int = 4,
                       bos_id: int | None = 0) -> tuple:
    """Training sequence: ``n_pairs`` "secret number of the <word>" needles
    spread through real text, then ``n_questions`` of them asked and
    answered. Returns (ids, answers) with answers = list of (word, key)."""
    words = rng.sample(KV_WORDS, n_pairs)
    keys = [random_key(rng) for _ in words]
    qa = []
    for j in rng.sample(range(n_pairs), n_questions):
        qa += encode(KV_QUESTION.format(word=words[j]) + " " + keys[j] + ".")
    head = ([bos_id] if bos_id is not None else []) + encode(KV_INTRO)
    needles = [encode(KV_NEEDLE.format(word=w, key=k)) for w, k in zip(words, keys)]
    budget = length - len(head) - len(qa) - sum(map(len, needles))
    body = hay.window(rng, max(budget, 0))
    for needle in needles:
        body, _ = insert_at_depth(body, needle, rng.random(), hay.ends)
    return head + body + qa, list(zip(words, keys))


# ---------------------------------------------------------------- scoring
_DIGITS = re.compile(r"\s*(\d+)")


def passkey_correct(generated: str, key: str) -> bool:
    """Exact match: the generation starts (after spaces) with exactly the
    key's digits -- no digit missing, none extra."""
    m = _DIGITS.match(generated)
    return bool(m) and m.group(1) == key


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where the token sequences differ (a
    length difference counts at the shorter length); None if identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def match_rate(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of positions 0..max(len)-1 where both have the same token."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    return sum(1 for x, y in zip(a, b) if x == y) / n


def perplexity(logprobs: Sequence[Sequence[float | None]], start: int = 1,
               stop: int | None = None) -> float:
    """exp of the mean negative log-likelihood over positions [start, stop)
    of every sequence (``None`` entries -- the first token -- are skipped)."""
    total, n = 0.0, 0
    for seq in logprobs:
        for lp in seq[start:stop]:
            if lp is not None:
                total -= lp
                n += 1
    if n == 0:
        raise ValueError("no log-probabilities in range")
    return math.exp(total / n)


def text_windows(ids: Sequence[int], length: int, count: int, bos_id: int | None = 0) -> list:
    """``count`` non-overlapping windows of ``length`` tokens (BOS included)
    spread evenly over the stream ``ids``; fewer if the stream is short."""
    body = length - (1 if bos_id is not None else 0)
    n = min(count, len(ids) // body)
    if n == 0:
        return []
    stride = len(ids) // n
    pre = [bos_id] if bos_id is not None else []
    return [pre + list(ids[i * stride:i * stride + body]) for i in range(n)]

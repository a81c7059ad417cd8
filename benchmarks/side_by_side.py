"""The all-format table (W1 / W2 / W4 x KV formats) from recorded end-to-end runs.

A GPU session's device time holds a few workload runs, not all of them, so the table is
put together from the ``e2e.json`` files under ``benchmarks/results/``: for each setting and
workload, the newest complete run on the named card at vLLM's default engine settings
(runs with ``--fast-start`` are left out), with the folder it came from. A setting's cell takes runs of any setting that resolves to the same
engine (kvcomp settings whose config comes out equal once the defaults fill it in, e.g. the
window layout a default now has, measured under its own name before it became the default).
Ratios are against
bf16 on the same card; where bf16's run is from another day, the table says so, since the
code under test may have changed in between.

    python benchmarks/side_by_side.py --device H200 --since 2026-12-04 > table.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ("bf16,fp8,int4_per_token_head,turboquant_k3v4_nc,turboquant_4bit_nc,"
           "kvcomp_k4v4,kvcomp_k2v2,kvcomp_k4v2_g32")


def complete_runs(results: Path, device: str, since: str):
    """(folder, date, row) of every finished run at vLLM's default engine settings on a
    card whose name holds ``device``, oldest folder first."""
    for path in sorted(results.glob("*/e2e.json")):
        run = json.loads(path.read_text())
        if device.lower() not in run.get("device", "").lower() or "--fast-start" in run.get(
                "command", "") or run.get("date", "") < since:
            continue
        for row in run["rows"]:
            if row.get("output_tok_s") and row.get("completed") == row.get("requests"):
                yield path.parent.name, run["date"], row


def engine_key(setting: str) -> str:
    """What a bench_e2e setting starts: its settings with the kvcomp config as the
    backend resolves it (unknown names stand for themselves)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_e2e import SETTINGS

    from vllm_kvcomp.config import KvcompConfig
    spec = SETTINGS.get(setting)
    if spec is None:
        return setting
    spec = json.loads(json.dumps(spec))
    kvcomp = spec.get("additional_config", {}).pop("kvcomp", None)
    if kvcomp is not None:
        spec["kvcomp"] = repr(KvcompConfig(**kvcomp))
    return json.dumps(spec, sort_keys=True)


def newest(results: Path, device: str, since: str) -> dict:
    """{(engine_key, workload): (folder, date, row)}, the newest run of each engine."""
    table = {}
    for folder, date, row in complete_runs(results, device, since):
        table[engine_key(row["setting"]), row["workload"]] = (folder, date, row)
    return table


def render(table: dict, settings: list[str], workloads: list[str]) -> str:
    out = []
    for w in workloads:
        base = table.get((engine_key("bf16"), w))
        out += [f"### {w}", "",
                "| setting | KV tokens | output tok/s | vs bf16 | TTFT p50/p99 s "
                "| TPOT p50/p99 ms | run |",
                "|---|---|---|---|---|---|---|"]
        for s in settings:
            if (engine_key(s), w) not in table:
                out.append(f"| {s} | | not measured | | | | |")
                continue
            folder, date, r = table[engine_key(s), w]
            if r["setting"] != s:
                folder_note = f" as {r['setting']}"
            else:
                folder_note = ""
            ratio = ""
            if base is not None:
                ratio = f"{r['output_tok_s'] / base[2]['output_tok_s']:.2f}x"
                if base[1] != date:
                    ratio += f" (bf16 of {base[1]})"
            out.append(
                f"| {s} | {r['kv_cache_tokens']:,} | {r['output_tok_s']:,.0f} | {ratio} "
                f"| {r['ttft_p50']:.2f}/{r['ttft_p99']:.2f} "
                f"| {1e3 * r['tpot_p50']:.1f}/{1e3 * r['tpot_p99']:.1f} "
                f"| [{date}]({folder}/README.md){folder_note} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", required=True, help="part of the card's name, e.g. H200")
    ap.add_argument("--since", default="", help="oldest run date taken (YYYY-MM-DD): the "
                                                "day the defaults under test came in")
    ap.add_argument("--settings", default=FORMATS, help="comma list, in table order")
    ap.add_argument("--workloads", default="W1,W2,W4")
    ap.add_argument("--results", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    table = newest(a.results, a.device, a.since)
    print(f"{a.device}, vLLM's default engine settings, runs since {a.since or 'the first'}; "
          "each cell the newest complete run, ratios against bf16 on the same card.\n")
    print(render(table, a.settings.split(","), a.workloads.split(",")))


if __name__ == "__main__":
    main()

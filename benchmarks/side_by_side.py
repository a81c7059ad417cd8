"""The all-format table (W1 / W2 / W4 x KV formats) from recorded end-to-end runs.

Each workload run takes minutes of GPU time (W4: 4-30 per format), so the runs come on
different days and the table is put together from the ``e2e.json`` / ``e2e2.json`` files
under ``benchmarks/results/``: for each setting and workload, the newest complete run on the
named card with vLLM's default engine settings (runs with ``--fast-start``, ``--eager``,
``--capture-sizes``, ``--profile`` or ``--layers``, or another KV size or sequence cap, are
left out), with the folder it came from. Where no complete run exists, the newest cut run
(``bench_e2e.py --cut-after S``: output tok/s over its first S seconds) fills the cell, marked
as such. It is not a whole run's rate: in W4, once the cut is well past the first seconds of
prefill, a whole run's rate is usually lower, since its steps grow slower as contexts grow,
the pool fills and the last requests run at small batches.

A cell takes the run of any setting that started the same engine (``bench_e2e.
engine_identity``: engine arguments, the kvcomp config with its defaults filled in, the
KVCOMP_ switches that act on it, whether eviction's decode steps are captured), e.g. a
window layout measured under its own name before it became the
default. Rows record that identity when they run; for older rows it is worked out from
their setting's name as this checkout defines it, which holds only since the day the
defaults under test came in: ``--since``, below which such rows are left out.
Ratios are against bf16 on the same card; where bf16's run is from another day, the
table says so, since the code under test may have changed in between.

    python benchmarks/side_by_side.py --device H200 --since 2026-12-04 > table.md
    python benchmarks/side_by_side.py --device H100,H200 --since 2026-12-04 \
        > benchmarks/results/all-formats.md
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import SETTINGS, comparable_identity, engine_identity  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ("bf16,fp8,int4_per_token_head,turboquant_k3v4_nc,turboquant_4bit_nc,"
           "kvcomp_k4v4,kvcomp_k2v2,kvcomp_k4v2_g32")
# flags that make a run something other than vLLM's default engine settings
NOT_DEFAULT = ("--fast-start", "--eager", "--capture-sizes", "--profile", "--layers")


def _flag(command: str, name: str) -> str | None:
    m = re.search(rf"{name}[ =](\S+)", command)
    return m.group(1) if m else None


def default_runs(results: Path, device: str, kv_gib: float, max_num_seqs: int):
    """(folder, date, e2e.json) of the runs on a card whose name holds ``device`` at
    vLLM's default engine settings with this KV size and sequence cap."""
    for path in sorted([*results.glob("*/e2e.json"), *results.glob("*/e2e2.json")]):
        run = json.loads(path.read_text())
        cmd = run.get("command", "")
        if (device.lower() in run.get("device", "").lower()
                and not any(flag in cmd.split() for flag in NOT_DEFAULT)
                and _flag(cmd, "--kv-gib") is not None
                and float(_flag(cmd, "--kv-gib")) == kv_gib
                and int(_flag(cmd, "--max-num-seqs") or 0) == max_num_seqs):
            yield path.parent.name, run["date"], run


def _whole(row: dict) -> bool:
    """Whether every request of ``row``'s run finished (else it was cut)."""
    return row.get("completed") == row.get("requests")


def newest(results: Path, device: str, since: str, kv_gib: float = 54.3,
           max_num_seqs: int = 512) -> dict:
    """{(engine identity, workload): (folder, date, row)}: the newest complete run of
    each engine (by date, then the time a row finished where recorded, then folder),
    else its newest cut run."""
    found = []
    for folder, date, run in default_runs(results, device, kv_gib, max_num_seqs):
        for row in run["rows"]:
            whole = _whole(row)
            # a run stopped at its deadline (bench_e2e.py --cut-after) fills a cell
            # that no whole run fills; one cut by --timeout tells no rate
            if not row.get("output_tok_s") or not (whole or row.get("cut_after_s")):
                continue
            engine = row.get("engine")
            if engine is not None:
                engine = comparable_identity(engine)
            else:
                if date < since or row["setting"] not in SETTINGS:
                    continue
                engine = engine_identity(row["setting"])
            found.append(((whole, date, row.get("finished", ""), folder),
                          (engine, row["workload"]), (folder, date, row)))
    found.sort(key=lambda f: f[0])
    return {key: cell for _, key, cell in found}


def _num(x, fmt: str, scale: float = 1.0) -> str:
    return "?" if x is None else format(scale * x, fmt)


def render(table: dict, settings: list[str], workloads: list[str]) -> str:
    out = []
    for w in workloads:
        base = table.get((engine_identity("bf16"), w))
        out += [f"### {w}", "",
                "| setting | KV tokens | output tok/s | vs bf16 | TTFT p50/p99 s "
                "| TPOT p50/p99 ms | run |",
                "|---|---|---|---|---|---|---|"]
        for s in settings:
            cell = table.get((engine_identity(s), w))
            if cell is None:
                out.append(f"| {s} | | not measured | | | | |")
                continue
            folder, date, r = cell
            cut = not _whole(r)
            ratio = ""
            if base is not None:
                ratio = f"{r['output_tok_s'] / base[2]['output_tok_s']:.2f}x"
                if base[1] != date:
                    ratio += f" (bf16 of {base[1]})"
                if cut:
                    ratio += " (cut run)"
                if base is not cell and not _whole(base[2]):
                    ratio += " (bf16 cut)"
            rate = f"{r['output_tok_s']:,.0f}"
            if cut:
                rate += (f" over the first {r['cut_after_s']:g} s "
                         f"({r['completed']}/{r['requests']} done)")
            named = f" as {r['setting']}" if r["setting"] != s else ""
            out.append(
                f"| {s} | {_num(r.get('kv_cache_tokens'), ',.0f')} "
                f"| {rate} | {ratio} "
                f"| {_num(r.get('ttft_p50'), '.2f')}/{_num(r.get('ttft_p99'), '.2f')} "
                f"| {_num(r.get('tpot_p50'), '.1f', 1e3)}/{_num(r.get('tpot_p99'), '.1f', 1e3)} "
                f"| [{date}]({folder}/README.md){named} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", required=True,
                    help="part of the card's name, e.g. H200; a comma list: a section each")
    ap.add_argument("--since", required=True,
                    help="YYYY-MM-DD: the day the defaults under test came in; older rows "
                         "that do not record their engine are left out")
    ap.add_argument("--settings", default=FORMATS, help="comma list, in table order")
    ap.add_argument("--workloads", default="W1,W2,W4")
    ap.add_argument("--kv-gib", type=float, default=54.3)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--results", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    devices = a.device.split(",")
    if len(devices) > 1:
        print("# The all-format table, as the recorded runs have it\n\n"
              f"`python benchmarks/side_by_side.py {' '.join(argv or sys.argv[1:])}`; "
              "\"not measured\": no complete or cut run at vLLM's default engine settings on "
              "that card.\n")
    for device in devices:
        table = newest(a.results, device, a.since, a.kv_gib, a.max_num_seqs)
        if len(devices) > 1:
            print(f"## {device}\n")
        print(f"{device}, vLLM's default engine settings, {a.kv_gib:g} GiB of KV, "
              f"max_num_seqs {a.max_num_seqs}, runs since {a.since} (and later rows that record "
              "their engine); each cell the newest complete run of the engine the setting "
              "starts, else its newest cut run (marked), ratios against bf16 on the same "
              "card.\n")
        print(render(table, a.settings.split(","), a.workloads.split(",")))


if __name__ == "__main__":
    main()

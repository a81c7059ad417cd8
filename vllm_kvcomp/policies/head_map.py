"""Head maps: which (layer, KV head) is a retrieval head and which a streaming head.

A retrieval head attends to the whole context and keeps its whole KV cache; a
streaming head attends only to the first ``sink_tokens`` and the last
``recent_tokens`` tokens, so its cache stays bounded (DuoAttention, Xiao et al.
2024; RazorAttention, Tang et al. 2024).

Files (text only; pickles are refused, whatever their name):

- DuoAttention's ``full_attention_heads.tsv``: tab-separated, one row per layer,
  one column per KV head, gate values in [0, 1] (higher = more retrieval).
  Lines starting with ``#`` are comments.
- JSON, either explicit roles or gates, with optional metadata::

      {"layers": [["retrieval", "streaming", ...], ...]}
      {"gates": [[0.93, 0.02, ...], ...], "model": "...", "num_layers": 32,
       "num_kv_heads": 8, "method": "duo", "sink_tokens": 64, "recent_tokens": 256}

  ``calibration`` may hold anything the calibration wants to record (its
  options, raw scores); it is not interpreted.

Thresholding a gate map at ``streaming_ratio`` r (DuoAttention's deployment
rule, a quantile over all heads): the ``round(r * N)`` entries (rounded half up)
with the lowest gates among all N (layer, KV head) entries are streaming, ties
broken by layer then head order. A roles map is taken as written and r is not
used.

Serving (``served_split``) needs the same number of streaming heads in every
layer: vLLM gives each KV cache group one page shape, so per-layer counts would
need a group per count. A gate map is therefore thresholded per layer for
serving (each layer streams its ``round(r * heads)`` lowest gates), and a roles
map must already have equal counts. Under tensor parallelism each rank serves
the entries of its own KV heads (``rank_split``), and every rank must stream as
many heads as the others in every layer.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

RETRIEVAL = "retrieval"
STREAMING = "streaming"
ROLES = (RETRIEVAL, STREAMING)
METADATA_KEYS = ("model", "num_layers", "num_kv_heads", "method", "sink_tokens",
                 "recent_tokens", "calibration")

# protocol 2+ pickles start with PROTO (0x80); torch.save zips start with "PK"
_BINARY_MAGIC = (b"\x80", b"PK\x03\x04")
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".npy", ".npz", ".joblib")


class HeadMapError(ValueError):
    """A head-map file that cannot be read, or does not fit the model."""


@dataclass(frozen=True)
class HeadMap:
    """Per (layer, KV head): explicit ``roles`` or gate scores ``gates``.

    Exactly one of ``roles`` / ``gates`` is set; both are tuples of rows, one row
    per layer, one entry per KV head. ``metadata`` holds the file's other keys.
    """

    roles: tuple[tuple[str, ...], ...] | None = None
    gates: tuple[tuple[float, ...], ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"

    @property
    def table(self) -> tuple[tuple, ...]:
        return self.roles if self.roles is not None else self.gates

    @property
    def num_layers(self) -> int:
        return len(self.table)

    @property
    def num_kv_heads(self) -> int:
        return len(self.table[0])

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_layers, self.num_kv_heads

    def streaming(self, streaming_ratio: float) -> list[list[bool]]:
        """``True`` where a (layer, KV head) is a streaming head. ``streaming_ratio``
        thresholds gates (see the module docstring); a roles map ignores it."""
        if self.roles is not None:
            return [[r == STREAMING for r in row] for row in self.roles]
        return threshold_gates(self.gates, streaming_ratio)

    def roles_at(self, streaming_ratio: float) -> list[list[str]]:
        return [[STREAMING if s else RETRIEVAL for s in row]
                for row in self.streaming(streaming_ratio)]

    def check_model_shape(self, num_layers: int, num_kv_heads: int) -> None:
        if self.shape != (num_layers, num_kv_heads):
            raise HeadMapError(
                f"head map {self.source} has {self.num_layers} layers x {self.num_kv_heads} "
                f"KV heads but the model has {num_layers} layers x {num_kv_heads} KV heads")

    def to_json_dict(self) -> dict[str, Any]:
        body = ({"layers": [list(r) for r in self.roles]} if self.roles is not None
                else {"gates": [list(r) for r in self.gates]})
        meta = {k: v for k, v in self.metadata.items() if k != "calibration"}
        extra = {"calibration": self.metadata["calibration"]} if "calibration" in self.metadata else {}
        return {**meta, **body, **extra}


def threshold_gates(gates: Sequence[Sequence[float]], streaming_ratio: float) -> list[list[bool]]:
    """``True`` for the ``round(streaming_ratio * N)`` lowest gates (ties: the
    earlier layer, then the earlier head, turns streaming first)."""
    if isinstance(streaming_ratio, bool) or not 0.0 <= streaming_ratio <= 1.0:
        raise HeadMapError(f"streaming_ratio={streaming_ratio!r} must be in [0, 1]")
    heads = len(gates[0]) if gates else 0
    flat = [g for row in gates for g in row]
    k = math.floor(streaming_ratio * len(flat) + 0.5)
    order = sorted(range(len(flat)), key=lambda i: (flat[i], i))
    chosen = set(order[:k])
    return [[l * heads + h in chosen for h in range(heads)] for l in range(len(gates))]


@dataclass(frozen=True)
class HeadSplit:
    """The KV heads of each layer as served: ``retrieval[l]`` and ``streaming[l]``
    are sorted head indices, the same count in every layer."""

    retrieval: tuple[tuple[int, ...], ...]
    streaming: tuple[tuple[int, ...], ...]

    @property
    def num_retrieval(self) -> int:
        return len(self.retrieval[0])

    @property
    def num_streaming(self) -> int:
        return len(self.streaming[0])


def served_split(head_map: HeadMap, streaming_ratio: float) -> HeadSplit:
    """Per layer the same number of streaming heads (module docstring): a gate
    map's ``round(streaming_ratio * heads)`` lowest gates of each layer (ties:
    the earlier head), a roles map as written. A map that cannot be served
    (unequal counts, or no retrieval head left) is a ``HeadMapError``."""
    heads = head_map.num_kv_heads
    if head_map.roles is not None:
        streaming = head_map.streaming(streaming_ratio)
        counts = [sum(row) for row in streaming]
        if len(set(counts)) > 1:
            raise HeadMapError(
                f"head map {head_map.source} has different numbers of streaming heads per "
                f"layer ({counts}); serving needs the same number in every layer (one KV "
                "cache page shape per group): give every layer the same count, or write "
                "gates, which are thresholded per layer")
    else:
        if isinstance(streaming_ratio, bool) or not 0.0 <= streaming_ratio <= 1.0:
            raise HeadMapError(f"streaming_ratio={streaming_ratio!r} must be in [0, 1]")
        k = math.floor(streaming_ratio * heads + 0.5)
        streaming = []
        for row in head_map.gates:
            chosen = set(sorted(range(heads), key=lambda h: (row[h], h))[:k])
            streaming.append([h in chosen for h in range(heads)])
    if all(streaming[0]):
        raise HeadMapError(
            f"head map {head_map.source}: every KV head of every layer streams; serving "
            "keeps at least one retrieval head per layer (lower streaming_ratio)")
    return HeadSplit(
        retrieval=tuple(tuple(h for h in range(heads) if not row[h]) for row in streaming),
        streaming=tuple(tuple(h for h in range(heads) if row[h]) for row in streaming))


def rank_split(split: HeadSplit, rank: int, tp_size: int) -> HeadSplit:
    """The part of ``split`` that tensor-parallel rank ``rank`` of ``tp_size``
    serves: vLLM gives it KV heads ``[rank * n / tp_size, (rank + 1) * n /
    tp_size)``, renumbered from 0. Every rank's caches are allocated from one
    KV cache config, so each rank must stream the same number of heads in every
    layer; a map where they differ is a ``HeadMapError`` naming the counts."""
    heads = split.num_retrieval + split.num_streaming
    if tp_size == 1:
        return split
    if heads % tp_size:
        raise HeadMapError(
            f"{heads} KV heads cannot be split evenly over tensor_parallel_size={tp_size}")
    per = heads // tp_size
    if split.num_streaming % tp_size:
        raise HeadMapError(
            f"{split.num_streaming} streaming heads per layer cannot be split evenly over "
            f"tensor_parallel_size={tp_size}: each rank serves {per} KV heads and needs the "
            "same number of streaming heads in every layer")
    lo = rank * per

    def local(heads_of_layer):
        return tuple(h - lo for h in heads_of_layer if lo <= h < lo + per)

    sliced = HeadSplit(retrieval=tuple(local(r) for r in split.retrieval),
                       streaming=tuple(local(s) for s in split.streaming))
    counts = [len(s) for s in sliced.streaming]
    if len(set(counts)) > 1 or counts[0] != split.num_streaming // tp_size:
        raise HeadMapError(
            f"tensor-parallel rank {rank} (KV heads {lo}..{lo + per - 1}) would stream "
            f"{counts} heads per layer; every rank needs "
            f"{split.num_streaming // tp_size} streaming heads in every layer (one KV cache "
            "page shape for all ranks): reorder the map's heads or change the roles")
    return sliced


def check_ranks(split: HeadSplit, tp_size: int) -> None:
    """``rank_split`` for every rank: the map is servable at ``tp_size``."""
    for rank in range(tp_size):
        rank_split(split, rank, tp_size)


@lru_cache(maxsize=8)
def load_served_split(path: str, streaming_ratio: float, rank: int = 0,
                      tp_size: int = 1) -> HeadSplit:
    """``served_split`` of the map at ``path`` as tensor-parallel rank
    ``rank`` serves it, read once per process (every attention layer asks)."""
    return rank_split(served_split(load_head_map(path), streaming_ratio), rank, tp_size)


# ---------------------------------------------------------------- loading
def _reject_binary(path: str, head: bytes) -> None:
    if path.lower().endswith(_PICKLE_SUFFIXES) or head.startswith(_BINARY_MAGIC):
        raise HeadMapError(
            f"head map {path} looks like a pickle / binary file; head maps are read only "
            "from TSV (DuoAttention's full_attention_heads.tsv) or JSON, never unpickled")


def _gate(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise HeadMapError(f"{where}: gate {value!r} is not a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise HeadMapError(f"{where}: gate {value!r} is not a number") from None
    if not isinstance(value, (int, float)):
        raise HeadMapError(f"{where}: gate {value!r} is not a number")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also NaN
        raise HeadMapError(f"{where}: gate {value!r} is outside [0, 1]")
    return value


def _rectangular(rows: list, path: str, what: str) -> None:
    if not rows or not all(isinstance(r, (list, tuple)) for r in rows):
        raise HeadMapError(f"head map {path}: {what} must be a non-empty list of rows "
                           "(one per layer)")
    widths = {len(r) for r in rows}
    if 0 in widths or len(widths) != 1:
        raise HeadMapError(f"head map {path}: every layer needs the same number (>= 1) of "
                           f"KV heads; row lengths are {[len(r) for r in rows]}")


def parse_tsv(text: str, path: str = "<tsv>") -> HeadMap:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = line.strip().split("\t")
        rows.append(tuple(_gate(c.strip(), f"head map {path} line {lineno} column {j + 1}")
                          for j, c in enumerate(cells)))
    _rectangular(rows, path, "the TSV")
    return HeadMap(gates=tuple(rows), source=path)


def parse_json(obj: Any, path: str = "<json>") -> HeadMap:
    if not isinstance(obj, dict):
        raise HeadMapError(f"head map {path}: expected a JSON object with 'layers' or "
                           f"'gates', got {type(obj).__name__}")
    body = [k for k in ("layers", "gates") if k in obj]
    if len(body) != 1:
        raise HeadMapError(f"head map {path}: needs exactly one of 'layers' (roles) or "
                           f"'gates', found {body or 'neither'}")
    unknown = sorted(set(obj) - set(METADATA_KEYS) - {"layers", "gates"})
    if unknown:
        raise HeadMapError(f"head map {path}: unknown key(s) {unknown}; known: "
                           f"{['layers', 'gates', *METADATA_KEYS]}")
    rows = obj[body[0]]
    _rectangular(rows, path, f"'{body[0]}'")
    metadata = {k: obj[k] for k in METADATA_KEYS if k in obj}
    if body[0] == "layers":
        for l, row in enumerate(rows):
            for h, role in enumerate(row):
                if role not in ROLES:
                    raise HeadMapError(f"head map {path}: layer {l} KV head {h} has role "
                                       f"{role!r}; roles are {ROLES}")
        hm = HeadMap(roles=tuple(tuple(r) for r in rows), metadata=metadata, source=path)
    else:
        hm = HeadMap(gates=tuple(tuple(_gate(g, f"head map {path} layer {l} KV head {h}")
                                       for h, g in enumerate(row))
                                 for l, row in enumerate(rows)),
                     metadata=metadata, source=path)
    for key, n in (("num_layers", hm.num_layers), ("num_kv_heads", hm.num_kv_heads)):
        if key in metadata and metadata[key] != n:
            raise HeadMapError(f"head map {path}: {key}={metadata[key]!r} but the table has "
                               f"{n}")
    return hm


def load_head_map(path: str) -> HeadMap:
    """Read a head map from ``path``: ``.tsv`` as DuoAttention's format, anything
    else as JSON when it starts with ``{``, else as TSV."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise HeadMapError(f"head map {path} cannot be read: {e.strerror or e}") from None
    _reject_binary(path, raw[:4])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeadMapError(f"head map {path} is not UTF-8 text (TSV or JSON)") from None
    if not path.lower().endswith(".tsv") and text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise HeadMapError(f"head map {path} is not valid JSON: {e}") from None
        return parse_json(obj, path)
    return parse_tsv(text, path)


def dumps_head_map(head_map: HeadMap) -> str:
    """JSON with one line per key and one line per layer, to be read by hand."""
    lines = []
    for key, value in head_map.to_json_dict().items():
        if key in ("layers", "gates"):
            rows = ",\n  ".join(json.dumps([round(v, 6) if isinstance(v, float) else v
                                            for v in row]) for row in value)
            lines.append(f"{json.dumps(key)}: [\n  {rows}\n]")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def save_head_map(head_map: HeadMap, path: str) -> None:
    with open(path, "w") as f:
        f.write(dumps_head_map(head_map))

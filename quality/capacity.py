"""The KV capacity vLLM logs for a setting, against bf16, without starting an engine:
vLLM's own ``get_kv_cache_capacity`` (the number behind its "GPU KV cache size" line) on the
KV cache specs the backend registers (the packed pages and the window's sub-layer, async
scheduling's two unsettled steps), 128-token pages, for the Llama-3.1-8B shape on an H100's
54.3 GiB of KV and the CPU demo's tiny Llama on 1 GiB. The two shapes give the same ratio to
the third digit; the 8B shape's matches what GPU engines log (k4v4's 1,531,060 tokens at
``max_model_len`` 4096, logged on an H200).

    python -m quality.capacity --settings kvcomp_k4v2_r128_channel_g32_ring [--max-model-len 4096]

(``--max-model-len`` up to 65536, the tiny Llama's positions.)

Settings are the quality harness's names (``quality.evaluate``), so a grid's capacity and
its quality are of the same settings.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

# (layers, KV heads, KV memory): the CPU demo's tiny Llama on 1 GiB, and
# Llama-3.1-8B's shape on an H100's 54.3 GiB of KV
CAPACITY_SHAPES = {"tiny": (4, 2, 1 << 30), "llama8b": (32, 8, int(54.3 * (1 << 30)))}


def shape_specs(cfg, layers: int, heads: int, steps: int) -> dict:
    """Per-layer KV cache specs of a model shape (head size 128, 128-token
    pages, bf16): vLLM's full-attention spec where ``cfg`` (a ``KvcompConfig``)
    is None, else the packed spec and its window sub-layer for ``steps``
    unsettled steps."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_kvcomp.residual_layer import packed_spec, residual_spec

    if cfg is None:
        return {f"l.{i}": FullAttentionSpec(block_size=128, num_kv_heads=heads, head_size=128,
                                            dtype=torch.bfloat16) for i in range(layers)}
    packed = packed_spec(cfg, 128, heads, 128, torch.bfloat16)
    # the backend registers the window's sub-layer only for a setting that has a window
    res = residual_spec(packed, steps) if cfg.needs_residual_cache else None
    specs = {}
    for i in range(layers):
        specs[f"l.{i}"] = packed
        if res is not None:
            specs[f"l.{i}.kvcomp_residual"] = res
    return specs


def reported_tokens(vc, specs: dict, memory: int) -> int:
    """The capacity vLLM reports (``get_kv_cache_capacity``, behind its "GPU
    KV cache size" log line) for ``specs`` on ``memory`` bytes."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity, get_kv_cache_configs

    return get_kv_cache_capacity(vc, get_kv_cache_configs(vc, [specs], [memory])[0])[0]


def capacity_of(vc, cfg) -> dict:
    """{shape: the KV tokens vLLM reports} for ``cfg`` (None: vLLM's bf16 cache) on each of
    ``CAPACITY_SHAPES``, under the engine config ``vc``."""
    return {s: reported_tokens(vc, shape_specs(cfg, layers, heads, 2), memory)
            for s, (layers, heads, memory) in CAPACITY_SHAPES.items()}


def capacity_rows(names: list[str], max_model_len: int, model: str | None = None) -> list[dict]:
    """For each harness setting name (``quality.evaluate``'s aliases resolved: ``kvcomp_k4v4``
    is the harness's 128-token window by position, not the backend's k4v4 default): its KV
    tokens and ratio to bf16 on each shape. ``model``: a tiny Llama's folder (one is made in
    the temp dir without it), whose config sets vLLM's engine config."""
    from vllm.engine.arg_utils import EngineArgs

    import vllm_kvcomp
    from quality.evaluate import select_settings, settings_for
    from vllm_kvcomp.config import KvcompConfig
    from vllm_kvcomp.tiny_model import make_tiny_llama

    vllm_kvcomp.register()
    if model is None:
        model = make_tiny_llama(os.path.join(tempfile.gettempdir(), "kvcomp-capacity-tiny"))
    vc = EngineArgs(model=model, max_model_len=max_model_len, block_size=128,
                    max_num_batched_tokens=max(8192, max_model_len)).create_engine_config()
    # the harness's checks and names (it adds its baseline, which has no kvcomp setting)
    names = [n for n in select_settings(",".join(names), quick=False) if n != "baseline"]
    catalogue = settings_for(names)
    bf16 = capacity_of(vc, None)
    rows = []
    for name in names:
        kv = catalogue[name].get("kvcomp")
        if kv is None:
            raise SystemExit(f"{name}: not a kvcomp setting")
        # a head map's streaming sub-layer and the policies' freed pages are not modelled
        unmodelled = [k for k in ("head_map", "eviction", "quest") if kv.get(k) is not None]
        if unmodelled:
            raise SystemExit(f"{name}: capacity with {', '.join(unmodelled)} is not modelled "
                             "here (start an engine: its log line says it)")
        cfg = KvcompConfig(**kv)
        window = (f"{cfg.residual_tokens}..{cfg.residual_window}" if cfg.needs_residual_cache
                  else "none")
        row = {"setting": name, "window": window, **capacity_of(vc, cfg)}
        row.update({f"{s}_x": row[s] / bf16[s] for s in CAPACITY_SHAPES})
        rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", required=True, help="comma list of harness setting names")
    ap.add_argument("--max-model-len", type=int, default=4096)
    a = ap.parse_args(argv)
    print(f"KV capacity at max_model_len {a.max_model_len} (vLLM's get_kv_cache_capacity, "
          "128-token pages)\n")
    print("| setting | window (tokens) | 8B shape, 54.3 GiB | vs bf16 | tiny, 1 GiB | vs bf16 |")
    print("|---|---|---|---|---|---|")
    for r in capacity_rows(a.settings.split(","), a.max_model_len):
        print(f"| {r['setting']} | {r['window']} | {r['llama8b']:,} | {r['llama8b_x']:.3f}x "
              f"| {r['tiny']:,} | {r['tiny_x']:.3f}x |", flush=True)


if __name__ == "__main__":
    main()

"""The environment's say in how the GPU path launches: overrides of the
Triton kernels' launches, for a GPU the built-in launches were not tuned on,
and on/off switches between a path and its reference or its opt-in successor.

Parsed without importing Triton: ``validation.validate_vllm_config`` runs the
parsers and reads every switch in process 0, so a bad value stops start-up
with the variable's name before the kernel modules (which read the variables
when imported or when first launched) load.
"""

from __future__ import annotations

import os

from vllm_kvcomp.names import FORCE_TRITON_ENV

# the prefill kernel's (kernels/triton_prefill.py)
PREFILL_LAUNCH_ENV = "KVCOMP_PREFILL_LAUNCH"
PREFILL_LAUNCH_KEYS = ("block_rows", "block_n", "num_warps", "num_stages")

# the decode kernel's (kernels/decode_launch.py): its tile, warps, stages, warp
# tiles (``kvcomp_decode_attention``'s warp_tiles), register cap and split count.
# num_splits holds every step to one split-K count where decode_num_splits picks one per
# step from its batch and longest context (a captured step's from max_model_len): eager
# and captured steps then sum attention in the same order, what a token-for-token
# comparison of the two paths needs; it costs speed where the count does not suit a step
DECODE_LAUNCH_ENV = "KVCOMP_DECODE_LAUNCH"
DECODE_LAUNCH_KEYS = ("block_n", "num_warps", "num_stages", "warp_tiles", "max_registers",
                      "num_splits")
# "1": a GPU serves eviction methods whose engines have not yet run on a GPU
# (validation.GPU_RUN_EVICTION names those that have) with the Triton path
# (kernels/eviction_gpu.py); otherwise a GPU start-up refuses them
EVICTION_GPU_ENV = "KVCOMP_EVICTION_GPU"
# "0": the GPU path's SnapKV / H2O / A2SF walk every request of a step after each layer's
# attention; by default their host work is done once a step, for the requests
# it concerns (a prompt's observation window, a layout that moves), and the step's ranges
# and read width are shared across layers (kernels/eviction_gpu.py ``host_rows``): the
# same launches, so the same output (an H200 ran it:
# benchmarks/results/2026-12-04-h200-w4-eviction-rows)
EVICTION_ROWS_ENV = "KVCOMP_EVICTION_ROWS"
# "0": H2O / A2SF's decode scores are accumulated by the torch ops of
# eviction_gpu.add_decode_scores (the kernel's reference) instead of one Triton launch a layer
# (kernels/triton_scores.py), which an H200 ran: a third of the ops' time a layer
# (benchmarks/results/2026-12-05-h200-h2o-fused-graphs)
SCORE_KERNEL_ENV = "KVCOMP_SCORE_KERNEL"
# "0": a layer's H2O / A2SF eviction steps run request by request (a dozen small launches
# each) instead of as one batch for all of its evicting requests (h2o_ref.evict_steps, one
# compaction launch); the same bytes written; the batch ran on an H200 (same results)
EVICTION_BATCH_ENV = "KVCOMP_EVICTION_BATCH"
# "1": SnapKV / H2O / A2SF's decode steps are captured in CUDA graphs, their eviction as
# fixed-shape device work (eviction_gpu.graph_after_attention; a step holding a prompt's
# queries runs eagerly either way, patches/prompt_steps.py); "0": eager. Unset: captured for
# the settings an engine has served captured on a GPU (eviction_gpu.captured_by_default:
# H2O without a head map), eager for the others, with enforce_eager and with micro-batching
# (which start-up refuses with "1"). On an H100 and an H200 a captured H2O engine served the
# eager engine's tokens; where a prompt's one-token last chunk joins captured decodes, the
# two differ only by the split-K count (a captured step sizes it for max_model_len, an eager
# one for its longest request): at one count for both (KVCOMP_DECODE_LAUNCH num_splits) the
# tokens were equal (benchmarks/results/2026-12-05-h100-late-splits-w4-whole)
EVICTION_GRAPHS_ENV = "KVCOMP_EVICTION_GRAPHS"
# "0": H2O / A2SF's batched eviction steps select their kept tokens by a stable sort of
# every row's candidates instead of one Triton launch (kernels/triton_select.py: a program
# per request and KV head, returning at once where the request keeps nothing); the same
# kept tokens. On an H100 the launch took a captured layer's selection from 184 to 71 us
# (benchmarks/results/2026-12-05-h100-h2o-breakdown-w4-split50)
SELECT_KERNEL_ENV = "KVCOMP_SELECT_KERNEL"
# "0": a captured decode step's rows find their eviction steps (layouts before and after
# the step, which rows move) by about fifty elementwise torch launches a layer instead of
# inside that selection launch (triton_select.triton_select_decode_rows); the same bytes.
# On an H200 the launch took a captured layer's selection from 69 to 3.8 us when no row
# moves, 290 to 216 us when every row does, and an engine served the eager engine's
# tokens (benchmarks/results/2026-12-05-h200-late-rows-sweep-calibrate)
DECODE_ROWS_KERNEL_ENV = "KVCOMP_DECODE_ROWS_KERNEL"
# "0": the decode kernel normalises H2O / A2SF's probabilities in a pass of its own
# instead of leaving base-2 logits with each row's log-sum-exp (kvcomp_decode_attention's
# probs_lse) for the score accumulation to normalise as it reads: two of the four passes
# over them (~216 MB a layer at a batch of 256 and a 2048-token budget); on an H100 the
# scored decode went from 105 to 89 us a layer (same results folder)
SCORE_FROM_LOGITS_ENV = "KVCOMP_SCORE_FROM_LOGITS"
# "1": the store's hand-over in a program per piece (kernels/triton_store.py
# split_handover) where the caller leaves it unset (the serving path), for A/B runs of
# whole engines; untimed on a GPU so far
STORE_SPLIT_ENV = "KVCOMP_STORE_SPLIT"

# every on / off switch and its reading when unset or empty (KVCOMP_EVICTION_GRAPHS: not
# turned off; eviction_gpu.graph_eviction decides per setting)
SWITCH_DEFAULTS = {
    FORCE_TRITON_ENV: False,
    STORE_SPLIT_ENV: False,
    EVICTION_GPU_ENV: False,
    EVICTION_ROWS_ENV: True,
    SCORE_KERNEL_ENV: True,
    EVICTION_BATCH_ENV: True,
    EVICTION_GRAPHS_ENV: True,
    SELECT_KERNEL_ENV: True,
    DECODE_ROWS_KERNEL_ENV: True,
    SCORE_FROM_LOGITS_ENV: True,
}


# the switches that change nothing in an engine without eviction
EVICTION_SWITCHES = (EVICTION_GPU_ENV, EVICTION_ROWS_ENV, SCORE_KERNEL_ENV, EVICTION_BATCH_ENV,
                     EVICTION_GRAPHS_ENV, SELECT_KERNEL_ENV, DECODE_ROWS_KERNEL_ENV,
                     SCORE_FROM_LOGITS_ENV)


def _reading(var: str, environ) -> str:
    return (os.environ if environ is None else environ).get(var, "").strip()


def switch(var: str, environ=None) -> bool:
    """The on / off switch ``var`` (a key of ``SWITCH_DEFAULTS``) as it reads in
    ``environ`` (default: this process's environment): "1" on, "0" off, unset
    or empty its default; any other value raises a ValueError naming the
    variable, so a typo never silently serves the other path."""
    value = _reading(var, environ)
    if not value:
        return SWITCH_DEFAULTS[var]
    if value not in ("0", "1"):
        raise ValueError(f"{var}: expected 1 (on) or 0 (off), got {value!r}")
    return value == "1"


def switch_named(var: str, environ=None) -> bool:
    """Whether the user set ``var`` rather than leaving it to its default."""
    return bool(_reading(var, environ))


def check_switches() -> None:
    """Reads every switch, raising for the first bad value (start-up)."""
    for var in SWITCH_DEFAULTS:
        switch(var)


# the most decode splits a step takes: decode_num_splits's cap, and a named count's
MAX_DECODE_SPLITS = 64
# keys that take any positive count; the others are tile shapes / warp counts
_ANY_COUNT = ("num_stages", "max_registers", "num_splits")


def _parse_launch(spec: str, var: str, keys: tuple[str, ...]) -> dict[str, int]:
    launch = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, sep, val = (x.strip() for x in item.partition("="))
        if not sep or key not in keys:
            raise ValueError(f"{var}: expected {'|'.join(keys)}=<int>, got {item!r}")
        try:
            n = int(val)
        except ValueError:
            raise ValueError(f"{var}: {key} must be an integer, got {val!r}") from None
        if key in _ANY_COUNT and n < 1:
            raise ValueError(f"{var}: {key} must be >= 1, got {n}")
        if key == "num_splits" and n > MAX_DECODE_SPLITS:
            # partial outputs scale with it: 1024 at a captured batch of 512 is ~8 GB
            raise ValueError(f"{var}: num_splits must be <= {MAX_DECODE_SPLITS}, got {n}")
        if key not in _ANY_COUNT and (n < 1 or n & (n - 1)):
            raise ValueError(f"{var}: {key} must be a power of two, got {n}")
        launch[key] = n
    return launch


def parse_prefill_launch(spec: str, var: str = PREFILL_LAUNCH_ENV) -> dict[str, int]:
    """``"block_rows=128,block_n=64,num_warps=8,num_stages=3"`` (any subset of
    those keys; empty: none) -> dict of ints. ``block_rows``, ``block_n`` and
    ``num_warps`` must be powers of two (tile shapes / warp counts), and
    ``num_stages`` >= 1; anything else raises a ValueError naming ``var``."""
    return _parse_launch(spec, var, PREFILL_LAUNCH_KEYS)


def parse_decode_launch(spec: str, var: str = DECODE_LAUNCH_ENV) -> dict[str, int]:
    """``"warp_tiles=2,num_warps=2,num_stages=2"`` (any subset of
    ``DECODE_LAUNCH_KEYS``) -> dict of ints; ``num_stages``,
    ``max_registers`` and ``num_splits`` >= 1, the others powers of two; anything else raises a
    ValueError naming ``var``."""
    return _parse_launch(spec, var, DECODE_LAUNCH_KEYS)

"""Settings of the KVCOMP backend, read from ``additional_config["kvcomp"]``.

Every process (API server, engine core, workers) parses the same dict, so a
bad value fails in process 0 at start-up (see ``validate_vllm_config``) before
any memory is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

SUPPORTED_BITS = (2, 4, 8, 16)
KEY_AXES = ("channel", "token")
VALUE_AXES = ("token",)
FRESH_PREFILL = ("auto", "flash_attn", "triton")
PROMPT_ATTENTION = ("auto", "as_stored", "full_precision")
RESIDUAL_DTYPES = ("auto", "fp8_e4m3")
# largest finite float8 e4m3 (e4m3fn: no infinities); the window saturates there
FP8_E4M3_MAX = 448.0
EVICTION_METHODS = ("streamingllm", "snapkv", "h2o", "a2sf")
# the settings each method reads (besides "method"); any other is an error
EVICTION_SETTINGS = {
    "streamingllm": ("sink_tokens", "recent_tokens"),
    "snapkv": ("budget_tokens", "budget_ratio", "window", "kernel", "pooling"),
    "h2o": ("budget_tokens", "recent_tokens"),
    "a2sf": ("budget_tokens", "recent_tokens", "alpha"),
}
# methods that score tokens by the attention they accumulate during decode
SCORED_EVICTION = ("h2o", "a2sf")
# settings whose default follows the bits and the policies named (default_layout)
LAYOUT_DEFAULTED = ("group_size", "value_group_size", "residual_ring", "residual_dtype",
                    "residual_tokens")
SNAPKV_POOLING = ("avg", "max")


def _power_of_two_from_8(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, int) and x >= 8 and not x & (x - 1)


def default_residual_tokens(k_bits: Any, v_bits: Any) -> int:
    """The full-precision window a setting gets unless it names one: none for 4
    bits or more, where the harness finds it nearly free, KIVI's 128 below."""
    low = [b for b in (k_bits, v_bits) if isinstance(b, int) and b < 4]
    return 128 if low else 0


def default_layout(raw: dict[str, Any]) -> dict[str, Any]:
    """The packing and window settings a config gets for those it leaves
    unset (``None``).

    k4v4 and k2v2 with per-channel keys that name none of them get the
    layouts that reach 3.4x and 5.5x the bf16 KV capacity at
    ``max_model_len`` 4096 within the quality harness's bars
    (quality/results/2026-12-04-cpu-6m-window-defaults; served and logged at
    3.44x / 5.83x on an H200 with vLLM's default engine settings,
    benchmarks/results/2026-12-04-h200-window-defaults-quest):

    * k4v4: 64-token key groups, one value group a head, the window as a ring
      of 0..63 model-dtype tokens (+0.54 % perplexity at 2K and 4K, every
      passkey kept; prefix-cache hits on whole 64-token groups);
    * k2v2: a ring of 160..287 e4m3 tokens (+12.7 % against +18.4 % for the
      128-token window by position, as many passkeys). A ring that always
      holds a window gets no prefix-cache hits: ``residual_ring: false``
      keeps them, at 2.88x.

    Everything else starts from 128-token groups and the window by position
    in the model dtype: other bits, settings that name any of these (they
    choose their own layout) and settings with a head map, eviction or Quest
    (whose engines have served on a GPU with the window by position)."""
    k_bits, v_bits = raw.get("k_bits", 4), raw.get("v_bits", 4)
    out = {"group_size": 128, "value_group_size": None, "residual_ring": False,
           "residual_dtype": "auto", "residual_tokens": default_residual_tokens(k_bits, v_bits)}
    preset = (raw.get("key_axis", "channel") == "channel"
              and all(raw.get(name) is None for name in
                      LAYOUT_DEFAULTED + ("head_map", "eviction", "quest")))
    if preset and (k_bits, v_bits) == (4, 4):
        out.update(group_size=64, value_group_size=128, residual_ring=True)
    elif preset and (k_bits, v_bits) == (2, 2):
        # e4m3 halves the window's bytes: 160..287 tokens cost what KIVI's
        # 128..255 cost in the model dtype
        out.update(residual_ring=True, residual_dtype="fp8_e4m3", residual_tokens=160)
    return out


class KvcompConfigError(ValueError):
    """Raised for any invalid kvcomp setting or unsupported model feature."""


def check_positive_ints(settings: Any, names: tuple[str, ...], prefix: str) -> None:
    for name in names:
        n = getattr(settings, name)
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise KvcompConfigError(f"{prefix} {name}={n!r} must be a positive integer")


def _check_choice(prefix: str, name: str, value: Any, choices: Any, note: str = "") -> None:
    if value not in choices:
        raise KvcompConfigError(
            f"{prefix} {name}={value!r} is not supported; choose one of {choices}{note}")


def _check_dict(raw: Any, setting: str, example: str) -> None:
    if not isinstance(raw, dict):
        raise KvcompConfigError(
            f"kvcomp {setting}={raw!r} must be a dict such as {example} or null")


def _reject_unknown(raw: dict, known: list[str], prefix: str, known_label: str) -> None:
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise KvcompConfigError(f"unknown {prefix} setting(s) {unknown}; {known_label}: {known}")


@dataclass(frozen=True)
class EvictionConfig:
    """Token eviction inside each head's cache (the ``eviction`` setting).

    method: "streamingllm" (``vllm_kvcomp/policies/streaming.py``),
        "snapkv" (``vllm_kvcomp/policies/snapkv.py``), "h2o"
        (``vllm_kvcomp/policies/h2o.py``) or "a2sf" (``policies/a2sf.py``).
    sink_tokens: first tokens of the sequence kept for good (attention sinks).
    recent_tokens: last tokens of the sequence kept (the query's own included;
        h2o / a2sf: by default half of ``budget_tokens``, as in the H2O paper).
    budget_tokens / budget_ratio (snapkv, exactly one): prompt tokens each KV
        head keeps in its compressed pages, as a count or as a fraction of the
        prompt (the prompt's end, in the full-precision window, on top).
        h2o / a2sf: ``budget_tokens`` (required), tokens each KV head keeps,
        heavy hitters plus the recent ones (up to a page more between
        eviction steps, ``policies.h2o.PagedH2O``).
    alpha: a2sf's forgetting factor in (0, 1] per decode step.
    window: last prompt tokens whose queries score the rest (snapkv).
    kernel: width of the pooling over neighbouring scores (snapkv, odd).
    pooling: "avg" or "max" pooling of the scores (snapkv).
    """

    method: str
    sink_tokens: int = 4
    recent_tokens: int = 1024
    budget_tokens: int | None = None
    budget_ratio: float | None = None
    window: int = 32
    kernel: int = 7
    pooling: str = "avg"
    alpha: float = 0.1

    @classmethod
    def from_dict(cls, raw: Any) -> "EvictionConfig | None":
        if raw is None or isinstance(raw, cls):
            return raw
        _check_dict(raw, "eviction",
                    '{"method": "streamingllm", "sink_tokens": 4, "recent_tokens": 1024}')
        method = raw.get("method")
        _check_choice("kvcomp eviction", "method", method, list(EVICTION_METHODS))
        _reject_unknown(raw, ["method", *EVICTION_SETTINGS[method]], "kvcomp eviction",
                        f"known for {method}")
        if method in SCORED_EVICTION:
            return cls._scored(raw)
        ev = cls(**raw)
        if method == "snapkv":
            ev._validate_snapkv()
        else:
            check_positive_ints(ev, ("sink_tokens", "recent_tokens"), "kvcomp eviction")
        return ev

    @classmethod
    def _scored(cls, raw: dict) -> "EvictionConfig":
        budget = raw.get("budget_tokens")
        if budget is None:
            raise KvcompConfigError(
                f"kvcomp eviction {raw['method']} needs budget_tokens (e.g. 2048)")
        probe = cls(method=raw["method"], budget_tokens=budget)
        check_positive_ints(probe, ("budget_tokens",), "kvcomp eviction")
        ev = cls(**{"recent_tokens": max(1, budget // 2), **raw})
        check_positive_ints(ev, ("recent_tokens",), "kvcomp eviction")
        if ev.recent_tokens > budget:
            raise KvcompConfigError(
                f"kvcomp eviction recent_tokens={ev.recent_tokens} exceeds "
                f"budget_tokens={budget}")
        a = ev.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 < a <= 1.0:
            raise KvcompConfigError(f"kvcomp eviction alpha={a!r} must be in (0, 1]")
        return ev

    def _validate_snapkv(self) -> None:
        if (self.budget_tokens is None) == (self.budget_ratio is None):
            raise KvcompConfigError(
                "kvcomp eviction snapkv needs exactly one of budget_tokens (e.g. 2048) and "
                "budget_ratio (e.g. 0.25)")
        if self.budget_tokens is not None:
            check_positive_ints(self, ("budget_tokens",), "kvcomp eviction")
        r = self.budget_ratio
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float))
                              or not 0.0 < r <= 1.0):
            raise KvcompConfigError(f"kvcomp eviction budget_ratio={r!r} must be in (0, 1]")
        check_positive_ints(self, ("window", "kernel"), "kvcomp eviction")
        if self.kernel % 2 == 0:
            raise KvcompConfigError(
                f"kvcomp eviction kernel={self.kernel} must be odd (the pooling is centred)")
        _check_choice("kvcomp eviction", "pooling", self.pooling, SNAPKV_POOLING)

    def policy(self, block_size: int):
        """The policy object both the block manager and the attention ask."""
        if self.method in SCORED_EVICTION:
            from vllm_kvcomp.policies.a2sf import A2SF
            from vllm_kvcomp.policies.h2o import H2O, PagedH2O

            rule = (H2O(self.budget_tokens, self.recent_tokens) if self.method == "h2o"
                    else A2SF(self.budget_tokens, self.recent_tokens, float(self.alpha)))
            return PagedH2O(rule, block_size)
        if self.method == "snapkv":
            from vllm_kvcomp.policies.snapkv import SnapKV

            return SnapKV(block_size, self.budget_tokens, self.budget_ratio, self.window,
                          self.kernel, self.pooling)
        from vllm_kvcomp.policies.streaming import StreamingLLM

        return StreamingLLM(self.sink_tokens, self.recent_tokens, block_size)


@dataclass(frozen=True)
class QuestConfig:
    """Query-aware page selection at decode (the ``quest`` setting;
    ``vllm_kvcomp/policies/quest.py``).

    budget_tokens: packed tokens a decode step attends per KV head, in whole
        pages (``budget_tokens // block_size`` of them, the newest packed page
        always among them); the full-precision window is attended on top.
    dense_layers: the first layers attend every page (Quest keeps two dense).
    """

    budget_tokens: int = 2048
    dense_layers: int = 2

    @classmethod
    def from_dict(cls, raw: Any) -> "QuestConfig | None":
        if raw is None or isinstance(raw, cls):
            return raw
        _check_dict(raw, "quest", '{"budget_tokens": 2048, "dense_layers": 2}')
        _reject_unknown(raw, [f.name for f in dataclasses.fields(cls)], "kvcomp quest", "known")
        quest = cls(**raw)
        check_positive_ints(quest, ("budget_tokens",), "kvcomp quest")
        d = quest.dense_layers
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise KvcompConfigError(f"kvcomp quest dense_layers={d!r} must be an integer >= 0")
        return quest

    def check_block_size(self, block_size: int) -> None:
        if self.budget_tokens < block_size:
            raise KvcompConfigError(
                f"kvcomp quest budget_tokens={self.budget_tokens} is smaller than one page "
                f"(block_size={block_size} tokens); pages are selected whole")

    def policy(self, block_size: int):
        from vllm_kvcomp.policies.quest import Quest

        return Quest(self.budget_tokens, block_size)


@dataclass(frozen=True)
class KvcompConfig:
    """Quantization settings of the compressed KV cache.

    k_bits / v_bits: code width of keys / values; 16 stores them unquantized.
    Unset (``None``) packing and window settings take ``default_layout``'s
    values: k4v4 and k2v2 that name none of them (and no head map, eviction
    or Quest) get the capacity-bar layouts (k4v4 64-token key groups, one
    value group a head, a 0..63-token ring; k2v2 a 160..287-token e4m3 ring),
    everything else 128-token groups and the window by position.

    group_size: tokens per key group when ``key_axis == "channel"`` (KIVI keeps
        one scale/zero per channel per group of tokens), and channels per group
        for per-token quantization (values, and keys when ``key_axis ==
        "token"``), capped at head_size. Default 128 (64 in k4v4's layout).
    value_group_size: channels per value group (values are quantized per
        token); ``None`` (default) uses ``group_size``, as KIVI does (128 in
        k4v4's layout). Apart from it, small key groups (KIVI-2's 32 tokens)
        need not force small value groups, and value groups as wide as the
        head let the decode kernel fold the value scales into its dots.
    residual_tokens: how many of the most recent tokens always stay in full
        precision. Tokens are handed to the packed pages in whole key groups,
        so the window holds ``residual_tokens`` to ``residual_tokens +
        group_size - 1`` (per-channel keys); 0 with 128-token groups is KIVI's
        footprint for R = 128 (0..127 tokens). The window lives in a second,
        sliding KV cache group whose pages come from vLLM's block pool, so it
        is counted in the budget. ``None`` (default): 0 when keys and values
        have 4 bits or more, 128 with 2-bit keys or values (160 in k2v2's
        e4m3 ring layout). The quality
        harness at decode-like positions puts the window's worth at +0.35 %
        perplexity for k4v4 and 0.00 % for k8v8 (every passkey kept), against
        +48 % for k2v2, while at 4K contexts the window costs k4v4 a fifth of
        its capacity (``docs/quality.md``).
    residual_ring: how the window's pages are held (``True`` in k4v4's and
        k2v2's layouts, else ``False``). ``False``: by position, as a
        sliding window; vLLM frees a page only once the steps
        that read it are settled, so with async scheduling a request holds
        up to three windows at once, and ``max_model_len`` 4096 gives k4v4
        2.7x the bf16 capacity. ``True``: one ring of
        ``ceil(residual_window / page)`` pages per request, taken at
        admission and given back when the request ends or is preempted;
        position ``p`` lives in ring slot ``p mod span``. Steps run in order,
        so a step overwrites the slots of tokens that left the window (3.35x
        at 4096). Prefix-cache hits then exist only where the window is
        empty (``residual_tokens`` 0, hits on whole key groups). Served on
        an H200 with vLLM's default engine settings, in the model dtype and
        in fp8.
    residual_dtype: what the window's K and V are stored as ("fp8_e4m3" in
        k2v2's layout, else "auto"). "auto": the model dtype. "fp8_e4m3":
        float8 e4m3 with scale 1, as vLLM's own fp8 KV cache, saturating at
        +-448; half the bytes, so a page holds twice the tokens and the
        window takes half the pages (with ``residual_ring``, k4v4 3.54x and
        k2v2 5.83x the bf16 capacity at ``max_model_len`` 4096). The quality
        harness finds k4v4 within noise of the model-dtype window, while
        k2v2 misses 3 more needles of 30 (``docs/quality.md``). The layer's
        new K and V are rounded to e4m3 as they arrive, so the window, the
        hand-over to the packed pages and a prompt's own tokens all read the
        same values whatever the chunking. No effect where there is no
        window. With ``head_map``, the retrieval heads' window (the
        streaming heads keep their sinks and window in the model dtype, as
        they arrive).
    key_axis: "channel" (KIVI) or "token" (per-token, QServe/KVQuant style).
    value_axis: only "token" (KIVI; per-channel values gain nothing).
    block_size: tokens per packed page; must be a multiple of group_size for
        per-channel keys. ``None`` keeps vLLM's block size when it fits.
    fresh_prefill: who attends over a prefill chunk's own (fresh, full
        precision) tokens on the GPU. "flash_attn": vLLM's FlashAttention,
        merged through the LSE with the Triton kernel's pass over the
        compressed context; "triton" (default): the Triton prefill kernel does
        both in one pass; "auto": flash_attn where vLLM has it (CUDA, fp16 /
        bf16 models) and prompts attend in full precision, else triton. Measured on W1 (H200, 2026-11-23) the split
        gained nothing (1740 vs 1768 output tok/s): the one-pass kernel stays
        the default.
    prompt_attention: how a prompt token attends the tokens before it.
        "as_stored": as the cache will hold them, exactly as a decode step
        at that position would (quantized beyond the full-precision window),
        so a request gives the same tokens however its prompt is chunked and
        whether or not its prefix came from the prefix cache.
        "full_precision": a prefill chunk attends its own tokens in full
        precision and only older cached tokens quantized; its outputs then
        depend on the chunking and on prefix-cache hits (not cache-consistent).
        "auto" (default): "as_stored", except with fresh_prefill="flash_attn"
        (FlashAttention attends the chunk's own tokens unquantized).
    head_map: path of a head-map file (DuoAttention's ``full_attention_heads.tsv``
        or JSON, see ``vllm_kvcomp/policies/head_map.py``) splitting the KV heads
        into retrieval heads (whole context) and streaming heads (sink + recent
        window). ``None`` (default): no split. Checked against the model at
        start-up. Each layer's streaming heads live in a sub-layer of their own
        (``stream_layer``) that keeps only the sinks and the recent window,
        unquantized; the retrieval heads keep k_bits / v_bits.
    streaming_ratio: fraction of the KV heads of a gate map that stream, the
        lowest gates first (DuoAttention deploys 0.5 for GQA models); served
        per layer, as the same count in every layer (``policies.head_map``);
        unused with an explicit roles map.
    sink_tokens / recent_tokens: what a streaming head keeps, the first and the
        last tokens of the sequence (DuoAttention: 64 and 256).
    eviction: ``None`` (default) or a dict ``{"method": "streamingllm",
        "sink_tokens": 4, "recent_tokens": 1024}`` (``EvictionConfig``): every
        head keeps only the sinks and the recent tokens, and the packed pages
        in between go back to vLLM's pool; or ``{"method": "snapkv",
        "budget_tokens": 2048}`` (or ``"budget_ratio": 0.25``): at the end of
        the prompt each KV head keeps the prompt tokens its last queries
        attend most, and the rest of the prompt's pages go back; or
        ``{"method": "h2o", "budget_tokens": 512}`` / ``{"method": "a2sf",
        "budget_tokens": 512, "alpha": 0.5}``: each KV head keeps the tokens
        that received the most attention (A2SF: with older attention
        forgotten) plus the recent ones, evicting as decode goes. With a
        head map, snapkv / h2o / a2sf evict from the retrieval heads (the
        streaming heads keep their sinks and window); with ``quest``, snapkv
        only (Quest then selects among the pages a request still holds). A
        GPU serves a2sf, and eviction beside both a head map and Quest, only
        with KVCOMP_EVICTION_GPU=1 until they have served on one.
    quest: ``None`` (default) or a dict ``{"budget_tokens": 2048,
        "dense_layers": 2}`` (``QuestConfig``): decode steps attend only the
        packed pages whose key bounds promise the largest scores (Quest), from
        the per-channel key (scale, min) the pages already hold. Needs keys
        quantized per channel.
    """

    k_bits: int = 4
    v_bits: int = 4
    group_size: int | None = None
    residual_tokens: int | None = None
    residual_ring: bool | None = None
    residual_dtype: str | None = None
    key_axis: str = "channel"
    value_axis: str = "token"
    block_size: int | None = None
    fresh_prefill: str = "triton"
    value_group_size: int | None = None
    prompt_attention: str = "auto"
    head_map: str | None = None
    streaming_ratio: float = 0.5
    sink_tokens: int = 64
    recent_tokens: int = 256
    eviction: EvictionConfig | None = None
    quest: QuestConfig | None = None

    def __post_init__(self) -> None:
        unset = [f for f in LAYOUT_DEFAULTED if getattr(self, f) is None]
        if unset:
            named = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
            defaults = default_layout(named)
            for name in unset:
                object.__setattr__(self, name, defaults[name])
        # a dict here (from JSON) becomes the frozen, hashable EvictionConfig
        object.__setattr__(self, "eviction", EvictionConfig.from_dict(self.eviction))
        object.__setattr__(self, "quest", QuestConfig.from_dict(self.quest))

    # ------------------------------------------------------------------ derive
    @property
    def key_token_align(self) -> int:
        """Tokens are handed from the residual to the packed pages in multiples
        of this: per-channel keys need whole token groups."""
        if self.k_bits < 16 and self.key_axis == "channel":
            return self.group_size
        return 1

    @property
    def needs_residual_cache(self) -> bool:
        return self.residual_tokens > 0 or self.key_token_align > 1

    @property
    def residual_fp8(self) -> bool:
        """Whether the window holds float8 e4m3 (``residual_dtype``)."""
        return self.residual_dtype == "fp8_e4m3" and self.needs_residual_cache

    @property
    def residual_window(self) -> int:
        """Upper bound of tokens held in full precision per request."""
        return self.residual_tokens + self.key_token_align - 1

    def quantized_prefix_len(self, num_tokens: int) -> int:
        """Q(n): with n tokens in the sequence, positions [0, Q) are read from
        the packed pages and [Q, n) from the full-precision residual pages."""
        align = self.key_token_align
        return max(0, num_tokens - self.residual_tokens) // align * align

    @property
    def prompt_as_stored(self) -> bool:
        """Whether prompt tokens attend as stored (see ``prompt_attention``)."""
        if self.prompt_attention == "auto":
            return self.fresh_prefill != "flash_attn"
        return self.prompt_attention == "as_stored"

    def value_group(self, head_size: int) -> int:
        return min(self.value_group_size or self.group_size, head_size)

    def key_channel_group(self, head_size: int) -> int:
        return min(self.group_size, head_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ parse
    @classmethod
    def from_dict(cls, raw: Any) -> "KvcompConfig":
        if raw is None:
            return cls()
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise KvcompConfigError(f"kvcomp settings are not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise KvcompConfigError(
                f"additional_config['kvcomp'] must be a dict, got {type(raw).__name__}"
            )
        _reject_unknown(raw, sorted(f.name for f in dataclasses.fields(cls)), "kvcomp",
                        "known settings")
        _check_types(raw)
        cfg = cls(**raw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("k_bits", "v_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or v not in SUPPORTED_BITS:
                raise KvcompConfigError(
                    f"kvcomp {name}={v!r} is not supported; choose one of {SUPPORTED_BITS}"
                )
        g = self.group_size
        if not _power_of_two_from_8(g):
            raise KvcompConfigError(
                f"kvcomp group_size={g!r} must be a power of two >= 8"
            )
        vg = self.value_group_size
        if vg is not None and not _power_of_two_from_8(vg):
            raise KvcompConfigError(
                f"kvcomp value_group_size={vg!r} must be a power of two >= 8 (or null: "
                f"group_size)"
            )
        r = self.residual_tokens
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise KvcompConfigError(
                f"kvcomp residual_tokens={r!r} must be an integer >= 0"
            )
        _check_choice("kvcomp", "key_axis", self.key_axis, KEY_AXES)
        _check_choice("kvcomp", "value_axis", self.value_axis, VALUE_AXES,
                      " (values are quantized per token, as in KIVI)")
        _check_choice("kvcomp", "residual_dtype", self.residual_dtype, RESIDUAL_DTYPES)
        _check_choice("kvcomp", "fresh_prefill", self.fresh_prefill, FRESH_PREFILL)
        _check_choice("kvcomp", "prompt_attention", self.prompt_attention, PROMPT_ATTENTION)
        if self.prompt_attention == "as_stored" and self.fresh_prefill == "flash_attn":
            raise KvcompConfigError(
                "kvcomp fresh_prefill='flash_attn' attends a chunk's own tokens in full "
                "precision: it needs prompt_attention='full_precision' (or 'auto'), not "
                "'as_stored'"
            )
        b = self.block_size
        if b is not None:
            if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
                raise KvcompConfigError(f"kvcomp block_size={b!r} must be a positive integer")
            if b % self.key_token_align:
                raise KvcompConfigError(
                    f"kvcomp block_size={b} must be a multiple of group_size="
                    f"{self.group_size} when keys are quantized per channel"
                )
        self._validate_head_split()
        if (self.eviction is not None and self.head_map is not None
                and self.eviction.method == "streamingllm"):
            # the retrieval heads would stream too: nothing would be left of the split
            raise KvcompConfigError(
                "kvcomp eviction method 'streamingllm' and head_map cannot be combined: "
                "streamingllm keeps sinks + a recent window in every head, the head map's "
                "retrieval heads included; use one or the other (a head map with "
                "snapkv, h2o or a2sf evicts from its retrieval heads)")
        if self.quest is not None:
            self._validate_quest()

    def _validate_quest(self) -> None:
        if self.eviction is not None and self.eviction.method != "snapkv":
            raise KvcompConfigError(
                f"kvcomp quest and eviction (method={self.eviction.method!r}) cannot be "
                "combined: H2O / A2SF score every token a decode step reads, while Quest "
                "reads only the pages it selects, and StreamingLLM leaves no more than its "
                "window to select from; Quest combines with snapkv")
        if self.k_bits == 16 or self.key_axis != "channel":
            raise KvcompConfigError(
                f"kvcomp quest bounds keys by their per-channel (scale, min): it needs keys "
                f"quantized per channel (k_bits < 16, key_axis='channel'), not "
                f"k_bits={self.k_bits}, key_axis={self.key_axis!r}")
        if self.block_size is not None:
            self.quest.check_block_size(self.block_size)

    def _validate_head_split(self) -> None:
        r = self.streaming_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise KvcompConfigError(f"kvcomp streaming_ratio={r!r} must be in [0, 1]")
        check_positive_ints(self, ("sink_tokens", "recent_tokens"), "kvcomp")
        path = self.head_map
        if path is not None:
            if not isinstance(path, str) or not path:
                raise KvcompConfigError(f"kvcomp head_map={path!r} must be a file path")
            if os.path.isdir(path):
                raise KvcompConfigError(f"kvcomp head_map={path!r} is a directory, not a file")
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise KvcompConfigError(
                    f"kvcomp head_map={path!r} cannot be read: {e.strerror or e}") from None


def _check_types(raw: dict) -> None:
    """Each setting has its declared type: 4.0, "4" or true for k_bits is a
    start-up error naming the key, not a crash deep inside the engine."""
    import typing

    hints = typing.get_type_hints(KvcompConfig)
    for key, value in raw.items():
        if key in ("eviction", "quest"):  # nested dicts: their from_dict checks them
            continue
        allowed = typing.get_args(hints[key]) or (hints[key],)
        # JSON writes 0 and 1 for a ratio: an int is a float, a bool is neither
        ok = any(value is None if t is type(None) else
                 isinstance(value, (int, float) if t is float else t)
                 and not (t in (int, float) and isinstance(value, bool))
                 for t in allowed)
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise KvcompConfigError(
                f"kvcomp {key}={value!r} must be {names}, not {type(value).__name__}")


def config_from_vllm_config(vllm_config: Any) -> KvcompConfig:
    """Parse (and validate) the kvcomp settings carried by a VllmConfig."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, dict):
        return KvcompConfig()
    return KvcompConfig.from_dict(extra.get("kvcomp"))


def current_config() -> KvcompConfig:
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None:
        return KvcompConfig()
    return config_from_vllm_config(vllm_config)

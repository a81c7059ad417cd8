"""Per-head and eviction policies of the compressed KV cache.

Each method is one small class in its own module, with its paper cited and its
parameters documented in the class docstring:

- ``head_map``: the ``HeadMap`` type, the file formats that carry it (DuoAttention's
  ``full_attention_heads.tsv`` and our JSON), thresholding of gate scores at a
  ``streaming_ratio``, and the check of a map against a model's shape.
- ``razor``: ``RazorAttention`` (Tang et al., 2024), data-free scoring of retrieval
  heads by their echo and induction attention on repeated random tokens.
- ``duo``: ``DuoAttention`` (Xiao et al., 2024), optimisation of one gate per KV head
  that mixes full and streaming (sink + recent window) attention.
- ``attention``: the masked attention both calibrations (and their tests) share.
- ``streaming``: ``StreamingLLM`` (Xiao et al., 2023) token eviction, the packed
  positions a query still sees (sinks + recent range, in whole pages); the block
  manager frees what it drops and the attention skips it.
- ``snapkv``: ``SnapKV`` (Li et al., 2024) prompt eviction, each KV head keeping the
  prompt tokens its last queries attend most (pooled), chosen once the prompt is
  processed; the kept tokens are moved to the front of the request's own pages
  (``kernels/compaction.py``) and the pages emptied behind them are freed.
- ``h2o``: ``H2O`` (Zhang et al., 2023), heavy hitters of attention accumulated over
  the steps plus a recent window; ``a2sf``: ``A2SF`` (Jo and Shin, 2024), the same with
  older attention forgotten by a factor per step; ``PagedH2O`` serves either in
  page-sized eviction steps (scores accumulated in the pages, ``kernels/h2o_ref.py``).
- ``quest``: ``Quest`` (Tang et al., 2024), query-aware selection of the packed pages a
  decode step attends, from per-channel key bounds; every page stays cached.

How they compose: a calibration method produces gate scores per (layer, KV head),
written as a head-map file; when serving (not available yet: the backend refuses a
head map at start-up, as it cannot free streaming heads' memory) the map is thresholded at
``streaming_ratio`` into retrieval heads, which keep their whole (quantized) KV
cache, and streaming heads, which keep only ``sink_tokens`` + ``recent_tokens``.
Quantization applies to whatever each head keeps, so a head split and the KV4/KV2
codes multiply. An eviction policy decides, inside one head's cache, which
tokens to keep (``streaming``, ``snapkv``, ``h2o``, ``a2sf``), and
the kept tokens stay quantized as stored.
"""

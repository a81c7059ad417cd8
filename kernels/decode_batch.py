"""A decode step over packed pages written by the reference writers
(``packing``): the problem the decode kernel's tests run, and the one the
backend checks its decode launch on at start-up on a GPU
(``decode_launch.check_decode_launch``).

Histories: packed pages for ``[0, Q(start))`` and residual pages for
``[Q(start), start)`` in shuffled block ids, for requests of different
lengths (``lens_for``: not multiples of the group or block size; one with
only residual tokens; one of length 1).
"""
from __future__ import annotations

import random

import torch

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels import packing
from vllm_kvcomp.layout import PageLayout

# Output tolerance (atol = rtol) against ``decode_attention_reference``: IEEE
# fp32 dots for float32 models (~1e-6 seen); 16-bit models round the output
# and, on a GPU, take 16-bit dot operands.
TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2, torch.float16: 2e-2}


class DecodeBatch:
    """A decode step of ``len(lens)`` requests (``lens[i]`` tokens after the
    step) whose histories were stored by the reference writers."""

    def __init__(self, cfg, lens, H=2, D=64, rep=4, dtype=torch.float32, block_size=32,
                 bs_r=16, seed=0, pad_residual=False):
        self.cfg, self.lens, self.dtype = cfg, list(lens), dtype
        self.layout = layout = PageLayout(cfg, block_size, D, dtype.itemsize)
        self.bs_r, self.scale = bs_r, D ** -0.5
        B, bs = len(lens), block_size
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed + 1)
        maxb = max(1, -(-max(lens) // bs))
        maxb_r = max(1, -(-max(lens) // bs_r))
        ids = list(range(1, B * maxb + 1))
        rng.shuffle(ids)
        self.block_table = torch.tensor(ids, dtype=torch.int32).view(B, maxb)
        self.packed = torch.zeros(B * maxb + 1, H, layout.head_page_bytes, dtype=torch.uint8)
        ids_r = list(range(1, B * maxb_r + 1))
        rng.shuffle(ids_r)
        self.residual_table = torch.tensor(ids_r, dtype=torch.int32).view(B, maxb_r)
        self.residual = None
        if cfg.needs_residual_cache:
            rdt = packing.residual_torch_dtype(cfg, dtype)
            shape = (B * maxb_r + 1, 2, H, bs_r, D)
            if pad_residual:
                # vLLM hands the residual group a strided view padded to the
                # packed page size.
                inner = shape[1] * shape[2] * shape[3] * shape[4]
                buf = torch.zeros(shape[0], inner + 40, dtype=rdt)
                self.residual = buf[:, :inner].view(shape)
            else:
                self.residual = torch.zeros(shape, dtype=rdt)
        self.K, self.V = [], []
        for i, n in enumerate(lens):
            k = torch.randn(max(n, 0), H, D, generator=g)
            k[..., :3] *= 6  # a few large channels, as real keys have (KIVI)
            # as the backend hands them over (rounded to an fp8 window's values)
            self.K.append(packing.round_to_window(k.to(dtype), cfg))
            self.V.append(packing.round_to_window(
                torch.randn(max(n, 0), H, D, generator=g).to(dtype), cfg))
            if n > 0:
                self._store_history(i, n - 1)
        self.query = (2 * torch.randn(B, H * rep, D, generator=g)).to(dtype)
        zero = torch.zeros(H, D, dtype=dtype)
        self.key_new = torch.stack([k[-1] if len(k) else zero for k in self.K])
        self.value_new = torch.stack([v[-1] if len(v) else zero for v in self.V])
        self.seq_lens = torch.tensor(lens, dtype=torch.int32)

    def _store_history(self, i, start):
        cfg, layout, bs = self.cfg, self.layout, self.layout.block_size
        K, V = self.K[i][:start], self.V[i][:start]
        Q = cfg.quantized_prefix_len(start)
        row = self.block_table[i]
        pos = torch.arange(Q)
        if Q:
            if cfg.k_bits < 16 and cfg.key_axis == "channel":
                G = cfg.group_size
                gpos = pos[::G]
                packing.store_key_groups_per_channel(
                    self.packed, layout, K[:Q].reshape(Q // G, G, *K.shape[1:]),
                    row[gpos // bs].long(), (gpos % bs) // G)
            else:
                packing.store_per_token(self.packed, layout, "k", K[:Q], row[pos // bs].long(),
                                        pos % bs)
            packing.store_per_token(self.packed, layout, "v", V[:Q], row[pos // bs].long(),
                                    pos % bs)
        if start > Q:
            pos = torch.arange(Q, start)
            blk = self.residual_table[i][pos // self.bs_r].long()
            off = pos % self.bs_r
            self.residual[blk, 0, :, off, :] = packing.to_window(K[Q:], self.residual.dtype)
            self.residual[blk, 1, :, off, :] = packing.to_window(V[Q:], self.residual.dtype)

    def args(self, device="cpu"):
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        return (to(self.query), to(self.key_new), to(self.value_new), to(self.packed),
                to(self.residual), to(self.block_table), to(self.residual_table),
                to(self.seq_lens), self.layout, self.cfg, self.scale, self.bs_r)

    def reference(self):
        from vllm_kvcomp.kernels.triton_decode import decode_attention_reference

        return decode_attention_reference(*self.args())

    def triton(self, num_splits=None, max_seq_len=None, device="cpu", **kw):
        from vllm_kvcomp.kernels.triton_decode import kvcomp_decode_attention

        args = self.args(device)
        packed_before = args[3].clone()
        out = kvcomp_decode_attention(*args, max_seq_len or max(self.lens),
                                      num_splits=num_splits, **kw)
        assert torch.equal(args[3], packed_before), "decode must not write the cache"
        return out.cpu()


def lens_for(cfg: KvcompConfig) -> list[int]:
    """Lengths around the interesting boundaries: only the fresh token, only
    residual (Q(start) = 0), a Q that is not a block multiple, and longer."""
    G, R = cfg.group_size, cfg.residual_tokens
    return [1, R + 1, R + G + 7, R + 3 * G + 1, R + 4 * G + 13]

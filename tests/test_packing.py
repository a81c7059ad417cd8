"""Quantize/pack reference: round-trip error bounds and bit layout."""
import pytest
import torch

from vllm_kvcomp.kernels.packing import (
    dequantize_lastdim, pack_codes, quantize_lastdim, unpack_codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(3, 7, 32), (1, 128), (5, 2, 64)])
def test_round_trip_error_bound(bits, shape):
    torch.manual_seed(bits)
    x = torch.randn(shape) * 3
    codes, scale, mn = quantize_lastdim(x, bits)
    assert codes.max() <= (1 << bits) - 1
    y = dequantize_lastdim(codes, scale, mn)
    rng = x.amax(-1) - x.amin(-1)
    # half a step, plus fp16 rounding of min and scale (2^-10 relative each)
    bound = 0.5 * rng / ((1 << bits) - 1) + 2 ** -10 * (x.abs().amax(-1) + rng) + 1e-6
    assert ((x - y).abs() <= bound.unsqueeze(-1)).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_layout_little_endian(bits):
    per = 8 // bits
    codes = torch.randint(0, 1 << bits, (4, 16), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (4, 16 * bits // 8)
    expect = sum(codes[:, i::per].int() << (i * bits) for i in range(per))
    assert torch.equal(packed.int(), expect)
    assert torch.equal(unpack_codes(packed, bits), codes)

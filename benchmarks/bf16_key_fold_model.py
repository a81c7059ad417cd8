"""Why bf16 decode splits the folded key scale (``K_SPLIT_FOLD`` in
``kernels/triton_decode.py``): a PyTorch model of the kernel's arithmetic.

    python benchmarks/bf16_key_fold_model.py

The decode kernel computes q.k over per-channel 2-bit keys as
``sum_c bf16(q_c * s_c) * code_c + sum_c q_c * m_c`` (exact codes, fp32
accumulation, as the tensor cores do). With keys that have a few large-scale
channels (test_triton_decode's DecodeBatch: three channels at 6x), the bf16
rounding of ``q_c * s_c`` moves outputs more than dequantizing the cache to
bf16 first would. Prints the worst output error against an fp32 attention
over the same dequantized cache, over 50 random trials, for: the bf16
dequantize-first reference, the single bf16 operand, and the hi + lo split.
Measured on CPU, 2026-11-23: 0.0200 / 0.0384 / 0.00007.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.packing import quantize_lastdim  # noqa: E402


def main(D=128, T=384, REP=4, bits=2, G=128, trials=50):
    torch.manual_seed(0)
    bf = torch.bfloat16
    worst = {"bf16 dequantize-first": 0.0, "one bf16 q*s operand": 0.0, "hi + lo operands": 0.0}
    for _ in range(trials):
        K = torch.randn(T, D)
        K[:, :3] *= 6
        V = torch.randn(T, D)
        q = (2 * torch.randn(REP, D)).to(bf).float()
        codes, sc, mn = quantize_lastdim(K.view(T // G, G, D).transpose(1, 2), bits)
        khat = (codes.float() * sc.float()[..., None] + mn.float()[..., None]) \
            .transpose(1, 2).reshape(T, D)
        vc, vs, vm = quantize_lastdim(V, bits)
        vhat = vc.float() * vs.float()[:, None] + vm.float()[:, None]

        def out(scores):
            return torch.softmax(scores * D ** -0.5, -1) @ vhat

        ref = out(q @ khat.T)
        one, split = torch.zeros(REP, T), torch.zeros(REP, T)
        for g in range(T // G):
            c = codes[g].float()
            qs = q * sc[g].float()
            hi = qs.to(bf).float()
            lo = (qs - hi).to(bf).float()
            bias = (q @ mn[g].float())[:, None]
            one[:, g * G:(g + 1) * G] = hi @ c + bias
            split[:, g * G:(g + 1) * G] = hi @ c + lo @ c + bias
        for name, o in zip(worst, (out(q @ khat.to(bf).float().T), out(one), out(split))):
            worst[name] = max(worst[name], (o - ref).abs().max().item())
    for name, err in worst.items():
        print(f"{name:24s} worst output error {err:.5f}")


if __name__ == "__main__":
    main()

"""A W4A16 decode GEMM in which x stays put: a measured negative result, kept so that its figures can be re-run.

Each program owns KT consecutive K tiles of 128. Their x^T slices are loaded once, before the loop, and Triton
keeps them in shared memory as loop-invariant wgmma B operands (the local_alloc is hoisted: no per-tile store
of x and no per-tile barrier, where _wna16_mma_tma_kernel has four CTA barriers per tile). The program then
loops over row blocks rb = pid, pid + P, ...: per row block, KT tiles of codes by plain 16-byte loads straight
into wgmma's registers (_mma_operand_ldg), KT dots, then the serial split-K step (_split_k: the partial stored,
a counter incremented, the row block's last program sums the partials in a fixed order).

On the H200 (bench/results/quant-gemm-wna16-xs-h200.json) it is about twice as slow as the TMA kernel: 141.8 us
per 8B layer at M = 1 at best (KT 4, 4 programs per SM) against 74.3. The split-K step now runs once per
(row block, K run) instead of once per program, and each costs a conversion of the accumulator's layout through
shared memory, three CTA barriers and an atomic (sm_90 SASS). down (K = 14336, 28 partials per row block) is
the worst: 54 against 18 us. The design needs a cheaper cross-program reduction than the serial one.

The loads and per-tile products are triton_wna16_ldg's (_mma_load_words_ldg, _mma_tile_ldg). The timed run used
local copies of them: the same arithmetic (interpreter: the same outputs), 16 / 40 more sm_90 SASS instructions
of address arithmetic at KT 2 / 4 in this form, which has not been timed.

    python bench/wna16_xs.py   (writes $OUT/quant-gemm-wna16-xs-h200.json when OUT is set)
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from runtime.ops import triton_gemm as tgm  # noqa: E402
from runtime.ops import triton_wna16_ldg as tldg  # noqa: E402
from runtime.ops import triton_wna16_mma as tm  # noqa: E402
from runtime.ops import triton_wna16_tile as ttile  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # N, K


@triton.jit(do_not_specialize=["M", "NB", "P", "ITERS"])
def xs_kernel(x_ptr, qw_ptr, z_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K, stride_xm, NB, P,
              KT: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, ASM: tl.constexpr, BF16: tl.constexpr,
              MAGIC: tl.constexpr, HAS_BIAS: tl.constexpr, ITERS):
    """y^T for row blocks pid, pid + P, ... (of NB) over K tiles [pid_k * KT, + KT) (KT 2 or 4); see the module."""
    dt: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    pid = tl.program_id(0)
    pid_k = tl.program_id(2)
    rm = tl.arange(0, BLOCK_M)
    m_mask = rm < M
    kt0 = pid_k * KT
    xcols = x_ptr + rm[None, :].to(tl.int64) * stride_xm + tl.arange(0, 128)[:, None]
    b0 = tl.load(xcols + kt0 * 128, mask=m_mask[None, :], other=0.0)
    b1 = tl.load(xcols + (kt0 + 1) * 128, mask=m_mask[None, :], other=0.0)
    if KT == 4:
        b2 = tl.load(xcols + (kt0 + 2) * 128, mask=m_mask[None, :], other=0.0)
        b3 = tl.load(xcols + (kt0 + 3) * 128, mask=m_mask[None, :], other=0.0)
    oq = tl.arange(0, 128)[:, None]
    woff = oq * 4 + tl.arange(0, 4)[None, :]
    zl = 16 * (oq // 32) + (oq % 32) // 4
    ra = tl.arange(0, 64)
    for i in range(0, ITERS):
        rb = pid + i * P
        if rb < NB:
            qw32 = qw_ptr.to(tl.pointer_type(tl.int32)) + rb.to(tl.int64) * (K // 128) * 1024
            rn = rb * 64 + ra
            zoff = rb * 64 + zl
            srows = z_ptr + rn[:, None]
            a0, a1, az0, az1, asr = tldg._mma_load_words_ldg(qw32, z_ptr, srows, kt0, N, woff, zoff)
            c0, c1, cz0, cz1, csr = tldg._mma_load_words_ldg(qw32, z_ptr, srows, kt0 + 1, N, woff, zoff)
            if KT == 4:
                d0, d1, dz0, dz1, dsr = tldg._mma_load_words_ldg(qw32, z_ptr, srows, kt0 + 2, N, woff, zoff)
                e0, e1, ez0, ez1, esr = tldg._mma_load_words_ldg(qw32, z_ptr, srows, kt0 + 3, N, woff, zoff)
            acc = tl.dot(tldg._mma_operand_ldg(a0, a1, az0, az1, ASM, BF16, MAGIC), b0) * ttile._word_scale(asr, dt).to(
                tl.float32)  # the first tile as _mma_tile_ldg computes it, without adding it to zeros
            acc = tldg._mma_tile_ldg(acc, c0, c1, cz0, cz1, csr, b1, ASM, BF16, MAGIC, True)
            if KT == 4:
                acc = tldg._mma_tile_ldg(acc, d0, d1, dz0, dz1, dsr, b2, ASM, BF16, MAGIC, True)
                acc = tldg._mma_tile_ldg(acc, e0, e1, ez0, ez1, esr, b3, ASM, BF16, MAGIC, True)
            offs = rm[None, :].to(tl.int64) * N + rn[:, None]
            mask = m_mask[None, :] & (rn < N)[:, None]
            finish, acc = tgm._split_k(acc, part_ptr, lock_ptr, rb, pid_k, offs, mask, M, N, SPLIT, True)
            if finish:
                tgm._store_out(acc, out_ptr, b_ptr, rn[:, None], (rn < N)[:, None], offs, mask, HAS_BIAS)


def xs_linear(x, qmma, zw, bias=None, kt=4, waves=3, block_m=16, sms=132, asm=True):
    m, k = x.shape
    n = qmma.shape[0] * 64
    nb, k_tiles = n // 64, k // 128
    split = k_tiles // kt
    p = max(1, min(nb, (waves * sms) // split))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    locks = torch.zeros(nb, dtype=torch.int32, device=x.device)
    xs_kernel[(p, 1, split)](x, qmma, zw, bias if bias is not None else out, out, part, locks, m, n, k, x.stride(0),
                             nb, p, KT=kt, SPLIT=split, BLOCK_M=block_m, ASM=asm, BF16=x.dtype == torch.bfloat16,
                             MAGIC=tm.MMA_MAGIC[x.dtype], HAS_BIAS=bias is not None, ITERS=triton.cdiv(nb, p),
                             num_warps=4, num_stages=1)
    return out


def candidates(x, qmma, scales, zw) -> dict:
    """The default decode kernel and xs_kernel with K runs of 2 or 4 tiles and 2-4 programs per SM."""
    cands = {"default (tma)": lambda: tm.linear_wna16_mma_cuda(x, qmma, scales, zw, None, None, 128)}
    for kt in (2, 4):
        for wv in (2, 3, 4):
            cands[f"xs kt{kt} w{wv}"] = lambda kt=kt, wv=wv: xs_linear(x, qmma, zw, kt=kt, waves=wv)
    return cands


def main() -> None:
    from bench.quant_gemm import dumps, graph_us, per_layer_us
    from runtime.ops.quant_linear import linear_wna16_mma_ref, pack_mma_zeros

    torch.manual_seed(0)
    rows, t0 = [], time.time()
    for name, (n, k) in SHAPES.items():
        qmma = torch.randint(-32768, 32767, (n // 64, k // 128, 2048), dtype=torch.int16, device="cuda")
        scales = (torch.rand(k // 128, n, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)
        zeros = torch.randint(0, 16, (k // 128, n), dtype=torch.uint8, device="cuda")
        zw = pack_mma_zeros(scales, zeros)
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = linear_wna16_mma_ref(x.float(), qmma, scales.float(), zeros, None, None, 128).float()
            for label, fn in candidates(x, qmma, scales, zw).items():
                y = fn().float()
                err = ((y - ref).abs().max() / ref.abs().max()).item()
                us = graph_us(fn)
                rows.append(dict(shape=name, m=m, op="w4a16", label=label, us=round(us, 2), rel_err=err))
                print(f"[{time.time() - t0:.0f}s] {name:8s} m={m:2d} {label:16s} {us:7.2f} us  err {err:.1e}",
                      flush=True)
    per_layer = per_layer_us(rows)
    print("\nper 8B layer (qkv + o + gate_up + down), us, L2 emptied, incl. the timer floor of each GEMM")
    for m, ops in per_layer.items():
        for label, us in ops["w4a16"].items():
            print(f"{m:5s} {label:16s} {us:7.1f}")
    if os.environ.get("OUT"):
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    timing="quant_gemm.graph_us")
        Path(os.environ["OUT"], "quant-gemm-wna16-xs-h200.json").write_text(
            dumps(dict(meta=meta, per_layer_us=per_layer, rows=rows)))


if __name__ == "__main__":
    main()

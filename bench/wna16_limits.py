"""What limits the W4A16 decode GEMM (_wna16_mma_tma_kernel) on one GPU: the weight stream or its per-tile
work. Times, per 8B shape (gate_up, down, qkv) and in CUDA graphs with the L2 emptied (quant_gemm.graph_us),
the kernel itself (TMA, cp.async and plain loads: GemmConfig.ldg) against kernels that only stream the same
bytes with the same grid and split (TMA boxes of 4 and 8 KB, pointer loads with 4 and 8 warps), and against the
kernel's per-tile work fed from L2 hits or from registers:

    python bench/wna16_limits.py --out bench/results/quant-gemm-mma-limits-h200.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from bench.quant_gemm import graph_us  # noqa: E402
from runtime.ops import triton_gemm as tgm  # noqa: E402
from runtime.ops import triton_wna16_ldg as tldg  # noqa: E402
from runtime.ops import triton_wna16_mma as tm  # noqa: E402
from runtime.ops import triton_wna16_tile as ttile  # noqa: E402
from runtime.ops.quant_linear import pack_mma_zeros  # noqa: E402

SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096)}  # N, K


@triton.jit
def tma_stream_all(w_desc, z_desc, x_desc, out_ptr, K, TILES: tl.constexpr, BLOCK_M: tl.constexpr):
    """The kernel's three TMA loads per K tile (codes [8, 256], words [1, 64], x [BLOCK_M, 128]), nothing computed."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    row0 = pid_n * (K // 128)
    acc = tl.zeros((8, 256), tl.int32)
    accx = tl.zeros((BLOCK_M, 128), tl.float32)
    for t in tl.range(0, TILES):
        kt = pid_k * TILES + t
        w = w_desc.load([(row0 + kt) * 8, 0])
        acc ^= w.to(tl.int32)
        z = z_desc.load([kt, pid_n * 64])
        acc += tl.sum(z)
        b = x_desc.load([0, kt * 128])
        accx += b.to(tl.float32)
    tl.store(out_ptr + pid_n * tl.num_programs(2) + pid_k, tl.sum(acc) + tl.sum(accx).to(tl.int32))


@triton.jit
def tma_stream(w_desc, out_ptr, K, TILES: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, PER: tl.constexpr):
    """The codes alone: PER 4 KB tiles per TMA load (box [ROWS, COLS] int16 = PER * 4 KB)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    row0 = pid_n * (K // 128) * (2048 // COLS)
    acc = tl.zeros((ROWS, COLS), tl.int32)
    for t in tl.range(0, TILES // PER):
        kt = pid_k * TILES + t * PER
        acc ^= w_desc.load([row0 + kt * (2048 // COLS), 0]).to(tl.int32)
    tl.store(out_ptr + pid_n * tl.num_programs(2) + pid_k, tl.sum(acc))


@triton.jit
def ptr_stream(w_ptr, out_ptr, K, TILES: tl.constexpr, PER: tl.constexpr):
    """The codes alone by pointer loads, PER 4 KB tiles per step (cp.async through num_stages > 1)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    base = w_ptr + pid_n.to(tl.int64) * (K // 128) * 2048
    acc = tl.zeros((2048 * PER,), tl.int32)
    offs = tl.arange(0, 2048 * PER)
    for t in tl.range(0, TILES // PER):
        kt = pid_k * TILES + t * PER
        acc ^= tl.load(base + kt * 2048 + offs).to(tl.int32)
    tl.store(out_ptr + pid_n * tl.num_programs(2) + pid_k, tl.sum(acc))


@triton.jit
def compute_only_kernel(x_desc, w_desc, z_desc, out_ptr, N, K, TILES: tl.constexpr, BLOCK_M: tl.constexpr,
                        BF16: tl.constexpr, MAGIC: tl.constexpr):
    """_wna16_mma_tma_kernel's loop, the codes always from the program's first two tiles (L2 hits)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    dt: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    acc = tl.zeros((64, BLOCK_M), dtype=tl.float32)
    zz = tl.zeros((2, 4, 8, 4, 8), dtype=dt)
    row0 = pid_n * (K // 128)
    for t in tl.range(0, TILES):
        kt = pid_k * TILES + t
        k0 = pid_k * TILES + (t & 1)
        words = w_desc.load([(row0 + k0) * 8, 0]).reshape(2, 4, 8, 4, 8)
        zw = z_desc.load([kt, pid_n * 64])
        zr = zw.reshape(4, 2, 8).permute(1, 0, 2).reshape(2, 4, 8, 1, 1)
        a, sr = ttile._mma_operand(words, zr, zw.reshape(64, 1), zz, dt, True, False, True, BF16, MAGIC, True)
        b = x_desc.load([0, kt * 128])
        acc += tl.dot(a, tl.trans(b)) * sr.to(tl.float32)
    rn = pid_n * 64 + tl.arange(0, 64)
    tl.store(out_ptr + (pid_k * N + rn)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :], acc)


@triton.jit
def compute_regs(x_ptr, qw_ptr, z_ptr, out_ptr, N, K, TILES: tl.constexpr, BLOCK_M: tl.constexpr,
                 BF16: tl.constexpr, MAGIC: tl.constexpr):
    """_wna16_mma_ldg_kernel's per-tile work (dequantize in registers, dot, scale) on operands loaded once
    before the loop (the codes flipped by t each step, so that nothing is hoisted): the loop alone."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    dt: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    rn = pid_n * 64 + tl.arange(0, 64)
    rm = tl.arange(0, BLOCK_M)
    qw32 = qw_ptr.to(tl.pointer_type(tl.int32)) + pid_n.to(tl.int64) * (K // 128) * 1024
    oq = tl.arange(0, 128)[:, None]
    woff = oq * 4 + tl.arange(0, 4)[None, :]
    zoff = pid_n * 64 + 16 * (oq // 32) + (oq % 32) // 4
    w0, w1, z0, z1, sr = tldg._mma_load_words_ldg(qw32, z_ptr, z_ptr + rn[:, None], 0, N, woff, zoff)
    s = ttile._word_scale(sr, dt).to(tl.float32)
    b = tl.load(x_ptr + rm[None, :] * K + tl.arange(0, 128)[:, None])
    acc = tl.zeros((64, BLOCK_M), dtype=tl.float32)
    for t in range(0, TILES):
        a = tldg._mma_operand_ldg(w0 ^ t, w1 ^ t, z0, z1, True, BF16, MAGIC)
        acc += tl.dot(a, b) * s
    tl.store(out_ptr + (pid_k * N + rn)[:, None] * BLOCK_M + rm[None, :], acc)


def time_shape(name: str, n: int, k: int) -> list[dict]:
    dev = "cuda"
    rows = []
    qmma = torch.randint(-32768, 32767, (n // 64, k // 128, 2048), dtype=torch.int16, device=dev)
    scales = (torch.rand(k // 128, n, device=dev) * 0.01).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // 128, n), dtype=torch.uint8, device=dev)
    zw = pack_mma_zeros(scales, zeros)
    wbytes = qmma.numel() * 2
    nbytes = wbytes + zw.numel() * 4
    tiles_n, k_tiles = n // 64, k // 128
    split = tgm._choose_split(tm.WNA16_MMA, tiles_n, k_tiles, torch.device(dev))
    tiles = k_tiles // split
    grid = (tiles_n, 1, split)
    iout = torch.empty(tiles_n * split, device=dev, dtype=torch.int32)
    out = torch.empty(tiles_n * split * 64 * 16, device=dev, dtype=torch.float32)
    x16 = torch.randn(16, k, device=dev, dtype=torch.bfloat16)
    xd = TensorDescriptor.from_tensor(x16, [16, 128])
    wd = TensorDescriptor.from_tensor(qmma.view(-1, 256), [8, 256])
    zd = TensorDescriptor.from_tensor(zw, [1, 64])
    variants = {}
    for m in (1, 16):
        x = x16[:m].contiguous()
        variants[f"kernel tma m{m}"] = (nbytes, lambda x=x: tm.linear_wna16_mma_cuda(
            x, qmma, scales, zw, None, None, 128))
        cfg = dataclasses.replace(tm.WNA16_MMA, tma=False)
        variants[f"kernel cp.async m{m}"] = (nbytes, lambda x=x, cfg=cfg: tm.linear_wna16_mma_cuda(
            x, qmma, scales, zw, None, None, 128, config=cfg))
        for wv in (2, 4):
            cfg = dataclasses.replace(tm.WNA16_MMA, ldg=True, waves=wv)
            variants[f"kernel ldg x{wv} m{m}"] = (nbytes, lambda x=x, cfg=cfg: tm.linear_wna16_mma_cuda(
                x, qmma, scales, zw, None, None, 128, config=cfg))
    for rws, cols, per in [(8, 256, 1), (16, 128, 1), (32, 64, 1), (16, 256, 2), (32, 128, 2)]:
        d = TensorDescriptor.from_tensor(qmma.view(-1, cols), [rws, cols])
        for s in (3, 5):
            variants[f"tma stream [{rws},{cols}] s{s}"] = (wbytes, lambda d=d, s=s, rws=rws, cols=cols, per=per:
                                                           tma_stream[grid](d, iout, k, tiles, rws, cols, per,
                                                                            num_warps=4, num_stages=s))
    for s in (3, 6):
        variants[f"tma stream codes+words+x s{s}"] = (nbytes, lambda s=s: tma_stream_all[grid](
            wd, zd, xd, iout, k, tiles, 16, num_warps=4, num_stages=s))
    for per, w in [(1, 4), (1, 8), (2, 4), (2, 8)]:
        for s in (1, 3):
            variants[f"ptr stream x{per} w{w} s{s}"] = (wbytes, lambda s=s, per=per, w=w: ptr_stream[grid](
                qmma, iout, k, tiles, per, num_warps=w, num_stages=s))
    for s in (3, 6):
        variants[f"compute, codes from L2 s{s}"] = (nbytes, lambda s=s: compute_only_kernel[grid](
            xd, wd, zd, out, n, k, tiles, 16, True, 128.0, num_warps=4, num_stages=s))
    variants["compute, in registers (ldg loop)"] = (nbytes, lambda: compute_regs[grid](
        x16, qmma, zw, out, n, k, tiles, 16, True, 128.0, num_warps=4, num_stages=1))
    src = qmma.view(-1)
    dst = torch.empty_like(src)
    variants["copy (torch, read + write)"] = (2 * wbytes, lambda: dst.copy_(src))
    for label, (b, fn) in variants.items():
        try:
            us = graph_us(fn)
        except Exception as e:  # noqa: BLE001  (a benchmark never aborts on one variant)
            print(f"{name} {label} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        rows.append(dict(shape=name, label=label, us=round(us, 2), tbps=round(b / us / 1e6, 3)))
        print(f"{name:8s} {label:36s} {us:7.1f} us {b / us / 1e6:5.2f} TB/s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [r for name, (n, k) in SHAPES.items() for r in time_shape(name, n, k)]
    if args.out:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()

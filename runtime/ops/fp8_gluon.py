"""FP8 W8A8 decode GEMM written in Gluon, for up to 16 rows of E4M3 codes: y = (xq W^T) * xs[row] * ws[col] (+ bias),
the weight tile on wgmma's M side (64 output channels) and the rows on its N, both operands E4M3 from shared memory
(float32 accumulation of exact products, like triton_w8a8_kernels._w8a8_swap_tma_kernel, the default FP8 decode
GEMM). What it adds is what the Gluon W4A16 kernel (runtime/ops/wna16_gluon.py) gained 3% at batch 1 with: launched
with PDL, its first STAGES weight tiles are loaded before griddepcontrol.wait (EARLY), so the weight stream starts
while the norm, SiLU-mul or attention before it still runs; only x's codes, their scales, the outputs and the
split-K counters depend on the previous kernel. At pdl.TRIGGER 3 it lets the next kernel launch once those loads are
issued. The Triton kernels load nothing before the wait (tests/test_w8a8_compile.py).

Each stage: one TMA box of weight codes [64, BLOCK_K] and one of x's codes [BLOCK_M, BLOCK_K] (rows past M arrive as
zeros) on one mbarrier; one wgmma per stage kept in flight while the next stage's is issued. The epilogue is the
W4A16 kernel's (runtime/ops/wna16_gluon_epilogue.py: serial split-K, bias): the product is scaled by ws before it
(each split's partial scaled alike: the sum is linear) and by the rows' xs in its row-scale step.

Off by default (triton_w8a8.FP8_GLUON); not yet run on a GPU: its tests are tests/test_fp8_gluon.py (sm_90 compile on
the CPU, the reference and the launcher on the GPU).
"""
from __future__ import annotations

import torch

from runtime.ops import triton_gemm as tgm  # the serial split-K's tile counters
from runtime.ops import wna16_gluon as wg

AVAILABLE = wg.AVAILABLE

if AVAILABLE:
    from runtime.ops.wna16_gluon import (
        TensorDescriptor,
        _pdl_launch_dependents,
        _pdl_wait,
        gl,
        gluon,
        mbarrier,
        pdl_after_weights,
        tma,
        triton,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from runtime.ops.wna16_gluon_epilogue import epilogue, mma_layout

    @gluon.constexpr_function
    def mma_layout_fp8(block_m):
        """The accumulator's layout for E4M3 wgmma (K = 32 per instruction): the same registers as mma_layout's."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, block_m, 32])

    @gluon.jit
    def _issue_w(w_desc, bar, dst, x_bytes: gl.constexpr, row, k0):
        """A stage's weight box; its mbarrier expects it and the stage's x box (_issue_x)."""
        mbarrier.expect(bar, w_desc.block_type.nbytes + x_bytes)
        tma.async_copy_global_to_shared(w_desc, [row, k0], bar, dst)

    @gluon.jit
    def _issue_x(x_desc, bar, dst, row, k0):
        tma.async_copy_global_to_shared(x_desc, [row, k0], bar, dst)

    @gluon.jit
    def fp8_gluon_kernel(x_desc, w_desc, xs_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, K,
                         TILES: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr,
                         SPLIT: gl.constexpr, BF16: gl.constexpr, HAS_BIAS: gl.constexpr = False,
                         PDL: gl.constexpr = False, EARLY: gl.constexpr = True):
        """y^T [64 rows, BLOCK_M] of output channels pid_n * 64.. over the program's TILES K tiles of BLOCK_K.
        x_desc: the rows' codes [M, K] E4M3, boxes [BLOCK_M, BLOCK_K]; w_desc: the weight [N, K] E4M3, boxes
        [64, BLOCK_K]; xs [M] and ws [N] float32."""
        MMA8: gl.constexpr = mma_layout_fp8(BLOCK_M)
        MMA: gl.constexpr = mma_layout(BLOCK_M)
        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        pid_k = gl.program_id(2)
        k0 = pid_k * TILES * BLOCK_K
        wrow = pid_n * 64
        xrow = pid_m * BLOCK_M
        XB: gl.constexpr = x_desc.block_type.nbytes
        w_s = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, 64, BLOCK_K], w_desc.layout)
        x_s = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        if PDL and not EARLY:  # programmatic dependent launch (runtime/ops/pdl.py): nothing is touched before this
            _pdl_wait()
        for i in gl.static_range(STAGES):  # EARLY: the weights do not depend on the previous kernel
            if i < TILES:
                _issue_w(w_desc, bars.index(i), w_s.index(i), XB, wrow, k0 + i * BLOCK_K)
        pdl_after_weights(PDL, EARLY)
        for i in gl.static_range(STAGES):
            if i < TILES:
                _issue_x(x_desc, bars.index(i), x_s.index(i), xrow, k0 + i * BLOCK_K)

        acc = gl.zeros([64, BLOCK_M], gl.float32, MMA8)
        for u in range(TILES):
            s = u % STAGES
            mbarrier.wait(bars.index(s), (u // STAGES) & 1)
            acc = warpgroup_mma(w_s.index(s), x_s.index(s).permute((1, 0)), acc, is_async=True)
            # tile u - 1's wgmma is done (one left in flight): its stage may be refilled
            acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
            gl.thread_barrier()
            nxt = u - 1 + STAGES
            if u >= 1 and nxt < TILES:
                p = (u - 1) % STAGES
                _issue_w(w_desc, bars.index(p), w_s.index(p), XB, wrow, k0 + nxt * BLOCK_K)
                _issue_x(x_desc, bars.index(p), x_s.index(p), xrow, k0 + nxt * BLOCK_K)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        if PDL and PDL < 3:  # the K loop is done: the next kernel may start launching
            _pdl_launch_dependents()
        acc = gl.convert_layout(acc, MMA, assert_trivial=True)  # the epilogue's layout
        rn = wrow + gl.arange(0, 64, layout=gl.SliceLayout(1, MMA))
        acc = acc * gl.expand_dims(gl.load(ws_ptr + rn), 1)
        rm = xrow + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
        xs = gl.load(xs_ptr + rm, mask=rm < M, other=0.0)
        # the epilogue's row-scale step (RMS, the norm consumer's 1 / RMS) multiplies by xs before the bias
        epilogue(acc, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, pid_n, pid_m, pid_k, BLOCK_M, SPLIT, HAS_BIAS, BF16,
                 r=xs, RMS=True)

    def layouts(block_m: int, block_k: int) -> tuple:
        """(x's box layout, the weight box layout): NVMMA shared layouts of E4M3 K-major tiles."""
        return (gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.float8e4nv),
                gl.NVMMASharedLayout.get_default_for([64, block_k], gl.float8e4nv))

    def linear_fp8_gluon(xq, sx, weight, ws, bias, out, *, block_m=16, block_k=128, stages=4, split=1, pdl=False,
                         early=True) -> torch.Tensor:
        """out [M, N] (bf16 / fp16, preallocated) = (xq [M, K] @ weight [N, K].T) * sx [M] * ws [N] (+ bias [N]);
        xq and weight float8_e4m3fn, contiguous, 16-byte aligned rows. K / block_k / split tiles per program; N a
        multiple of 64; M <= block_m <= 16 (one row tile). pdl: launched with PDL at that pdl.TRIGGER level."""
        m, k = xq.shape
        n = weight.shape[0]
        tiles = k // block_k // split
        assert tiles * split * block_k == k and n % 64 == 0 and 0 < m <= block_m <= 16, (m, k, n, block_k, split)
        assert stages >= 2, stages  # a stage is refilled while the next one's wgmma is in flight
        assert split == 1 or n // 64 <= tgm.LOCK_SLOTS, n  # one serial split-K counter per output tile
        part = torch.empty((split, m, n), dtype=torch.float32, device=out.device) if split > 1 else out
        locks = tgm._locks(out.device) if split > 1 else out
        xl, wl = layouts(block_m, block_k)
        extra = {"PDL": int(pdl), "launch_pdl": True} if pdl else {}
        fp8_gluon_kernel[(n // 64, triton.cdiv(m, block_m), split)](
            TensorDescriptor.from_tensor(xq, [block_m, block_k], xl),
            TensorDescriptor.from_tensor(weight, [64, block_k], wl), sx, ws, bias if bias is not None else out,
            out, part, locks, m, n, k, TILES=tiles, STAGES=stages,
            BLOCK_M=block_m, BLOCK_K=block_k, SPLIT=split, BF16=out.dtype == torch.bfloat16,
            HAS_BIAS=bias is not None, EARLY=early, num_warps=4, **extra)
        return out

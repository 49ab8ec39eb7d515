"""The end of the Gluon W4A16 decode GEMM (runtime/ops/wna16_gluon.py): the accumulator's layout (mma_layout:
y^T [64, BLOCK_M] float32, one warpgroup) and what happens to it after the K loop (epilogue): the serial split-K
(partials, a tile counter, the last program sums in a fixed order), the bias, and the fusions the epilogue can
carry, all off by default (bench/NOTES-wna16.md 9):

- RMS / ADD (_write_final, _row_rscale): the residual add + RMSNorm between two GEMMs. The producer (ADD) writes the
  residual sum, the sum times the norm weight and per-tile sums of squares; the consumer (RMS) scales its sum by
  1 / RMS of its rows, rebuilt from those sums.
- SILU (_silu_pair): silu(gate) * up of a gate | up product, the gate and up programs of a tile pair meeting on a
  counter after the split-K counters.
"""
from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # CPU-only install, or a Triton without Gluon: triton_wna16_mma never selects the Gluon GEMM
    gluon = None

if gluon is not None:
    from runtime.ops.triton_act_quant import silu_mul_rounded  # the rounding of every silu_and_mul kernel

    @gluon.constexpr_function
    def mma_layout(block_m):
        """The accumulator's layout: y^T [64, block_m], one warpgroup, wgmma N = block_m."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, block_m, 16])


    @gluon.jit
    def epilogue(acc, b_ptr, out_ptr, part_ptr, lock_ptr, M, N, pid_n, pid_m, pid_k, BLOCK_M: gl.constexpr,
                 SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr, BF16: gl.constexpr, res_ptr=None, g_ptr=None,
                 xg_ptr=None, ss_ptr=None, r=None, ADD: gl.constexpr = False, RMS: gl.constexpr = False,
                 pair_ptr=None, SILU: gl.constexpr = False):
        """y^T [64 rows, BLOCK_M] to out (+ bias), through the serial split-K of triton_gemm._split_k: the partial
        stored, the tile's finished programs counted on lock_ptr, the last one summing all partials in a fixed
        order and re-arming the counter. The norm carried by the epilogues (_write_final): RMS scales the sum
        by r (a row's 1 / RMS) before the bias; ADD writes the residual sum instead of y. SILU: silu(gate) * up
        of a gate | up product (_silu_pair)."""
        MMA: gl.constexpr = mma_layout(BLOCK_M)
        rn = pid_n * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, MMA))
        rm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
        offs = gl.expand_dims(rm, 0).to(gl.int64) * N + gl.expand_dims(rn, 1)
        mask = gl.expand_dims(rm < M, 0) & gl.expand_dims(rn < N, 1)
        if SPLIT > 1:
            gl.store(part_ptr + pid_k.to(gl.int64) * M * N + offs, acc, mask=mask)
            gl.thread_barrier()
            done = gl.atomic_add(lock_ptr + pid_n * gl.num_programs(1) + pid_m, 1, sem="acq_rel")
            if done == SPLIT - 1:
                tot = gl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
                for k in gl.static_range(1, SPLIT):
                    tot += gl.load(part_ptr + k * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
                gl.atomic_xchg(lock_ptr + pid_n * gl.num_programs(1) + pid_m, 0)
                _write_final(tot, b_ptr, out_ptr, offs, mask, rn, rm, M, N, pid_n, pid_m, HAS_BIAS, BF16, res_ptr,
                             g_ptr, xg_ptr, ss_ptr, r, ADD, RMS, pair_ptr, lock_ptr, SILU)
        else:
            _write_final(acc, b_ptr, out_ptr, offs, mask, rn, rm, M, N, pid_n, pid_m, HAS_BIAS, BF16, res_ptr, g_ptr,
                         xg_ptr, ss_ptr, r, ADD, RMS, pair_ptr, lock_ptr, SILU)

    @gluon.jit
    def _write_final(tot, b_ptr, out_ptr, offs, mask, rn, rm, M, N, pid_n, pid_m, HAS_BIAS: gl.constexpr,
                     BF16: gl.constexpr, res_ptr, g_ptr, xg_ptr, ss_ptr, r, ADD: gl.constexpr, RMS: gl.constexpr,
                     pair_ptr, lock_ptr, SILU: gl.constexpr):
        """A tile's finished sum (float32 y^T) to memory. RMS: times r [BLOCK_M] first (the consumer of a norm
        carried by the epilogues). ADD (its producer): y rounded, plus the residual, is the new residual stream
        (out), and also written times the norm weight (xg: what the consumer multiplies), with the sums of its
        squares over this tile's 64 columns (ss [N / 64, M], float32), from which the consumer's r comes.
        SILU: y rounded goes to _silu_pair instead of out."""
        dt: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        if RMS:
            tot = tot * gl.expand_dims(r, 0)
        if HAS_BIAS:
            tot += gl.expand_dims(gl.load(b_ptr + rn).to(gl.float32), 1)
        if ADD:
            t = tot.to(dt).to(gl.float32) + gl.load(res_ptr + offs, mask=mask, other=0.0).to(gl.float32)
            t = t.to(dt)
            gl.store(out_ptr + offs, t, mask=mask)
            tf = t.to(gl.float32)
            gl.store(xg_ptr + offs, (tf * gl.expand_dims(gl.load(g_ptr + rn).to(gl.float32), 1)).to(dt), mask=mask)
            gl.store(ss_ptr + pid_n * M + rm, gl.sum(tf * tf, axis=0), mask=rm < M)
        elif SILU:
            _silu_pair(tot.to(dt), pair_ptr, out_ptr, lock_ptr, offs, mask, rn, rm, N, pid_n, pid_m)
        else:
            gl.store(out_ptr + offs, tot.to(dt), mask=mask)

    @gluon.jit
    def _silu_pair(y, pair_ptr, out_ptr, lock_ptr, offs, mask, rn, rm, N, pid_n, pid_m):
        """SiLU-and-multiply carried by the epilogue of a gate | up GEMM (N = 2 I, I % 64 == 0): the program of
        gate tile j (rows 64 j .. 64 j + 63) and the one of up tile j (the same rows + I) each store their y (the
        model dtype, as the unfused GEMM rounds it) to pair [M, N], then count on the pair's counter (after the
        split-K counters: N / 64 * grid_m + j * grid_m + pid_m). The second to arrive reads the other's tile,
        writes out [M, I] = silu(gate) * up rounded as every silu_and_mul kernel does, and re-arms the counter.
        The same store, barrier and acq_rel atomic order as the serial split-K."""
        half = N // 2
        gl.store(pair_ptr + offs, y, mask=mask)
        gl.thread_barrier()
        grid_m = gl.num_programs(1)
        j = pid_n % (half // 64)
        slot = lock_ptr + (N // 64) * grid_m + j * grid_m + pid_m
        done = gl.atomic_add(slot, 1, sem="acq_rel")
        if done == 1:
            mine = y.to(gl.float32)
            if pid_n >= half // 64:  # this program has the up tile
                u = mine
                g = gl.load(pair_ptr + offs - half, mask=mask, other=0.0, cache_modifier=".cg").to(gl.float32)
            else:
                g = mine
                u = gl.load(pair_ptr + offs + half, mask=mask, other=0.0, cache_modifier=".cg").to(gl.float32)
            col = j * 64 + (rn - pid_n * 64)
            gl.store(out_ptr + gl.expand_dims(rm, 0).to(gl.int64) * half + gl.expand_dims(col, 1),
                     silu_mul_rounded(g, u, y.dtype), mask=mask)
            gl.atomic_xchg(slot, 0)

    @gluon.jit
    def _row_rscale(ss_ptr, M, K, eps, pid_m, BLOCK_M: gl.constexpr):
        """1 / RMS of the program's rows [BLOCK_M] (the accumulator's column layout): rsqrt(mean of squares + eps)
        from the producer's K / 64 partial sums of squares (ss [K / 64, M])."""
        MMA: gl.constexpr = mma_layout(BLOCK_M)
        rt = gl.arange(0, 64, layout=gl.SliceLayout(1, MMA))
        rm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
        tiles = K // 64
        s = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(0, MMA))
        for t0 in range(0, tiles, 64):
            t = t0 + rt
            m = gl.expand_dims(t < tiles, 1) & gl.expand_dims(rm < M, 0)
            s += gl.sum(gl.load(ss_ptr + gl.expand_dims(t, 1) * M + gl.expand_dims(rm, 0), mask=m, other=0.0),
                        axis=0)
        return gl.rsqrt(s / K + eps)

"""Triton paged attention (runtime/ops/triton_*.py) against the reference op.

GPU tests (``pytest -m gpu``): fresh random inputs over decode and mixed prefill/extend batches, page sizes,
GQA ratios, head dims, bf16/fp16 and sliding windows; the reference is the CPU op on float32 copies.
Outputs are poisoned with NaN and unused cache slots hold NaN, so unwritten rows and reads past a
sequence's context both fail. A CPU test runs the same kernels under ``TRITON_INTERPRET=1`` on tiny shapes.
"""

from __future__ import annotations

import importlib.util
import zlib

import pytest
import torch

import runtime.ops  # noqa: F401
from runtime.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from tests.conftest import KernelLaunches, run_under_interpreter

HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_GPU = not (torch.cuda.is_available() and HAS_TRITON)
NO_GPU_REASON = "needs a CUDA GPU and triton (run with -m gpu on the device)"
TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def make_case(seq_lens, query_lens, heads, kv_heads, head_dim, page, dtype, seed, device="cpu"):
    """Random paged batch: blocks from a shuffled pool, cached prefix already in the cache, every slot no
    sequence owns (spare blocks, tails of last blocks) NaN. Returns q, k, v ([T, H*D]), cache, meta."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum(-(-s // page) for s in seq_lens) + 3
    perm = torch.randperm(n_blocks, generator=g).tolist()
    cache = torch.full((2, n_blocks, page, kv_heads, head_dim), float("nan"), dtype=dtype)
    tables, qsl, slots = [], [0], []
    for s, ql in zip(seq_lens, query_lens):
        tbl = [perm.pop() for _ in range(-(-s // page))]
        tables.append(tbl)
        pos = torch.arange(s - ql)
        idx = torch.tensor(tbl, dtype=torch.long)[pos // page] * page + pos % page
        kv = torch.randn(2, s - ql, kv_heads, head_dim, generator=g).to(dtype)
        cache.view(2, -1, kv_heads, head_dim)[:, idx] = kv
        qsl.append(qsl[-1] + ql)
        slots += [tbl[p // page] * page + p % page for p in range(s - ql, s)]
    t = qsl[-1]
    q, k, v = (torch.randn(t, h * head_dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))
    width = max(len(x) for x in tables)
    bt = torch.tensor([x + [0] * (width - len(x)) for x in tables], dtype=torch.int32)
    meta = AttentionMetadata(torch.tensor(slots, dtype=torch.long, device=device),
                             torch.tensor(qsl, dtype=torch.int32, device=device),
                             torch.tensor(seq_lens, dtype=torch.int32, device=device), bt.to(device), qsl,
                             list(seq_lens))
    return q.to(device), k.to(device), v.to(device), cache.to(device), meta


def _meta_to(meta: AttentionMetadata, device) -> AttentionMetadata:
    return AttentionMetadata(meta.slot_mapping.to(device), meta.query_start_loc.to(device), meta.seq_lens.to(device),
                             meta.block_tables.to(device), meta.query_start_loc_host, meta.seq_lens_host)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check(seq_lens, query_lens, heads, kv_heads, head_dim, page, dtype, window, seed=0, via_op=False):
    from runtime.ops import triton_attention as ta

    q, k, v, cache, meta = make_case(seq_lens, query_lens, heads, kv_heads, head_dim, page, dtype, seed, "cuda")
    scale = head_dim**-0.5
    cache_ref = cache.float().cpu()
    with set_forward_context(ForwardContext([cache_ref], _meta_to(meta, "cpu"))):
        ref = torch.ops.spanda.paged_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), 0, heads,
                                               kv_heads, head_dim, scale, window)
    t = q.shape[0]
    if via_op:  # through the dispatcher: the registered CUDA kernel must run (and not the reference)
        calls = []
        orig = ta.attend
        ta.attend = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
        try:
            with set_forward_context(ForwardContext([cache], meta)):
                out = torch.ops.spanda.paged_attention(q, k, v, 0, heads, kv_heads, head_dim, scale, window)
        finally:
            ta.attend = orig
        assert calls, "the CUDA dispatch did not reach the Triton path"
    else:
        ta.write_kv(cache, k, v, meta.slot_mapping)
        out = torch.full((t, heads, head_dim), float("nan"), dtype=dtype, device="cuda")  # poison
        ta.attend(q.view(t, heads, head_dim), cache, meta, scale, window, out)
    torch.cuda.synchronize()
    out = out.view(t, heads * head_dim).cpu()
    assert not out.isnan().any(), f"unwritten or NaN rows: {out.isnan().any(1).nonzero().flatten().tolist()[:10]}"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e} (dtype {dtype})"
    written = meta.slot_mapping.cpu()
    flat_fast = cache.view(2, -1, kv_heads * head_dim)[:, meta.slot_mapping].float().cpu()
    torch.testing.assert_close(flat_fast, cache_ref.view(2, -1, kv_heads * head_dim)[:, written], atol=0, rtol=0)


# (seq_lens, query_lens, heads, kv_heads, head_dim, page, dtype, window)
DECODE_CASES = [
    ([1, 7, 16, 17, 100, 513], [1] * 6, 8, 8, 64, 8, torch.bfloat16, None),
    ([3, 31, 32, 33, 1000], [1, 1, 0, 1, 1], 32, 8, 128, 16, torch.bfloat16, None),
    ([5, 64, 65, 2049], [1] * 4, 32, 4, 128, 32, torch.float16, None),
    ([2, 129, 700], [1] * 3, 16, 2, 64, 64, torch.bfloat16, 100),
    ([1, 50, 300], [1] * 3, 8, 2, 128, 16, torch.float16, 64),
    ([127, 128, 129, 1500], [1] * 4, 8, 1, 128, 128, torch.bfloat16, None),
    ([37, 300], [1, 1], 12, 4, 96, 16, torch.bfloat16, None),
]
PREFILL_CASES = [
    ([1, 17, 33, 9, 300], [1, 17, 5, 1, 300], 32, 8, 128, 16, torch.bfloat16, None),
    ([1000, 129, 64], [1000, 64, 1], 8, 8, 64, 8, torch.float16, None),
    ([513, 700], [200, 700], 32, 4, 128, 64, torch.bfloat16, 128),
    ([2065], [2065], 16, 2, 128, 32, torch.bfloat16, None),
    ([4000, 3], [37, 3], 32, 8, 128, 16, torch.float16, None),
    ([90, 45], [90, 1], 12, 4, 96, 16, torch.bfloat16, 30),
    ([300, 64], [300, 64], 8, 1, 64, 8, torch.bfloat16, None),
]


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{c[0][-1]}ctx-h{c[2]}/{c[3]}-d{c[4]}-p{c[5]}-w{c[7]}")
def test_decode_matches_reference(case):
    check(*case, seed=zlib.crc32(repr(case).encode()))


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("case", DECODE_CASES[:3], ids=lambda c: f"{c[0][-1]}ctx-h{c[2]}/{c[3]}-d{c[4]}-p{c[5]}")
def test_decode_with_the_serial_merge_matches_reference(case, monkeypatch):
    """The splits merged by the last one to finish (triton_decode.SERIAL_REDUCE), no reduce launch."""
    from runtime.ops import triton_decode as td
    from runtime.ops import triton_gemm as tgm

    monkeypatch.setattr(td, "SERIAL_REDUCE", True)
    with KernelLaunches(td, "_decode_reduce_kernel") as reduces:
        check(*case, seed=zlib.crc32(repr(case).encode()) + 1)
    assert reduces.n == 0
    assert not tgm._locks(torch.device("cuda")).any(), "a counter left armed"


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"q{sum(c[1])}-h{c[2]}/{c[3]}-d{c[4]}-p{c[5]}-w{c[7]}")
def test_prefill_extend_matches_reference(case):
    check(*case, seed=zlib.crc32(repr(case).encode()))


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("decode", [True, False])
def test_op_dispatches_to_triton(decode):
    ql = [1, 1, 1] if decode else [1, 40, 7]
    check([33, 80, 200], ql, 32, 8, 128, 16, torch.bfloat16, None, seed=3, via_op=True)


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("serial", [False, True])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{c[0][-1]}ctx-h{c[2]}/{c[3]}-d{c[4]}-p{c[5]}-w{c[7]}")
def test_decode_with_splits_from_each_context_matches_reference(case, serial, monkeypatch):
    """A sequence whose context fits one split's minimum work uses one split (triton_decode.DYNAMIC_SPLITS): the
    batches mix such sequences (writing the output themselves) and longer ones, merged by the reduce kernel or
    by the last split to finish."""
    from runtime.ops import triton_decode as td
    from runtime.ops import triton_gemm as tgm

    monkeypatch.setattr(td, "DYNAMIC_SPLITS", True)
    monkeypatch.setattr(td, "SERIAL_REDUCE", serial)
    check(*case, seed=zlib.crc32(repr(case).encode()) + 2)
    assert not tgm._locks(torch.device("cuda")).any(), "a counter left armed"


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
@pytest.mark.parametrize("page", [16, 64])
def test_long_context_decode(page):
    check([8192, 8000, 4097, 1], [1] * 4, 32, 8, 128, page, torch.bfloat16, None, seed=page)
    check([8192], [1], 32, 8, 128, page, torch.bfloat16, 1000, seed=page + 1)
    if page == 16:  # one sequence: the most splits (128) and the widest reduction
        check([32768], [1], 32, 8, 128, page, torch.bfloat16, None, seed=7)


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=NO_GPU_REASON)
def test_every_tuning_config_is_correct():
    """The tuner may pin any config of the grid: each must compute the same function."""
    from triton.runtime.errors import OutOfResources

    from runtime.ops import triton_attention as ta
    from runtime.ops import triton_decode, triton_prefill

    q, k, v, cache, meta = make_case([700, 33, 1], [1, 1, 1], 16, 4, 128, 16, torch.bfloat16, 11, "cuda")
    ta.write_kv(cache, k, v, meta.slot_mapping)
    t = q.shape[0]
    with set_forward_context(ForwardContext([cache.float().cpu()], _meta_to(meta, "cpu"))):
        ref = torch.ops.spanda.paged_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), 0, 16, 4, 128,
                                               0.1, None)
    for cfg in triton_decode.CONFIGS:
        out = torch.full((t, 16, 128), float("nan"), dtype=q.dtype, device="cuda")
        try:
            ta.attend(q.view(t, 16, 128), cache, meta, 0.1, None, out, decode_cfg=cfg)
        except OutOfResources:
            continue
        assert rel_err(out.view(t, -1).cpu(), ref) < 1e-2, cfg
    q, k, v, cache, meta = make_case([300, 90], [300, 20], 16, 4, 128, 16, torch.bfloat16, 12, "cuda")
    with set_forward_context(ForwardContext([cache.float().cpu()], _meta_to(meta, "cpu"))):
        ref = torch.ops.spanda.paged_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), 0, 16, 4, 128,
                                               0.1, None)
    ta.write_kv(cache, k, v, meta.slot_mapping)
    t = q.shape[0]
    for pcfg in triton_prefill.CONFIGS:
        out = torch.full((t, 16, 128), float("nan"), dtype=q.dtype, device="cuda")
        try:
            ta.attend(q.view(t, 16, 128), cache, meta, 0.1, None, out, prefill_cfg=pcfg)
        except OutOfResources:  # too much shared memory on this GPU: the tuner drops it too
            continue
        assert rel_err(out.view(t, -1).cpu(), ref) < 1e-2, pcfg


def _split_kernel_sass(early: bool) -> str:
    """_decode_split_kernel compiled for sm_90 without a GPU (bf16 cache, 4 query heads per KV head of 128, pages
    of 16, tiles of 64, split, PDL) and disassembled."""
    from bench.wna16_gluon import triton_sass_sm90
    from runtime.ops import triton_decode as td

    sig = {name: "*bf16" for name in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr", "lock_ptr")}
    sig.update({name: "*i32" for name in ("block_tables_ptr", "seq_lens_ptr", "qsl_ptr")})
    sig.update({name: "*fp32" for name in ("part_m_ptr", "part_l_ptr", "part_acc_ptr")})
    sig.update({name: "i32" for name in ("stride_qt", "stride_qh", "stride_cslot", "stride_bt", "stride_ot",
                                         "stride_oh", "group", "head_dim", "window", "n_splits")})
    sig.update(scale_log2="fp32", v_scale="fp32")
    const = dict(PAGE=16, G_PAD=16, D_PAD=128, BLOCK_N=64, HAS_WINDOW=False, SPLIT=True, PDL=True, WIDE16=False,
                 ASM=False, INT8=False, SERIAL=False, S_PAD=1, SPLIT_SPAN=0, EARLY=early)
    return triton_sass_sm90(td._decode_split_kernel, sig, const, num_warps=4, num_stages=3)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its sm_90 compiler and nvdisasm ship with it)")
def test_early_loads_are_issued_before_the_pdl_wait():
    """Compiled for sm_90: launched with PDL the split kernel loads nothing before griddepcontrol.wait (ACQBULK);
    with EARLY_LOADS the first tile's block-table, K and V loads come before it (as many as a tile of the loop)."""
    late, early = _split_kernel_sass(False), _split_kernel_sass(True)
    assert late[:late.index("ACQBULK")].count("LDG") == 0
    before = early[:early.index("ACQBULK")].count("LDG")
    assert before >= late.count("LDG") // 2, (before, late.count("LDG"))


# ------------------------------------------------------------------ CPU: the kernels under the interpreter

def _interpreter_main() -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1 (set before triton is imported). float16 only: the
    interpreter's tl.dot mishandles bfloat16 (numpy has no bfloat16)."""
    import triton.runtime.interpreter as interp

    # triton 3.6's interpreter converts loop bounds with int(array of shape (1,)), which numpy >= 2.4 refuses.
    orig = interp._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    from runtime.ops import triton_attention as ta
    from runtime.ops import triton_decode as td
    from runtime.ops import triton_prefill as tp

    cases = [  # (seq_lens, query_lens, heads, kv_heads, head_dim, page, window, decode cfg, prefill cfg)
        ([1, 17, 33, 40], [1, 1, 1, 1], 4, 2, 16, 8, None, td.DecodeConfig(16, 4, 1, 64, 1), None),
        ([1, 17, 33, 40], [1, 1, 0, 1], 8, 1, 32, 4, 5, td.DecodeConfig(16, 4, 1, 64, 1), None),
        ([5, 17, 60], [1, 1, 1], 6, 1, 24, 16, 20, td.DecodeConfig(16, 4, 1, 1, 1), None),
        ([1, 17, 33, 9], [1, 17, 5, 1], 4, 2, 16, 8, None, None, tp.PrefillConfig(32, 16)),
        ([1, 17, 33, 9], [1, 17, 5, 1], 8, 2, 16, 1, 5, None, tp.PrefillConfig(32, 16)),
        ([50, 40], [50, 23], 6, 1, 24, 16, 7, None, tp.PrefillConfig(32, 16)),
    ]
    # every case, then the decode ones again with the splits merged by the last split to finish (SERIAL_REDUCE),
    # and both ways with a sequence whose context fits one split's minimum using one split (DYNAMIC_SPLITS: the
    # decode cases mix such sequences, writing the output themselves, and longer ones)
    default = td.DYNAMIC_SPLITS
    runs = ([(c, False, default) for c in cases] + [(c, True, default) for c in cases if c[7] is not None]
            + [(c, ser, not default) for c in cases if c[7] is not None for ser in (False, True)])
    for (seq_lens, qls, h, hkv, d, page, window, dcfg, pcfg), ser, dyn in runs:
        q, k, v, cache, meta = make_case(seq_lens, qls, h, hkv, d, page, torch.float16, seed=len(seq_lens) + page)
        cache_ref = cache.float()
        with set_forward_context(ForwardContext([cache_ref], meta)):
            ref = torch.ops.spanda.paged_attention(q.float(), k.float(), v.float(), 0, h, hkv, d, d**-0.5, window)
        ta.write_kv(cache, k, v, meta.slot_mapping)
        assert torch.equal(cache.float().nan_to_num(7), cache_ref.nan_to_num(7)), "KV write"
        out = torch.full((q.shape[0], h, d), float("nan"), dtype=q.dtype)
        td.SERIAL_REDUCE, td.DYNAMIC_SPLITS = ser, dyn
        with KernelLaunches(td, "_decode_reduce_kernel") as reduces:
            ta.attend(q.view(-1, h, d), cache, meta, d**-0.5, window, out, decode_cfg=dcfg, prefill_cfg=pcfg)
        td.SERIAL_REDUCE, td.DYNAMIC_SPLITS = False, default
        if dcfg is not None and dcfg.programs_per_sm > 1 and window is None:  # split: a context of over 16
            assert reduces.n == (0 if ser else 1), (seq_lens, ser, reduces.n)
        out = out.view(q.shape[0], -1)
        assert not out.isnan().any(), (seq_lens, qls, ser, "unwritten rows")
        err = rel_err(out, ref)
        assert err < 2e-3, (seq_lens, qls, h, hkv, d, page, window, ser, dyn, err)
    from runtime.ops import triton_gemm as tgm
    assert not tgm._locks(torch.device("cpu")).any(), "the serial merge left a counter armed"
    _early_loads_under_a_stand_in_for_pdl(interp, cases, ta, td)
    print("interpreter ok")


def _early_loads_under_a_stand_in_for_pdl(interp, cases, ta, td) -> None:
    """The decode kernels launched with PDL, with and without EARLY_LOADS, where the previous kernel
    (rope_and_cache, which writes the step's token into the cache) finishes only at each program's wait: before
    every program the new tokens' K / V rows are NaN again, and the program's wait (pdl_enter) writes those of its
    (sequence, KV head). A kernel that read them before its wait would return NaN."""
    builder = interp.interpreter_builder
    saved = builder.set_grid_idx, td.pdl_enter, td.launch_kwargs, td.EARLY_LOADS
    for early in (True, False):
        for seq_lens, qls, h, hkv, d, page, window, dcfg, _ in [c for c in cases if c[7] is not None]:
            q, k, v, cache, meta = make_case(seq_lens, qls, h, hkv, d, page, torch.float16, seed=len(seq_lens) + 1)
            with set_forward_context(ForwardContext([cache.float()], meta)):
                ref = torch.ops.spanda.paged_attention(q.float(), k.float(), v.float(), 0, h, hkv, d, d**-0.5, window)
            rows = cache.view(2, -1, hkv, d)
            new = torch.stack([k, v]).view(2, -1, hkv, d)
            slots, qsl, waits = meta.slot_mapping, meta.query_start_loc_host, []

            def poisoned(x, y, z, rows=rows, slots=slots):
                rows[:, slots] = float("nan")
                saved[0](x, y, z)

            def wait(*_pdl, rows=rows, new=new, slots=slots, qsl=qsl, waits=waits, hkv=hkv):
                kv_head, b, _ = builder.grid_idx
                if kv_head < hkv and qsl[b + 1] > qsl[b]:  # a split program with a token (the reduce: no cache)
                    rows[:, slots[qsl[b]], kv_head] = new[:, qsl[b], kv_head]
                    waits.append(b)

            builder.set_grid_idx, td.pdl_enter = poisoned, wait
            td.launch_kwargs, td.EARLY_LOADS = (lambda device: {"PDL": True}), early
            try:
                out = torch.full((q.shape[0], h, d), float("nan"), dtype=q.dtype)
                ta.attend(q.view(-1, h, d), cache, meta, d**-0.5, window, out, decode_cfg=dcfg)
            finally:
                builder.set_grid_idx, td.pdl_enter, td.launch_kwargs, td.EARLY_LOADS = saved
            assert waits, "no program waited"
            out = out.view(q.shape[0], -1)
            err = rel_err(out, ref)
            assert not out.isnan().any() and err < 2e-3, (seq_lens, early, err)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton) so the interpreter is absent")
def test_kernels_under_triton_interpreter():
    run_under_interpreter("tests.test_triton_attention", timeout=600)

"""Benchmark of spanda::paged_attention's CUDA path (Triton) against the device ceilings and peers.

    python bench/attention.py --out bench/results/attention-h100.json [--no-tune] [--quick]
    python bench/attention.py --kv-dtypes bf16,fp8,int8 --out bench/results/attention-kv-fp8-h100.json

``--kv-dtypes``: decode at batch 64, context 4096 (and prefill attention at 8k) with the KV cache in each
dtype (fp8 e4m3 / int8: quantized, per-layer scales; bytes counted at one byte per element), default config
and then tuned per dtype; nothing else. A/B switch: ``--widen-to`` (an 8-bit cache's V widened with .to()
instead of triton_decode's asm block).

Ceilings measured here: device-to-device copy bandwidth (bytes read + written over time, 1 GiB buffer) and
a bf16 8192^3 matrix product rate. Decode: the op (KV write + flash-decoding) at batch x context, 32/8 heads,
d 128, bf16, page 16; bytes = K+V read over every context + q read + out written; timed as CUDA-graph
replays rotating over enough input sets to defeat the L2. Prefill: one 8k-token causal sequence, 32/8 heads,
d 128; FLOPs = 4*T^2*Hq*d/2; against PyTorch SDPA's flash backend (contiguous, K/V expanded to 32 heads)
and compiled FlexAttention (GQA, causal block mask). Medians of triton.testing.do_bench. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

import runtime.ops  # noqa: E402,F401
from runtime.forward_context import ForwardContext, set_forward_context  # noqa: E402
from runtime.ops import triton_attention as ta  # noqa: E402
from runtime.ops import triton_decode  # noqa: E402

HQ, HKV, D, PAGE, DTYPE = 32, 8, 128, 16, torch.bfloat16
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}
KV_SCALE = 1 / 16  # random_case's quantized caches hold randn * 16
L2_BYTES = 50 * 2**20


def bench(fn, rep=200) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    n = 2**30 // 2
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / (ms * 1e-3)


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, rep=300)
    return 2 * 8192**3 / (ms * 1e-3)


def op_sets(num_seqs, ctx, q_len, n_sets, page=PAGE, kv_dtype=DTYPE):
    sets = []
    for i in range(n_sets):
        q, kv, meta = ta.random_case(num_seqs, ctx, q_len, HQ, HKV, D, page, DTYPE, seed=i, kv_dtype=kv_dtype)
        t = q.shape[0]
        k = torch.randn(t, HKV * D, device="cuda", dtype=DTYPE)
        v = torch.randn(t, HKV * D, device="cuda", dtype=DTYPE)
        sets.append((q.view(t, -1), k, v, kv, meta))
    return sets


def time_op_graph(sets) -> float:
    """Median ms of one op call: a CUDA graph of len(sets) calls (each its own inputs), replayed."""
    def run_all():
        for q, k, v, kv, meta in sets:
            with set_forward_context(ForwardContext([kv], meta, [(KV_SCALE, KV_SCALE)])):
                torch.ops.spanda.paged_attention(q, k, v, 0, HQ, HKV, D, D**-0.5, None)
    run_all()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run_all()
    return bench(g.replay) / len(sets)


def decode_row(num_seqs, ctx, bw, kv_dtype=DTYPE) -> dict:
    kv_bytes = num_seqs * ctx * HKV * D * 2 * kv_dtype.itemsize
    qo_bytes = 2 * num_seqs * HQ * D * 2
    n_sets = int(min(64, max(1, math.ceil(3 * L2_BYTES / kv_bytes))))
    sets = op_sets(num_seqs, ctx, 1, n_sets, kv_dtype=kv_dtype)
    ms = time_op_graph(sets)
    cfg = triton_decode.select_config(triton_decode.decode_key(num_seqs, ctx, HQ, HKV, D, PAGE, kv_dtype))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = triton_decode.num_splits(cfg, num_seqs, HKV, ctx, sms)
    gbs = (kv_bytes + qo_bytes) / (ms * 1e-3)
    del sets
    torch.cuda.empty_cache()
    return dict(batch=num_seqs, ctx=ctx, kv_dtype=str(kv_dtype).removeprefix("torch."), us=ms * 1e3,
                floor_us=(kv_bytes + qo_bytes) / bw * 1e6, gb_s=gbs / 1e9,
                frac_copy_bw=gbs / bw, splits=splits, config=cfg.__dict__)


def prefill_rows(t, rate, tune: bool, res: dict, save) -> None:
    """Fills res["prefill"] (rows), res["prefill_tuned"], res["kv_write_us"], saving after each step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flops = 4 * t * t * HQ * D / 2
    rows, extra = res.setdefault("prefill", []), res
    (q, k, v, kv, meta), = op_sets(1, t, t, 1)
    q3 = q.view(t, HQ, D)
    if tune:
        tuned = ta.tune([dict(num_seqs=1, ctx=t, q_len=t, num_heads=HQ, num_kv_heads=HKV, head_dim=D, page=PAGE,
                              dtype=DTYPE)], verbose=True)
        extra["prefill_tuned"] = {str(kk): [vv[0].__dict__, vv[1] * 1e3] for kk, vv in tuned.items()}

    def op():
        with set_forward_context(ForwardContext([kv], meta)):
            return torch.ops.spanda.paged_attention(q, k, v, 0, HQ, HKV, D, D**-0.5, None)
    out = torch.empty_like(q3)
    ms_op = bench(op)
    ms_attn = bench(lambda: ta.attend(q3, kv, meta, D**-0.5, None, out))
    rows.append(dict(impl="spanda triton (op: KV write + attention, paged, page 16)", ms=ms_op,
                     tflops=flops / ms_op / 1e9))
    rows.append(dict(impl="spanda triton (attention only)", ms=ms_attn, tflops=flops / ms_attn / 1e9))
    save()
    # KV write: Triton kernel vs index_copy_ (the reference) for these 8k tokens.
    extra["kv_write_us"] = {"triton": bench(lambda: ta.write_kv(kv, k, v, meta.slot_mapping)) * 1e3,
                            "index_copy_": bench(lambda: ta.write_kv_ref(kv, k.view(t, HKV, D), v.view(t, HKV, D),
                                                                          meta.slot_mapping)) * 1e3}
    qs = q3.transpose(0, 1).unsqueeze(0).contiguous()  # [1, Hq, T, D]
    ks = torch.randn(1, HKV, t, D, device="cuda", dtype=DTYPE)
    vs = torch.randn(1, HKV, t, D, device="cuda", dtype=DTYPE)
    ke, ve = (x.repeat_interleave(HQ // HKV, 1).contiguous() for x in (ks, vs))
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ke, ve, is_causal=True))
        rows.append(dict(impl="torch SDPA flash backend (contiguous, K/V expanded)", ms=ms, tflops=flops / ms / 1e9))
    except Exception as e:
        rows.append(dict(impl="torch SDPA flash backend", error=repr(e)[:300]))
    save()
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, 1, t, t, device="cuda")
        flex = torch.compile(flex_attention)
        t0 = time.time()
        flex(qs, ks, vs, block_mask=mask, enable_gqa=True)
        extra["flex_compile_s"] = time.time() - t0
        ms = bench(lambda: flex(qs, ks, vs, block_mask=mask, enable_gqa=True))
        rows.append(dict(impl="FlexAttention (compiled, GQA, causal block mask)", ms=ms, tflops=flops / ms / 1e9))
    except Exception as e:
        rows.append(dict(impl="FlexAttention", error=repr(e)[:300]))
    for r in rows:
        if "ms" in r:
            r["floor_ms"] = flops / rate * 1e3
    save()


def _prefill_attention_ms(t: int, kv_dtype: torch.dtype) -> float:
    (q, _, _, kv, meta), = op_sets(1, t, t, 1, kv_dtype=kv_dtype)
    q3, out = q.view(t, HQ, D), torch.empty(t, HQ, D, device="cuda", dtype=DTYPE)
    return bench(lambda: ta.attend(q3, kv, meta, D**-0.5, None, out, k_scale=KV_SCALE, v_scale=KV_SCALE))


def kv_dtype_rows(names: list[str], bw: float, rate: float, tune: bool, res: dict, save) -> None:
    """Decode at the target shape and prefill attention at 8k, per KV cache dtype (default, then tuned)."""
    b, c, t = 64, 4096, 8192
    flops = 4 * t * t * HQ * D / 2
    rows = res.setdefault("kv_dtypes", {})
    for name in names:
        kvd = KV_DTYPES[name]
        row = rows[name] = {"decode_default": decode_row(b, c, bw, kvd)}
        save()
        if tune:
            shape = dict(num_heads=HQ, num_kv_heads=HKV, head_dim=D, page=PAGE, dtype=DTYPE, kv_dtype=kvd)
            ta.tune([dict(num_seqs=b, ctx=c, q_len=1, **shape)])
            row["decode_tuned"] = decode_row(b, c, bw, kvd)
        ms = _prefill_attention_ms(t, kvd)
        row["prefill_8k_attention"] = dict(ms=ms, tflops=flops / ms / 1e9, floor_ms=flops / rate * 1e3)
        torch.cuda.empty_cache()
        best = row.get("decode_tuned", row["decode_default"])
        print(f"kv {name:>4}: decode b{b} ctx{c} {row['decode_default']['us']:.1f} us default, {best['us']:.1f} us "
              f"tuned ({best['gb_s']:.0f} GB/s, {best['frac_copy_bw']:.0%} of copy bw, floor "
              f"{best['floor_us']:.1f} us); prefill 8k attention {ms:.3f} ms", flush=True)
        save()
    if "bf16" in rows:
        base = rows["bf16"].get("decode_tuned", rows["bf16"]["decode_default"])["us"]
        res["decode_speedup_vs_bf16"] = {n: base / r.get("decode_tuned", r["decode_default"])["us"]
                                         for n, r in rows.items()}
        print("decode speedup vs bf16 KV:", {n: round(x, 2) for n, x in res["decode_speedup_vs_bf16"].items()})
    res["pinned"] = ta.pinned()
    save()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--quick", action="store_true", help="the two target shapes only")
    ap.add_argument("--kv-dtypes", help="comma list of bf16, fp8, int8: the KV-dtype comparison only")
    ap.add_argument("--widen-to", action="store_true",
                    help="8-bit caches: widen V with .to() instead of the asm block (triton_decode.WIDEN_ASM; A/B)")
    args = ap.parse_args()
    triton_decode.WIDEN_ASM = not args.widen_to
    props = torch.cuda.get_device_properties(0)
    res: dict = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                     triton=triton.__version__, shape=dict(hq=HQ, hkv=HKV, d=D, page=PAGE, dtype="bf16"))

    def save():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=1, default=str))

    bw, rate = copy_bandwidth(), matmul_rate()
    res.update(copy_bw_gb_s=bw / 1e9, bf16_mm_tflops=rate / 1e12)
    print(f"{props.name}: copy {bw / 1e9:.0f} GB/s (read+write), bf16 mm {rate / 1e12:.0f} TFLOP/s", flush=True)
    if args.kv_dtypes:
        kv_dtype_rows(args.kv_dtypes.split(","), bw, rate, not args.no_tune, res, save)
        return
    target = (64, 4096)
    shapes = [target] if args.quick else [(b, c) for b in (1, 8, 32, 64) for c in (1024, 4096, 8192, 32768)]
    # 1) the default config (and split heuristic) on every shape, before anything is pinned
    res["decode_default"] = []
    for b, c in shapes:
        res["decode_default"].append(decode_row(b, c, bw))
        save()
    print("decode target, default config:", res["decode_default"][shapes.index(target)], flush=True)
    # 2) tune each shape (what a build does per batch/context bucket), 3) the op again with the pinned winners
    if not args.no_tune:
        t0 = time.time()
        tuned = ta.tune([dict(num_seqs=b, ctx=c, q_len=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D, page=PAGE,
                              dtype=DTYPE) for b, c in shapes], verbose=True)
        res["decode_tune_s"] = time.time() - t0
        res["decode_tuned"] = {str(k): [v[0].__dict__, v[1] * 1e3] for k, v in tuned.items()}
        res["decode"] = []
        for b, c in shapes:
            res["decode"].append(decode_row(b, c, bw))
            save()
        res["decode_target_repeat"] = decode_row(*target, bw)  # same version timed twice: the noise
    res["pinned"] = ta.pinned()
    save()
    prefill_rows(8192, rate, not args.no_tune, res, save)
    res["pinned"] = ta.pinned()
    save()

    print(f"\ndecode (op incl. KV write; {HQ}/{HKV} heads, d {D}, bf16, page {PAGE}); copy bw {bw / 1e9:.0f} GB/s")
    print(f"{'batch':>5} {'ctx':>6} {'floor us':>9} | {'default us':>10} {'of copy':>7} {'splits':>6} | "
          f"{'tuned us':>9} {'of copy':>7} {'splits':>6} config (block_n, warps, stages, programs/SM)")
    tuned_rows = res.get("decode", [None] * len(shapes)) + [res.get("decode_target_repeat")]
    default_rows = res["decode_default"] + [res["decode_default"][shapes.index(target)]]
    for r0, r1 in zip(default_rows, tuned_rows):
        line = (f"{r0['batch']:>5} {r0['ctx']:>6} {r0['floor_us']:>9.1f} | {r0['us']:>10.1f} "
                f"{r0['frac_copy_bw']:>7.1%} {r0['splits']:>6} | ")
        if r1:
            c = r1["config"]
            line += (f"{r1['us']:>9.1f} {r1['frac_copy_bw']:>7.1%} {r1['splits']:>6} "
                     f"({c['block_n']}, {c['num_warps']}, {c['num_stages']}, {c['programs_per_sm']})")
        print(line)
    print(f"\nprefill 8192 tokens causal, {HQ}/{HKV} heads, d {D}, bf16 (mm ceiling {rate / 1e12:.0f} TFLOP/s)")
    for r in res["prefill"]:
        print(f"  {r['impl']:<58} " + (f"{r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s" if "ms" in r else r["error"]))
    print("  kv write 8k tokens (us):", {k: round(v, 1) for k, v in res["kv_write_us"].items()})


if __name__ == "__main__":
    main()

"""A/B of the decode-graph launch settings of one artifact: programmatic dependent launch (runtime/ops/pdl.py) off,
on for the small decode graphs of a quantized model (``auto``, the default), on every launch, and the FP8 decode
GEMM's configuration for narrow weights (triton_w8a8.FP8_DECODE_NARROW) against FP8_DECODE on every shape.

Per setting the engine is loaded again (its graphs captured under that setting) and measured: greedy tokens of
one prompt (the settings that only change launches must agree), async decode tok/s at batch 1 / 4 / 16
(bench/quant_engine.py's decode_rate; at batch 1 also with the prefill excluded: decode_only_rate), and the GPU
time of one replay of each bucket's decode graph (1, 2, 4, 8, 16) with that many sequences decoding, and the time
to the first token of one fresh prompt of 256 and of 1000 tokens (prefill_ms_p256 / _p1000). Settings
of one artifact alternate, so a repeated one (name#2) shows the run-to-run spread.

    python bench/pdl_auto.py --variants fp8,w4a16-mma,bf16 --out bench/results/pdl-auto-8b-h200.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from artifacts.manifest import MANIFEST_NAME  # noqa: E402
from bench import quant_engine as q  # noqa: E402
from bench.engine import make_checkpoint  # noqa: E402
from bench.quant_gemm import dumps  # noqa: E402


def _prefill(block_m: int, row_blocks: int, stages: int):
    from runtime.ops.triton_gemm import GemmConfig

    return GemmConfig(block_m, 64, 128, num_stages=stages, serial=True, wide=True, row_blocks=row_blocks,
                      scale_acc=False, m_fast=True)


WIDE = {"FP8_DECODE_NARROW": {"block_k": 128, "waves": 1}}  # FP8_DECODE on every shape (before NARROW)
# setting -> (AUTO_MAX_BATCH or None for the default, ENABLED, kernel overrides)
SETTINGS = {"nopdl": (0, False, {}), "auto": (None, False, {}), "all": (0, True, {}), "nopdl-wide": (0, False, WIDE),
            # the Gluon W4A16 decode GEMM (runtime/ops/wna16_gluon.py) up to 1 / 8 / 16 rows, on the same build
            **{f"gluon{m}": (None, False, {"WNA16_MMA_GLUON_MAX_M": m}) for m in (1, 8, 16)},
            # ... up to 8 rows: its weights loaded after the wait for the previous kernel (late), L2 prefetch of
            # 8 / 16 more K tiles before that wait (pf8, pf16), 6 stages (s6)
            **{f"gluon8-{name}": (None, False, {"WNA16_MMA_GLUON_MAX_M": 8, "WNA16_MMA_GLUON": fields})
               for name, fields in (("late", {"early": False}), ("pf8", {"l2pf": 8}), ("pf16", {"l2pf": 16}),
                                    ("s6", {"num_stages": 6}))},
            # ... up to 8 rows, split-K aiming at 1 / 3 / 4 programs per SM instead of 2 (GemmConfig.waves)
            **{f"gluon-w{w}": (None, False, {"WNA16_MMA_GLUON": {"waves": w}}) for w in (1, 3, 4)},
            # RoPE + KV write and decode attention reading their inputs, tables and earlier KV before the PDL wait
            # (triton_rope_cache / triton_decode EARLY_LOADS), both and attention's alone
            "early-attn": (None, False, {"triton_decode.EARLY_LOADS": True, "triton_rope_cache.EARLY_LOADS": True}),
            "early-decode": (None, False, {"triton_decode.EARLY_LOADS": True}),
            # where the kernels let the next one launch (pdl.TRIGGER): the short kernels before their wait (2), and
            # the Gluon W4A16 GEMM too, once its first stages are issued (3)
            **{f"trigger{t}": (None, False, {"pdl.TRIGGER": t}) for t in (2, 3)},
            "trigger3-early": (None, False, {"pdl.TRIGGER": 3, "triton_decode.EARLY_LOADS": True,
                                             "triton_rope_cache.EARLY_LOADS": True}),
            # ... with 6 / 8 stages for every shape: each program of qkv (8 K tiles at the 8B shape on 132 SMs; o's
            # have 4) then loads its whole slice of the weights before its wait
            **{f"trigger3-s{st}": (None, False, {"pdl.TRIGGER": 3, "WNA16_MMA_GLUON": {"num_stages": st}})
               for st in (6, 8)},
            # ... with attention's stretch shortened: once o's and gate_up's weights load during it (the trigger
            # levels), qkv's end to the merge's end is the step's critical path, where before it was hidden behind
            # o's own loads (so dyn-attn and serial-attn alone bought nothing, NOTES-wna16 9): one split for a short
            # context (DYNAMIC_SPLITS), or the splits merged without the reduce launch (SERIAL_REDUCE)
            **{f"trigger{t}-{name}": (None, False, {"pdl.TRIGGER": t, **flags}) for t in (2, 3) for name, flags in (
                ("dyn", {"triton_decode.DYNAMIC_SPLITS": True}), ("serial", {"triton_decode.SERIAL_REDUCE": True}),
                ("dyn-serial", {"triton_decode.DYNAMIC_SPLITS": True, "triton_decode.SERIAL_REDUCE": True}))},
            # attention's splits merged by the last one to finish instead of a reduce launch (triton_decode)
            "serial-attn": (None, False, {"triton_decode.SERIAL_REDUCE": True}),
            # each sequence's attention splits from its own context (triton_decode.DYNAMIC_SPLITS)
            "dyn-attn": (None, False, {"triton_decode.DYNAMIC_SPLITS": True}),
            # a build with passes.fuse_norm_epilogue (quant_engine's w4a16-mma+lm+ne) running its ops in the normed
            # form: the GEMM, then the norm kernel, as without the pass
            "no-norm-epilogue": (None, False, {"WNA16_NORM_EPILOGUE": False}),
            "no-norm-epilogue-dyn-attn": (None, False, {"WNA16_NORM_EPILOGUE": False,
                                                        "triton_decode.DYNAMIC_SPLITS": True}),
            # a build with passes.fuse_silu_epilogue (w4a16-mma+lm+ne+se) running it as the GEMM, then the
            # silu_and_mul kernel; and everything off (the norm and SiLU kernels, attention sized for the longest)
            "no-silu-epilogue": (None, False, {"WNA16_SILU_EPILOGUE": False}),
            "no-silu-epilogue-dyn-attn": (None, False, {"WNA16_SILU_EPILOGUE": False,
                                                        "triton_decode.DYNAMIC_SPLITS": True}),
            "no-epilogues": (None, False, {"WNA16_SILU_EPILOGUE": False, "WNA16_NORM_EPILOGUE": False}),
            "dyn-attn-serial": (None, False, {"triton_decode.DYNAMIC_SPLITS": True,
                                              "triton_decode.SERIAL_REDUCE": True}),
            # the FP8 decode GEMM in Gluon (runtime/ops/fp8_gluon.py, triton_w8a8.FP8_GLUON): its first stages' weights
            # loaded before its PDL wait; 6 stages; with the trigger levels (3: it too lets the next kernel launch once
            # those loads are issued)
            "fp8-gluon": (None, False, {"FP8_GLUON": True}),
            "fp8-gluon-s6": (None, False, {"FP8_GLUON": True, "FP8_GLUON_STAGES": 6}),
            **{f"fp8-gluon-trigger{t}": (None, False, {"FP8_GLUON": True, "pdl.TRIGGER": t}) for t in (2, 3)},
            # W4A16 prefill through _wna16_mma_wide_kernel (triton_wna16_mma.WNA16_MMA_PREFILL; read prefill_ms_p256 /
            # p1000): 2 or 1 64-row blocks per program, the scale in the weight, a weight block's row tiles together
            **{f"prefill-m{bm}r{rb}": (None, False, {"WNA16_MMA_PREFILL": _prefill(bm, rb, st)})
               for bm, rb, st in ((128, 2, 2), (128, 1, 2), (64, 2, 3))}}
PLANS = {"fp8": "nopdl-wide,auto,nopdl,auto", "w4a16-mma": "nopdl,auto", "bf16": "nopdl,auto"}


@contextlib.contextmanager
def applied(variant: str, setting: str):
    """The setting (SETTINGS) in force for the duration, over the variant's own kernel overrides
    (quant_engine.VARIANTS): PDL's reach (pdl.AUTO_MAX_BATCH, pdl.ENABLED) and the kernel overrides."""
    from runtime.ops import pdl

    max_batch, enabled, kernels = SETTINGS[setting]
    saved = pdl.AUTO_MAX_BATCH, pdl.ENABLED
    pdl.AUTO_MAX_BATCH, pdl.ENABLED = saved[0] if max_batch is None else max_batch, enabled
    try:
        with q.kernel_overrides({**q.VARIANTS.get(variant, {}).get("kernels", {}), **kernels}):
            yield
    finally:
        pdl.AUTO_MAX_BATCH, pdl.ENABLED = saved


def measure(llm, buckets=(1, 2, 4, 8, 16)) -> dict:
    from runtime import SamplingParams

    eng = llm.engine
    r: dict = {}
    out = llm.generate([list(range(100, 228))], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    r["tokens"] = list(out[0].outputs[0].token_ids)
    eng.async_scheduling = True
    for bs in (1, 4, 16):
        r[f"bs{bs}_async"] = round(q.decode_rate(llm, bs, new=256 if bs == 1 else 128), 1)
    r["bs1_decode_only"] = round(q.decode_only_rate(llm, 1), 1)  # prefill excluded (1 / TPOT)
    for n in (256, 1000):  # one fresh prompt's prefill and first token (no prefix-cache hit): the GEMMs at M = n
        r[f"prefill_ms_p{n}"] = round(1000 * min(q._generate_s(llm, [torch.randint(100, 1000, (n,)).tolist()], 1)
                                                 for _ in range(4)), 2)
    graphs = eng.runner.graphs
    r["pdl_max_batch"] = graphs.pdl_max_batch
    for bs in buckets:
        for i in range(bs):
            eng.add_request(f"p{bs}-{i}", list(range(100 + i, 228 + i)),
                            SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
        for _ in range(10):
            eng.step()
        graph = graphs.bucket_for(bs).graph
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        r[f"replay_ms_b{bs}"] = round(start.elapsed_time(end) / 200, 4)
        while eng.has_unfinished_requests():
            eng.step()
    return r


def main() -> None:
    from runtime import LLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b", choices=["1b", "8b"])
    ap.add_argument("--variants", default="fp8,w4a16-mma,bf16", help="bench/quant_engine.py builds")
    ap.add_argument("--plan", action="append", default=[],
                    help="VARIANT=SETTING,SETTING,... (the settings run on that build, in order; default PLANS, "
                         "else auto)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", default=None, help="build into KEEP/VARIANT and keep it (an artifact already there is "
                                                 "reused; bench/profile_decode.py --artifact takes it)")
    args = ap.parse_args()
    plans = dict(PLANS)
    for p in args.plan:  # checked before the checkpoint is written, not after minutes of building
        variant, _, settings = p.partition("=")
        bad = [s for s in settings.split(",") if s not in SETTINGS]
        if not settings or bad:
            ap.error(f"--plan {p!r}: VARIANT=SETTING,... with settings from {', '.join(SETTINGS)}")
        plans[variant] = settings
    res: dict = {"device": torch.cuda.get_device_name(), "shape": args.shape, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_checkpoint(args.shape, tmp / "hf")
        for variant in args.variants.split(","):
            t = time.perf_counter()
            dest = Path(args.keep) / variant if args.keep else tmp / variant
            art = dest if (dest / MANIFEST_NAME).exists() else q.build(tmp / "hf", dest, variant, 16)
            print(f"{variant} built in {time.perf_counter() - t:.0f} s", flush=True)
            seen: dict[str, int] = {}
            for setting in plans.get(variant, "auto").split(","):
                seen[setting] = seen.get(setting, 0) + 1
                label = setting + (f"#{seen[setting]}" if seen[setting] > 1 else "")
                with applied(variant, setting):
                    llm = LLM(str(art), gpu_memory_utilization=0.5)
                    r = {"variant": variant, "setting": label, **measure(llm)}
                print(json.dumps(r), flush=True)
                res["rows"].append(r)
                if args.out:
                    Path(args.out).write_text(dumps(res))
                del llm
                gc.collect()
                torch.cuda.empty_cache()
            if not args.keep:
                shutil.rmtree(dest, ignore_errors=True)


if __name__ == "__main__":
    main()

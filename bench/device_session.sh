#!/usr/bin/env bash
# One step of bench/NOTES-wna16.md item 13 on a lent GPU (the device tool runs it in the repository root, with the
# git-ignored wheelhouse .whl/ carried for the packages the device's python lacks):
#
#     bash bench/device_session.sh STEP        STEP: trigger-short | trigger | tests-kernels | tests-pdl | timeline SETTING |
#                                              prefill-gemm | prefill-engine | fp8-gluon
#
# Each step stays under the tool's 10 minutes (its own timeout) and writes its JSON under $OUT. Steps share builds
# through /tmp/keep while the machine stays warm (trigger builds them; timeline and prefill-engine reuse them).
set -uo pipefail
OUT=${OUT:-/tmp/spanda-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >/dev/null 2>&1
    export PYTHONPATH=/tmp/site:.
else
    export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1
W=w4a16-mma+lm
case "${1:-}" in
    trigger-short)  # the first call when failed starts have eaten the budget (each costs about 180 s): under 330 s
        timeout 330 python3 bench/pdl_auto.py --variants "$W,bf16" --keep /tmp/keep --out "$OUT/pdl-trigger.json" \
            --plan "$W=auto,trigger3,trigger2,auto" --plan bf16=auto ;;
    trigger)  # where each kernel lets the next one launch, with attention's stretch shortened; bf16 on the same GPU
        timeout 570 python3 bench/pdl_auto.py --variants "$W,bf16" --keep /tmp/keep --out "$OUT/pdl-trigger.json" \
            --plan "$W=auto,trigger2,trigger3,trigger3-s8,trigger3-dyn,trigger3-serial,auto,trigger3" --plan bf16=auto ;;
    tests-kernels)  # the Gluon kernel at each trigger level, the prefill kernel's configurations, the FP8 Gluon GEMM
        timeout 570 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_wna16_gluon.py tests/test_wna16_mma.py \
            tests/test_fp8_gluon.py -k "reference_on_gpu or kernel_on_gpu or applies_on_gpu" ;;
    fp8-gluon)  # the FP8 Gluon decode GEMM (weights before the PDL wait) against the Triton one, bf16 on the same GPU
        timeout 570 python3 bench/pdl_auto.py --variants "fp8,bf16" --out "$OUT/pdl-fp8-gluon.json" \
            --plan "fp8=auto,fp8-gluon,fp8-gluon-trigger3,fp8-gluon-s6,auto,fp8-gluon" --plan bf16=auto ;;
    tests-pdl)  # greedy tokens with PDL off / early loads / the trigger levels, bf16 and fp8 builds
        timeout 570 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k programmatic ;;
    timeline)  # the middle layer's kernels on one time axis under setting $2
        timeout 570 python3 bench/profile_decode.py --artifact "/tmp/keep/$W" --variant "$W" --setting "${2:?SETTING}" \
            --out "$OUT/profile-timeline-${2}.json" ;;
    prefill-gemm)  # the prefill kernel's candidates per 8B layer, L2 emptied, against cuBLAS bf16
        timeout 570 python3 bench/quant_gemm.py --decode --decode-ms 256,1024 --decode-ops w4a16 \
            --decode-labels "mma wide,mma auto" --out "$OUT/quant-gemm-prefill.json" ;;
    prefill-engine)  # time to first token (prefill_ms_p256 / _p1000) with each prefill configuration
        timeout 570 python3 bench/pdl_auto.py --variants "$W" --keep /tmp/keep --out "$OUT/pdl-prefill.json" \
            --plan "$W=auto,prefill-m128r2,prefill-m128r1,prefill-m64r2" ;;
    *)
        echo "usage: bash bench/device_session.sh trigger-short | trigger | tests-kernels | tests-pdl | timeline SETTING | prefill-gemm | prefill-engine | fp8-gluon" >&2
        exit 2 ;;
esac

"""Quantization (issue 6, in progress): checkpoint layouts (GPTQ v1/v2, AWQ GEMM) and the RTN baseline.

Not wired into the build yet: recipes still accept only ``quantization.method: none``.
"""

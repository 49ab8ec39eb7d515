"""The shipped Triton kernel cache, moved from the build's directory to the runtime's private copy, must still
be found by Triton (no silent recompilation). Uses Triton's own cache manager; no GPU needed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from triton.runtime.cache import FileCacheManager  # noqa: E402

from runtime.kernel_cache import count_kernels, relocate_groups  # noqa: E402

KEY = "0" * 64


def _group(cache_dir: Path) -> dict | None:
    previous = triton.knobs.cache.dir
    triton.knobs.cache.dir = str(cache_dir)
    try:
        return FileCacheManager(KEY).get_group("_kernel.json")
    finally:
        triton.knobs.cache.dir = previous


def test_moved_cache_is_found_after_relocation(tmp_path: Path) -> None:
    build_dir = tmp_path / "build-tmp" / "kernels"  # where the build's Triton wrote the kernel
    previous = triton.knobs.cache.dir
    triton.knobs.cache.dir = str(build_dir)
    try:
        m = FileCacheManager(KEY)
        group = {"_kernel.cubin": m.put(b"\x7fELF", "_kernel.cubin"), "_kernel.json": m.put("{}", "_kernel.json",
                                                                                          binary=False)}
        m.put_group("_kernel.json", group)
    finally:
        triton.knobs.cache.dir = previous
    private = tmp_path / "runtime-copy"
    shutil.copytree(build_dir, private)
    shutil.rmtree(tmp_path / "build-tmp")  # the build's temp dir is gone once the artifact is published
    assert count_kernels(private) == 1
    assert not _group(private)  # as Triton sees the copy: no files, so it would compile the kernel again

    assert relocate_groups(private) == 1
    found = _group(private)
    assert found is not None and set(found) == {"_kernel.cubin", "_kernel.json"}
    assert all(Path(p).parent.parent == private and Path(p).exists() for p in found.values())


def test_compilation_listener_forgets_engines_that_are_gone(caplog) -> None:
    """Triton's compilation listener is process-global: compilations after an engine is gone (a second build
    or engine in the same process) are not counted against it nor reported as its run-time JIT."""
    import gc
    import logging

    from runtime.kernel_cache import KernelCache

    previous = triton.knobs.compilation.listener
    try:
        kc = KernelCache.__new__(KernelCache)  # the counting part only (no artifact)
        kc.compiled, kc.loaded = [], 0
        kc._listen(triton)
        listener = triton.knobs.compilation.listener
        with caplog.at_level(logging.WARNING, logger="spanda.runtime"):
            listener(src=None, metadata={"name": "_k"}, metadata_group={}, times=None, cache_hit=False)
            listener(src=None, metadata={"name": "_k"}, metadata_group={}, times=None, cache_hit=True)
            assert kc.compiled == ["_k"] and kc.loaded == 1
            assert caplog.text.count("compiled kernel _k at run time") == 1
            del kc
            gc.collect()
            listener(src=None, metadata={"name": "_later"}, metadata_group={}, times=None, cache_hit=False)
        assert "_later" not in caplog.text
    finally:
        triton.knobs.compilation.listener = previous


def test_a_build_forgets_the_kernels_the_process_compiled() -> None:
    """compile_kernels starts by emptying the in-memory caches of Spanda's Triton kernels, so
    that its warm-up compiles each kernel into the artifact instead of launching a copy an earlier build or a
    GPU calibration left in memory (a fresh server would then compile it at load). The GPU end of this is
    tests/test_gpu.py::test_a_second_build_in_one_process_ships_every_kernel_too."""
    from compiler.kernels import forget_compiled_kernels
    from runtime.ops import triton_attention, triton_gemm, triton_w8a8_kernels

    kernels = [triton_gemm._split_reduce_kernel, triton_w8a8_kernels._w8a8_gemm_kernel]
    kernels += [v for v in vars(triton_attention).values() if isinstance(v, triton.runtime.jit.JITFunction)][:1]
    for k in kernels:  # what a launch leaves (dict.__setitem__: the defaultdict would ask for a GPU driver)
        dict.__setitem__(k.device_caches, 0, ("compiled kernels of device 0",))
    assert forget_compiled_kernels() >= len(kernels)
    assert all(len(k.device_caches) == 0 for k in kernels)


def test_warm_up_prefills_every_gemm_band_below_the_cublas_threshold() -> None:
    """A server meets a quantized GEMM at any number of rows; between 17 rows and the point where the weight is
    dequantized for cuBLAS (triton_wna16.DEQUANT_MM_MIN_M), each launcher picks block_m by M and then split-K by
    the number of row tiles, both compile-time constants of the kernel. The build's warm-up must prefill at
    least one length in every such (config, row tiles) band, or the server compiles at run time (as it did for
    16 requests extending 16 uncached tokens each: 256 rows, before these lengths)."""
    from compiler.kernels import warm_up_lengths
    from runtime.ops import triton_w8a8 as t8
    from runtime.ops import triton_wna16 as tw
    from runtime.ops import triton_wna16_mma as tm

    lengths = warm_up_lengths(dict(max_seq_len=4096, max_num_batched_tokens=8192))
    choosers = {"wna16_mma": tm.wna16_mma_config, "wna16 4-bit": lambda m: tw.wna16_config(m, 4096, 4096, 4),
                "wna16 8-bit": lambda m: tw.wna16_config(m, 4096, 4096, 8), "int8": lambda m: t8.int8_config(m, 1, 1)}
    # (FP8 runs its Triton GEMM up to FP8_TRITON_MAX_M = 16 rows only: the decode buckets; then _scaled_mm)
    for name, choose in choosers.items():
        def band(m, choose=choose):
            cfg = choose(m)
            return repr(cfg) if cfg.dequant_mm else (repr(cfg), -(-m // cfg.block_m))

        need = {band(m) for m in range(17, tw.DEQUANT_MM_MIN_M)}
        missing = need - {band(m) for m in lengths}
        assert not missing, f"{name}: no warm-up length in {sorted(missing)[:3]}"

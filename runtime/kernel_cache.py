"""The artifact's compile-time GPU work at load: pinned kernel configs and the shipped Triton kernel cache.

The build tunes the Triton kernels for the model's shapes and buckets on the target GPU (``tuning.json``)
and compiles every kernel the engine launches into ``kernels/`` (a Triton cache directory). At load the
runtime pins those configs (it never autotunes) and points Triton at a private copy of that cache, so a
matching GPU starts with no JIT compilation at all. ``new_compilations()`` counts kernels compiled since.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
from pathlib import Path

from artifacts.store import Artifact, ArtifactIncompatibleError

log = logging.getLogger("spanda.runtime")


def count_kernels(cache_dir: Path) -> int:
    """Compiled kernels in a Triton cache dir (one folder per kernel specialization holding a .cubin)."""
    return sum(1 for _ in cache_dir.glob("*/*.cubin")) if cache_dir.is_dir() else 0


class KernelCache:
    def __init__(self, artifact: Artifact, gpu_arch: str | None, allow_jit: bool):
        self.dir: Path | None = None
        self.at_load = 0
        info = artifact.manifest.kernels
        if info is None:
            return
        if info.tuning_file:
            from runtime.ops import triton_attention

            if triton_attention.AVAILABLE:
                triton_attention.pin(json.loads(artifact.file(info.tuning_file).read_text())["attention"])
                log.info("pinned autotuned kernel configs from %s", info.tuning_file)
        if info.cache_dir:
            self._activate(artifact, info.cache_dir, gpu_arch, allow_jit)

    def _activate(self, artifact: Artifact, cache_dir: str, gpu_arch: str | None, allow_jit: bool) -> None:
        import triton

        env = artifact.manifest.envelope
        if env.gpu_arch != gpu_arch or env.triton != triton.__version__:
            msg = (f"the artifact's kernels were compiled for {env.gpu_arch} with triton {env.triton}; this GPU is "
                   f"{gpu_arch} with triton {triton.__version__}")
            if not allow_jit:
                raise ArtifactIncompatibleError("envelope.gpu_arch", env.gpu_arch, gpu_arch,
                                                msg + ": rebuild for this GPU, or allow recompiling (--allow-jit)")
            log.warning("%s: recompiling kernels (allow_jit)", msg)
            return
        self.dir = Path(tempfile.mkdtemp(prefix="spanda-kernels-"))
        atexit.register(shutil.rmtree, self.dir, ignore_errors=True)  # a private copy: gone with the process
        shutil.copytree(artifact.path / cache_dir, self.dir, dirs_exist_ok=True)
        triton.knobs.cache.dir = str(self.dir)
        self.at_load = count_kernels(self.dir)
        log.info("using the artifact's %d precompiled kernels (Triton cache %s)", self.at_load, self.dir)

    def new_compilations(self) -> int:
        """Kernels Triton compiled (and so wrote to the cache) since load: 0 for a matching GPU."""
        return count_kernels(self.dir) - self.at_load if self.dir is not None else 0

"""The artifact's compile-time GPU work at load: pinned kernel configs and the shipped Triton kernel cache.

The build tunes the Triton kernels for the model's shapes and buckets on the target GPU (``tuning.json``)
and compiles every kernel the engine launches into ``kernels/`` (a Triton cache directory). At load the
runtime pins those configs (it never autotunes) and points Triton at a private copy of that cache, so a
matching GPU starts with no JIT compilation at all.

Triton finds a cached kernel through a group file (``<hash>/__grp__<kernel>.json``) that lists the absolute
paths of the kernel's files as they were written at build time, inside the build's temporary directory. Those
paths do not exist where the artifact is loaded, and Triton then silently recompiles the kernel into the same
files, so counting files cannot see it. The private copy therefore has its group files rewritten to point at
itself, and compilations are counted with Triton's compilation listener (every cache miss), not by files.
``new_compilations()`` is that count; ``compiled`` names the kernels.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
import weakref
from pathlib import Path

from artifacts.store import Artifact, ArtifactIncompatibleError

log = logging.getLogger("spanda.runtime")

GROUP_PREFIX = "__grp__"


def count_kernels(cache_dir: Path) -> int:
    """Compiled kernels in a Triton cache dir (one folder per kernel specialization holding a .cubin)."""
    return sum(1 for _ in cache_dir.glob("*/*.cubin")) if cache_dir.is_dir() else 0


def relocate_groups(cache_dir: Path) -> int:
    """Point every group file of a copied Triton cache at the files beside it (the build wrote absolute
    paths into its own temporary directory). Returns the number of group files rewritten."""
    n = 0
    for grp in cache_dir.glob(f"*/{GROUP_PREFIX}*.json"):
        data = json.loads(grp.read_text())
        children = data.get("child_paths")
        if not isinstance(children, dict):
            continue
        data["child_paths"] = {name: str(grp.parent / Path(path).name) for name, path in children.items()}
        grp.write_text(json.dumps(data))
        n += 1
    return n


class KernelCache:
    def __init__(self, artifact: Artifact, gpu_arch: str | None, allow_jit: bool):
        self.dir: Path | None = None
        self.at_load = 0
        self.compiled: list[str] = []  # kernels Triton compiled (cache misses) since load
        self.loaded = 0  # kernel specializations Triton found in the cache
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
        groups = relocate_groups(self.dir)
        triton.knobs.cache.dir = str(self.dir)
        self._listen(triton)
        self.at_load = count_kernels(self.dir)
        log.info("using the artifact's %d precompiled kernels (%d groups, Triton cache %s)", self.at_load, groups,
                 self.dir)

    def _listen(self, triton) -> None:
        previous = triton.knobs.compilation.listener
        # Triton's listener is process-global: hold this cache weakly, so that a later build or engine in the
        # same process is not reported against an engine that is gone
        ref = weakref.ref(self)

        def listener(*, src, metadata, metadata_group, times, cache_hit) -> None:
            kc = ref()
            if kc is not None and cache_hit:
                kc.loaded += 1
            elif kc is not None:
                name = metadata.get("name", "?") if isinstance(metadata, dict) else "?"
                kc.compiled.append(name)
                log.warning("Triton compiled kernel %s at run time (not in the artifact's kernel cache)", name)
            if previous is not None:
                previous(src=src, metadata=metadata, metadata_group=metadata_group, times=times,
                         cache_hit=cache_hit)

        triton.knobs.compilation.listener = listener

    def new_compilations(self) -> int:
        """Kernels Triton compiled since load (cache misses, from its compilation listener): 0 for a matching
        GPU. Counted only when the artifact's cache is in use."""
        return len(self.compiled)

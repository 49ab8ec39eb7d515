"""The runtime envelope: what an artifact was built for, and whether this runtime may serve it.

The rule (`check_envelope`):

1. torch major.minor must match. The graph is a torch.export program, whose serialized format and
   op schemas belong to one torch release. Field: `envelope.torch`.
2. A cuda artifact served on cuda must match gpu_arch (e.g. sm_90): tuning.json, the kernel cache and
   some ops (FP8 needs sm_89+) are per architecture. Field: `envelope.gpu_arch`.
3. Across devices (a cpu-built artifact on cuda, or a cuda-built one on cpu) the artifact may be
   served only on the pure-PyTorch path: reference ops, no tuning, no kernel cache. `check_envelope`
   then returns False ("not native"), and the runtime must take that path. With
   `require_native=True` (the caller wants the fast path) it raises instead. Field: `envelope.device`.
4. A different triton major.minor is only warned about: Triton kernels are compiled from source at
   load and the kernel cache is rebuilt, though tuned configs may no longer be the fastest.

`allow_mismatch=True` turns every refusal into a logged warning (for experiments, never production).
"""

from __future__ import annotations

import logging
import platform
import re
from importlib import metadata

from artifacts.errors import ArtifactIncompatibleError
from artifacts.manifest import Envelope, Manifest

log = logging.getLogger("spanda.artifacts")


def major_minor(version: str) -> tuple[int, int] | None:
    """'2.13.0+cpu' -> (2, 13); None when the string does not start with N.N."""
    m = re.match(r"^\s*(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_envelope(
    manifest: Manifest,
    *,
    device: str,
    gpu_arch: str | None,
    torch_version: str,
    allow_mismatch: bool = False,
    triton_version: str | None = None,
    require_native: bool = False,
) -> bool:
    """Check `manifest.envelope` against this runtime (rules in the module docstring).

    device: the runtime's device, "cpu" or "cuda". gpu_arch: e.g. "sm_90" (None on cpu).
    Returns True when the artifact is native here (same device and, on cuda, same gpu_arch): its
    tuning and kernel cache apply. False: serve it on the pure-PyTorch path.
    Raises ArtifactIncompatibleError naming the field, unless allow_mismatch (then it warns).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    env = manifest.envelope

    def refuse(field: str, ours: object, theirs: object, hint: str) -> None:
        err = ArtifactIncompatibleError(field, theirs, ours, hint)
        if not allow_mismatch:
            raise err
        log.warning("allowing envelope mismatch: %s", err)

    if major_minor(env.torch) != major_minor(torch_version):
        refuse(
            "envelope.torch",
            torch_version,
            env.torch,
            "torch major.minor must match the build's; rebuild the artifact or install that torch",
        )
    native = env.device == device
    if not native:
        if require_native:
            refuse(
                "envelope.device",
                device,
                env.device,
                "a cross-device artifact runs only on the pure-PyTorch path",
            )
        else:
            log.info(
                "artifact built for %s, serving on %s: pure-PyTorch path (no tuning, no kernel cache)",
                env.device,
                device,
            )
    elif device == "cuda" and env.gpu_arch != gpu_arch:
        native = False
        refuse(
            "envelope.gpu_arch",
            gpu_arch,
            env.gpu_arch,
            "tuning and kernels are per GPU architecture; rebuild on this GPU",
        )
    if triton_version and env.triton and major_minor(triton_version) != major_minor(env.triton):
        log.warning(
            "artifact built with triton %s, this runtime has %s: kernels recompile at load",
            env.triton,
            triton_version,
        )
    return native


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def current_envelope(device: str) -> Envelope:
    """The envelope of this process on `device` ("cpu" or "cuda"): what a build records and what
    a runtime compares. Imports torch lazily; on cuda reads the current GPU's capability."""
    import torch

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    gpu_arch = None
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        gpu_arch = f"sm_{major}{minor}"
    return Envelope(
        device=device,  # type: ignore[arg-type]
        gpu_arch=gpu_arch,
        torch=torch.__version__,
        triton=_package_version("triton") if device == "cuda" else None,
        cuda=torch.version.cuda if device == "cuda" else None,
        python=platform.python_version(),
    )

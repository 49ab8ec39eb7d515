"""Errors of the artifacts package (re-exported by `artifacts.store`)."""

from __future__ import annotations

from pathlib import Path


class ArtifactError(Exception):
    """Base of every artifact problem."""


class ArtifactCorruptError(ArtifactError):
    """A listed file is missing or fails its size or sha256 check."""

    def __init__(self, artifact: Path, file: str, check: str, expected: object, got: object) -> None:
        self.artifact, self.file, self.check, self.expected, self.got = artifact, file, check, expected, got
        super().__init__(
            f"artifact {artifact}: file {file!r} failed its {check} check: expected {expected}, got {got}"
        )


class ArtifactIncompatibleError(ArtifactError):
    """The artifact's schema or envelope does not fit this runtime. `field`: e.g. "envelope.torch"."""

    def __init__(self, field: str, artifact_value: object, runtime_value: object, hint: str = "") -> None:
        self.field, self.artifact_value, self.runtime_value = field, artifact_value, runtime_value
        msg = f"{field} is {artifact_value!r} in the artifact, this runtime has {runtime_value!r}"
        super().__init__(msg + (f" ({hint})" if hint else ""))


class ArtifactExistsError(ArtifactError):
    """The destination exists and overwrite was not asked for."""

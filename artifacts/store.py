"""Writing and reading artifact directories: atomic commit, hash verification, errors.

Layout of an artifact: a directory holding `manifest.json` plus the files it lists (graph, weight
shards, tokenizer files, tuning, eval), each recorded with its size and sha256.

Writing (`ArtifactWriter`) happens in a temp dir beside the destination (same filesystem), and the
manifest is written last, after every file is hashed and fsynced; one rename then publishes the whole
directory. A failed or interrupted build leaves the destination untouched and no temp dir behind
(except after SIGKILL/power loss: then a `.NAME.tmp-*` dir may remain and can be deleted).

Reading (`open_artifact`) checks the schema version, that every listed file exists with its size
and, unless told not to, its sha256. A loader that reads a file anyway (the weight shards) may defer
that file's hash to the read itself (`open_artifact(..., defer_hashes=...)` then
`Artifact.open_verified`): one pass over the bytes instead of two, and the file is still refused, by
name, before the loader returns anything read from it. `check_envelope` (from `artifacts.envelope`,
re-exported here) compares the artifact's build envelope with the runtime's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from artifacts.envelope import check_envelope, current_envelope
from artifacts.errors import (
    ArtifactCorruptError,
    ArtifactError,
    ArtifactExistsError,
    ArtifactIncompatibleError,
)
from artifacts.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Manifest,
    ManifestError,
    SchemaVersionError,
    format_size,
    parse_manifest,
)

__all__ = [
    "CHUNK",
    "Artifact",
    "ArtifactCorruptError",
    "ArtifactError",
    "ArtifactExistsError",
    "ArtifactIncompatibleError",
    "ArtifactWriter",
    "VerifyingReader",
    "check_envelope",
    "current_envelope",
    "hash_tree",
    "list_files",
    "open_artifact",
    "read_manifest",
    "sha256_bytes",
    "sha256_file",
    "verify_files",
]

log = logging.getLogger("spanda.artifacts")

CHUNK = 8 << 20


# ---------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike[str], chunk: int = CHUNK) -> str:
    """Hex sha256 of a file's bytes, read `chunk` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def list_files(root: Path) -> list[str]:
    """Every regular file under `root` as a sorted relative posix path, manifest.json excluded."""
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def hash_tree(root: Path, *, fsync: bool = False) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"size": int, "sha256": hex}} for every file under root but the manifest."""
    files: dict[str, dict[str, Any]] = {}
    for rel in list_files(root):
        p = root / rel
        if p.is_symlink() or not p.is_file():
            raise ArtifactError(f"{p}: artifacts hold regular files only (no links, devices or fifos)")
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
            if fsync:
                os.fsync(f.fileno())
        files[rel] = {"size": p.stat().st_size, "sha256": h.hexdigest()}
    return files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- writing


ManifestSource = dict[str, Any] | Callable[[dict[str, dict[str, Any]]], dict[str, Any]]


class ArtifactWriter:
    """Builds an artifact in a temp dir and publishes it atomically on `commit`.

        with ArtifactWriter(out_dir) as w:
            save_graph(w.path / "graph.pt2")
            w.write_json("tuning.json", configs)
            w.commit(manifest_without_files)   # hashes, writes manifest.json, renames into place

    Leaving the block by an exception (KeyboardInterrupt included) or without `commit` removes the
    temp dir and leaves `out_dir` as it was.
    """

    def __init__(self, out_dir: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        self._tmp: Path | None = None
        self._committed = False

    def __enter__(self) -> ArtifactWriter:
        if self._tmp is not None or self._committed:
            raise ArtifactError("an ArtifactWriter is single-use")
        if self.out_dir.exists() and not self.overwrite:
            raise ArtifactExistsError(f"{self.out_dir} exists; pass overwrite=True to replace it")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{secrets.token_hex(6)}"
            try:
                tmp.mkdir()
                break
            except FileExistsError:
                continue
        self._tmp = tmp
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._tmp is not None and not self._committed:
            shutil.rmtree(self._tmp, ignore_errors=True)
            if exc_type is None:
                log.warning("artifact writer for %s closed without commit; nothing written", self.out_dir)
        self._tmp = None

    @property
    def path(self) -> Path:
        """The temp dir the builder writes into (valid inside the with-block, before commit)."""
        if self._tmp is None or self._committed:
            raise ArtifactError("ArtifactWriter.path is only valid inside the with-block, before commit")
        return self._tmp

    def _target(self, name: str) -> Path:
        if name == MANIFEST_NAME:
            raise ArtifactError(f"{MANIFEST_NAME} is written by commit(), not by the builder")
        p = self.path / name
        if not p.resolve().is_relative_to(self.path.resolve()):
            raise ArtifactError(f"file name {name!r} escapes the artifact directory")
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, name: str, obj: Any) -> Path:
        """Write `obj` as JSON with sorted keys and indent 2 (byte-stable for equal objects)."""
        return self.write_text(name, json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n")

    def write_text(self, name: str, text: str) -> Path:
        p = self._target(name)
        p.write_text(text, encoding="utf-8")
        return p

    def write_bytes(self, name: str, data: bytes) -> Path:
        p = self._target(name)
        p.write_bytes(data)
        return p

    def copy_file(self, src: str | os.PathLike[str], name: str | None = None) -> Path:
        """Copy `src`'s bytes (not its metadata) to `name` (default: src's file name)."""
        p = self._target(name if name is not None else Path(src).name)
        shutil.copyfile(src, p)
        return p

    def commit(self, manifest: ManifestSource) -> Manifest:
        """Hash every file, fill `files`, write manifest.json last, fsync, and rename into place.

        `manifest` is the manifest dict without `files` (schema_version defaults to SCHEMA_VERSION),
        or a callable that receives the computed files mapping and returns that dict.
        Returns the validated Manifest. Raises ArtifactError if the manifest does not validate.
        """
        tmp = self.path
        files = hash_tree(tmp, fsync=True)
        data = dict(manifest(files) if callable(manifest) else manifest)
        if "files" in data:
            raise ArtifactError("commit() fills `files` itself; pass the manifest without it")
        data.setdefault("schema_version", SCHEMA_VERSION)
        data["files"] = files
        try:
            parsed = parse_manifest(data)
        except ManifestError as err:
            raise ArtifactError(f"manifest for {self.out_dir} does not validate: {err}") from None
        text = json.dumps(parsed.to_json_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
        with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for dirpath, _dirs, _names in os.walk(tmp):
            _fsync_dir(Path(dirpath))
        self._publish(tmp)
        log.info(
            "wrote artifact %s (%d files, %s)",
            self.out_dir,
            len(files),
            format_size(sum(e["size"] for e in files.values())),
        )
        return parsed

    def _publish(self, tmp: Path) -> None:
        """Rename tmp to out_dir. Replacing: old aside, new in, old deleted; readers may briefly
        find no directory, never a half-written one."""
        out, parent = self.out_dir, self.out_dir.parent
        aside: Path | None = None
        if out.exists():
            if not self.overwrite:
                raise ArtifactExistsError(
                    f"{out} appeared during the build; pass overwrite=True to replace it"
                )
            aside = parent / f".{out.name}.old-{secrets.token_hex(6)}"
            os.rename(out, aside)
        try:
            os.rename(tmp, out)
            self._committed = True
        except BaseException:
            if aside is not None:
                os.rename(aside, out)
            raise
        _fsync_dir(parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------- reading


class Artifact:
    """An opened artifact directory. Every listed file was checked for presence and size; its sha256 was
    checked too, except for the names in ``unverified`` (deferred to `open_verified`, or not asked for)."""

    def __init__(self, path: Path, manifest: Manifest, unverified: Iterable[str] = ()) -> None:
        self.path = path
        self.manifest = manifest
        self._deferred = set(unverified)
        self._lock = threading.Lock()

    @property
    def unverified(self) -> frozenset[str]:
        """Files whose sha256 must still be checked while they are read (`open_verified`)."""
        with self._lock:
            return frozenset(self._deferred)

    def file(self, name: str) -> Path:
        """Path of a file the manifest lists; ArtifactError for any other name."""
        if name not in self.manifest.files:
            raise ArtifactError(f"artifact {self.path}: file {name!r} is not listed in its manifest")
        return self.path / name

    def open_verified(self, name: str) -> VerifyingReader:
        """A reader of a listed file that hashes what it reads if that file's hash was deferred at open;
        closing it after the last byte raises ArtifactCorruptError (naming the file) on any mismatch."""
        path = self.file(name)
        with self._lock:
            check = name in self._deferred
        return VerifyingReader(self, name, path, check)

    def _mark_verified(self, name: str) -> None:
        with self._lock:
            self._deferred.discard(name)

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, family={self.manifest.model.family!r})"


class VerifyingReader:
    """Reads one artifact file front to back (``readinto``), hashing the bytes as they pass when its hash
    is due. Use as a context manager: a clean exit checks that exactly the listed size was read and, if due,
    that the sha256 matches; either failure raises ArtifactCorruptError naming the file. Leaving by an
    exception only closes the file. hashlib and file reads release the GIL: readers on several threads run
    in parallel."""

    def __init__(self, artifact: Artifact, name: str, path: Path, check: bool) -> None:
        self.artifact, self.name, self.check = artifact, name, check
        self.entry = artifact.manifest.files[name]
        self._f = open(path, "rb")
        self._hash = hashlib.sha256() if check else None
        self.bytes_read = 0

    def readinto(self, buf: Any) -> int:
        """Fill ``buf`` (a writable buffer) as far as the file allows; returns the bytes read (0 at EOF)."""
        view = memoryview(buf).cast("B")
        n = 0
        while n < len(view):
            got = self._f.readinto(view[n:])
            if not got:
                break
            n += got
        if self._hash is not None and n:
            self._hash.update(view[:n])
        self.bytes_read += n
        return n

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes (fewer only at EOF), hashed like ``readinto``."""
        buf = bytearray(n)
        got = self.readinto(buf)
        return bytes(buf[:got])

    def close(self) -> None:
        self._f.close()

    def finish(self) -> None:
        """Close, then check size and (if due) sha256 of everything read. Reads the rest if a caller stopped
        early, so the hash always covers the whole file."""
        try:
            if self._hash is not None:
                rest = bytearray(CHUNK)
                while self.readinto(rest):
                    pass
        finally:
            self.close()
        root = self.artifact.path
        if self.bytes_read != self.entry.size:
            raise ArtifactCorruptError(root, self.name, "size", f"{self.entry.size} bytes",
                                       f"{self.bytes_read} bytes")
        if self._hash is not None:
            digest = self._hash.hexdigest()
            if digest != self.entry.sha256:
                raise ArtifactCorruptError(root, self.name, "sha256", self.entry.sha256, digest)
            self.artifact._mark_verified(self.name)
            log.info("verified %s (%s, sha256 ok, while loading)", self.name, format_size(self.entry.size))

    def __enter__(self) -> VerifyingReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.close()


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate `path/manifest.json` without touching the other files."""
    root = Path(path)
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"no artifact at {root}: not a directory")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(
            f"artifact {root}: {MANIFEST_NAME} is missing (incomplete or not an artifact)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"artifact {root}: {MANIFEST_NAME} is not valid JSON: {exc}") from None
    try:
        return parse_manifest(data)
    except SchemaVersionError as err:
        raise ArtifactIncompatibleError(
            "schema_version", err.found, err.expected, "rebuild the artifact with this Spanda"
        ) from None
    except ManifestError as err:
        raise ArtifactError(
            f"artifact {root}: {MANIFEST_NAME} is invalid: " + "; ".join(err.problems)
        ) from None


def verify_files(root: Path, manifest: Manifest, *, check_hashes: bool = True,
                 skip_hashes: Iterable[str] = ()) -> None:
    """Check that every listed file exists with its size (and sha256, except for ``skip_hashes``); warn
    about unlisted files.

    Hashes are computed on a thread pool (hashlib releases the GIL), so a sharded 16 GB model verifies in
    the time of its largest shard rather than of the whole model. Errors name the first bad file in order.
    """
    items = sorted(manifest.files.items())
    skip = set(skip_hashes)
    for name, entry in items:
        p = root / name
        if not p.is_file():
            raise ArtifactCorruptError(root, name, "presence", "a regular file", "nothing")
        size = p.stat().st_size
        if size != entry.size:
            raise ArtifactCorruptError(root, name, "size", f"{entry.size} bytes", f"{size} bytes")
    items = [item for item in items if item[0] not in skip]
    if check_hashes and items:
        workers = min(16, os.cpu_count() or 1, len(items)) or 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = pool.map(lambda item: sha256_file(root / item[0]), items)
            for i, ((name, entry), digest) in enumerate(zip(items, digests), 1):
                if digest != entry.sha256:
                    raise ArtifactCorruptError(root, name, "sha256", entry.sha256, digest)
                # progress for the weight shards and big files; compiled kernels and small files at debug level
                big = name.startswith("weights-") or entry.size >= 64 << 20
                log.log(logging.INFO if big else logging.DEBUG, "verified %s (%s, sha256 ok) [%d/%d]", name,
                        format_size(entry.size), i, len(items))
    extras = sorted(set(list_files(root)) - set(manifest.files))
    if extras:
        log.warning(
            "artifact %s holds files its manifest does not list (ignored): %s", root, ", ".join(extras)
        )


def open_artifact(path: str | os.PathLike[str], verify: bool = True,
                  defer_hashes: Iterable[str] | Callable[[Manifest], Iterable[str]] = ()) -> Artifact:
    """Open an artifact: manifest, schema version, every file's presence and size, and (verify=True)
    every sha256. Raises ArtifactError / ArtifactIncompatibleError / ArtifactCorruptError.

    ``defer_hashes``: listed files (or a function of the manifest giving them) that the caller will read
    whole through `Artifact.open_verified`, which hashes them as it reads; their presence and size are
    still checked here. Ignored when verify=False.
    """
    root = Path(path)
    manifest = read_manifest(root)
    names = defer_hashes(manifest) if callable(defer_hashes) else defer_hashes
    deferred = set(names) if verify else set()
    unknown = sorted(deferred - set(manifest.files))
    if unknown:
        raise ArtifactError(f"artifact {root}: cannot defer the hash of unlisted file(s) {unknown}")
    verify_files(root, manifest, check_hashes=verify, skip_hashes=deferred)
    return Artifact(root, manifest, unverified=deferred)

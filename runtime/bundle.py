"""The engine bundle on disk: one directory, `manifest.json` plus the files it lists. Written atomically by the
compiler (`write_bundle`), verified by the runtime before anything is loaded (`load_bundle`; every check and
its error are listed in `runtime/bundle_verify.py`). Nothing in loading executes code: JSON only.

Writing (`write_bundle(out_dir, populate)`), the guarantee: a reader of `out_dir` sees the previous bundle, or
(only if a crash lands between two renames, see below) no bundle, never a half-written one.
  1. Under an exclusive lock on `.<name>.lock` next to `out_dir` (POSIX `flock`; a second concurrent write to
     the same `out_dir` fails at once), temp dirs that earlier crashed writes left behind (`.<name>.tmp-*`)
     are deleted, and an old bundle that a crash left set aside (`.<name>.old-*`) is put back if `out_dir` is
     missing. A directory that exists is replaced only if it is empty or a bundle holding nothing but what its
     validated manifest lists (`_refuse_non_bundle`): never a checkpoint, a user's folder, or added user files.
  2. `populate(tmp)` writes the files into a fresh `.<name>.tmp-*` on the same filesystem and returns the
     manifest without hashes. Then every listed file is hashed (sha256 and size filled in), unlisted files and
     symlinks are refused, paths and ONNX external data are checked as the loader would, `manifest.json` is
     written last, and every file and directory is fsynced.
  3. Swap: `out_dir` (if any) is renamed to `.<name>.old-*`, the temp dir is renamed to `out_dir`, the parent
     directory is fsynced, and only then is the old bundle deleted.
  An exception at any point removes the temp dir and leaves `out_dir` as it was. A kill in 2 leaves a temp dir
  that the loader never looks at; a kill between the two renames of 3 leaves no `out_dir` (the loader says so)
  and the old bundle aside, which the next write restores before it starts.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, TypeVar

from metacanvas_deploy.runtime.bundle_verify import (
    backend_compatible,
    check_versions,
    hash_all,
    installed_backend_version,
    listed_files,
    read_manifest,
    sha256_file,
    verify_files,
)
from metacanvas_deploy.runtime.errors import BundleError, BundleFileError, BundleWriteError
from metacanvas_deploy.runtime.manifest import MANIFEST_NAME, Manifest

__all__ = ["Bundle", "load_bundle", "load_manifest", "write_bundle", "write_atomically", "sha256_file",
           "backend_compatible", "installed_backend_version"]

T = TypeVar("T")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its resolved directory and manifest."""

    path: Path
    manifest: Manifest

    def engine_path(self, stage: str) -> Path:
        """The engine file of `stage`."""
        if stage not in self.manifest.engines:
            raise BundleFileError(f"bundle {self.path} has no stage {stage!r}; it has "
                                  f"{', '.join(self.manifest.engines)}. Rebuild with the task that needs it: "
                                  f"`{self.manifest.rebuild_command(str(self.path))}`")
        return self.path / self.manifest.engines[stage].file

    def file_path(self, relative: str) -> Path:
        """A file listed in the manifest's `files` (tokenizer.json, scheduler plans...)."""
        if relative not in self.manifest.files:
            raise BundleFileError(f"bundle {self.path} lists no file {relative!r}; it lists "
                                  f"{', '.join(self.manifest.files) or 'none'}")
        return self.path / relative

    def check_request(self, height: int, width: int, num_frames: int = 1, prompt_tokens: int | None = None) -> None:
        """`Manifest.check_request`, with this bundle's directory in the rebuild command."""
        self.manifest.check_request(height, width, num_frames, prompt_tokens, out_dir=str(self.path))


# --- loading ---

def load_bundle(path: str | Path, *, verify_hashes: bool = True,
                backend_versions: Mapping[str, str | None] | None = None) -> Bundle:
    """Verify and open the bundle at `path` (every check and its error: `runtime/bundle_verify.py`).

    `backend_versions` overrides the detected installed versions (`{"onnxruntime": "1.32.0"}`); a backend
    mapped to None counts as not installed."""
    root = _bundle_root(Path(path))
    manifest = read_manifest(root)
    check_versions(root, manifest, backend_versions or {})
    verify_files(root, manifest, verify_hashes=verify_hashes, what="rebuild")
    return Bundle(root, manifest)


def load_manifest(bundle_dir: str | Path, verify_hashes: bool = True) -> Manifest:
    """`load_bundle(bundle_dir).manifest`."""
    return load_bundle(bundle_dir, verify_hashes=verify_hashes).manifest


def _bundle_root(path: Path) -> Path:
    if not path.is_dir():
        aside = sorted(path.parent.glob(glob.escape(f".{path.name}.old-") + "*"))
        hint = (f" A write was interrupted; the previous bundle is at {aside[-1]} and the next build restores "
                "or replaces it." if aside else "")
        raise BundleFileError(f"no bundle at {path}: expected a directory with {MANIFEST_NAME} written by "
                              f"`python -m mc_export build ... --out {path}`.{hint}")
    return path.resolve()


# --- writing ---

def write_bundle(out_dir: str | Path, populate: Callable[[Path], Manifest]) -> Manifest:
    """Write a bundle atomically: `populate(tmp)` writes the files into `tmp` and returns the manifest (hashes
    may be left empty); this seals it, writes `manifest.json` last, and swaps `tmp` into `out_dir`. Returns the
    sealed manifest. See the module docstring for the guarantee."""
    def fill(tmp: Path) -> Manifest:
        manifest = populate(tmp)
        if not isinstance(manifest, Manifest):
            raise BundleWriteError(f"populate() must return a Manifest, got {type(manifest).__name__}")
        sealed = _seal(tmp, manifest)
        with open(tmp / MANIFEST_NAME, "x", encoding="utf-8") as f:
            f.write(sealed.to_json())
        return sealed

    return write_atomically(out_dir, fill, _refuse_non_bundle)


def write_atomically(out_dir: str | Path, fill: Callable[[Path], T], refuse: Callable[[Path], None],
                     what: str = "bundle") -> T:
    """The write every folder the compiler publishes goes through (a bundle; a TensorRT export,
    `mc_export.tensorrt.export_folder`), with the guarantee of the module docstring: under the lock, `refuse(out)`
    raises unless an existing `out_dir` may be replaced; `fill(tmp)` writes every file into a fresh temp dir (its
    index last) and returns a value, which this returns after the swap."""
    out = Path(out_dir).resolve()
    if not out.name:
        raise BundleWriteError(f"cannot write a {what} at {out}: give a directory name")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _write_lock(out):
        _recover(out)
        refuse(out)
        tmp = _fresh_dir(out, "tmp")
        try:
            result = _populate(fill, tmp, out, what)
            _fsync_tree(tmp)
            _swap(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return result


def _populate(fill: Callable[[Path], T], tmp: Path, out: Path, what: str) -> T:
    """`fill(tmp)`, with a full disk turned into one clear error (the caller removes `tmp`)."""
    try:
        return fill(tmp)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        free = shutil.disk_usage(out.parent).free
        kept = f"the previous {what} is untouched" if out.exists() else "nothing else changed"
        raise BundleWriteError(f"the disk under {out.parent} filled up after {written / 2**30:.2f} GiB of the new "
                               f"{what} ({free / 2**30:.2f} GiB free now); the partial {what} is removed and "
                               f"{kept}. Free space or choose another --out") from None


def _seal(tmp: Path, manifest: Manifest) -> Manifest:
    present = _regular_files(tmp)
    if MANIFEST_NAME in present:
        raise BundleWriteError(f"populate() wrote {MANIFEST_NAME}; write_bundle writes it, last")
    listed = {rel for _, rel, _, _ in listed_files(manifest)}
    if present - listed:
        raise BundleWriteError(f"populate() wrote files the manifest does not list: {sorted(present - listed)}; "
                               "list them in `files` (or an engine's `external_data`) or do not write them")
    if listed - present:
        raise BundleWriteError(f"the manifest lists files populate() did not write: {sorted(listed - present)}")
    got = hash_all({rel: tmp / rel for rel in listed})
    for field, rel, want, _ in listed_files(manifest):
        if want and want != got[rel][0]:
            raise BundleWriteError(f"`{field}` says sha256 {want}, the written {rel!r} hashes to {got[rel][0]}")
    sealed = manifest.sealed({s: got[e.file] for s, e in manifest.engines.items()},
                             {p: got[p][0] for p in manifest.files})
    verify_files(tmp.resolve(), sealed, verify_hashes=False, what="write")
    return sealed


def _regular_files(root: Path) -> set[str]:
    """Bundle-relative paths of the files under `root`; symlinks and special files are refused."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise BundleWriteError(f"populate() created {path}, which is not a regular file or directory "
                                       "(symlinks are not allowed in a bundle)")
            if stat.S_ISREG(mode):
                found.add(path.relative_to(root).as_posix())
    return found


@contextlib.contextmanager
def _write_lock(out: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, so concurrent writes to one out_dir are not serialized
        yield
        return
    fd = os.open(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BundleWriteError(f"another build is writing {out} right now; wait for it or choose another "
                                   "--out") from None
        yield
    finally:
        os.close(fd)  # releases the lock; the lock file stays (unlinking it would race with a waiting writer)


def _aside(out: Path, kind: str) -> list[Path]:
    return sorted(out.parent.glob(glob.escape(f".{out.name}.{kind}-") + "*"), key=lambda p: p.lstat().st_mtime_ns)


def _recover(out: Path) -> None:
    """Under the lock: put back an old bundle a crash left aside, delete stale temp dirs."""
    olds = _aside(out, "old")
    if olds and not os.path.lexists(out):
        os.rename(olds.pop(), out)
    for stale in _aside(out, "tmp") + olds:
        shutil.rmtree(stale, ignore_errors=True)


REPLACE_ADVICE = "Choose a new or empty --out, or move those files out yourself"


def occupied(out: Path) -> bool:
    """Whether a writer must first recognise what ``out`` holds: False when it is missing or an empty directory;
    True for a non-empty directory; a file or a symlink is refused (never followed, never replaced)."""
    if not os.path.lexists(out):
        return False
    if out.is_symlink() or not out.is_dir():
        raise BundleWriteError(f"{out} exists and is not a directory; refusing to replace it")
    return any(out.iterdir())


def refuse_foreign(out: Path, present: set[str], listed: set[str], what: str) -> None:
    """``out`` is ``what``; if it holds files its writer did not list, it is not replaced and they are named."""
    foreign = sorted(present - listed)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise BundleWriteError(f"{out} is {what} but also holds files it did not write ({shown}); it is not "
                               f"replaced. {REPLACE_ADVICE}")


def _refuse_non_bundle(out: Path) -> None:
    """``out`` may be replaced only when it is missing, empty, or a bundle written by `write_bundle` holding
    nothing else: a manifest that validates (schema, format, sealed hashes) and no file it does not list. A
    checkpoint, a user's folder or a bundle with the user's files added is never replaced."""
    if not occupied(out):
        return
    if not (out / MANIFEST_NAME).is_file():
        raise BundleWriteError(f"{out} exists, is not empty and has no {MANIFEST_NAME}: it is not a bundle, so "
                               f"it is not replaced. {REPLACE_ADVICE}")
    try:
        manifest = read_manifest(out.resolve())
        present = _regular_files(out)
    except (BundleError, BundleWriteError) as e:
        raise BundleWriteError(f"{out} holds a {MANIFEST_NAME} that is not a bundle's ({e}); it is not "
                               f"replaced. {REPLACE_ADVICE}") from None
    refuse_foreign(out, present, {MANIFEST_NAME} | {rel for _, rel, _, _ in listed_files(manifest)}, "a bundle")


def _fresh_dir(out: Path, kind: str) -> Path:
    path = out.parent / f".{out.name}.{kind}-{secrets.token_hex(6)}"
    path.mkdir()  # default mode minus umask, unlike tempfile.mkdtemp's 0700
    return path


def _swap(tmp: Path, out: Path) -> None:
    if os.path.lexists(out):
        old = out.parent / f".{out.name}.old-{secrets.token_hex(6)}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        _fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)  # if this fails, the next write deletes it
    else:
        os.rename(tmp, out)
        _fsync_dir(out.parent)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open directories; NTFS journals renames itself
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

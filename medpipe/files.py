"""Atomic writes: a reader (or a crash) never sees a half-written file; a set of outputs appears whole or not at all.

Files are created the way a plain `open(path, "w")` creates them: the permissions follow the umask (0644 under
the usual 022), or stay those of the file being replaced."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from medpipe.errors import MedpipeError


def _new_temp_file(path: Path) -> Path:
    """Create an empty, unique file beside `path` with open()'s default mode (0o666 less the umask)."""
    for _ in range(100):
        # the temporary name ends with the final name, so writers that look at the suffix (.nii.gz, .png) still work
        tmp = path.parent / f".tmp-{secrets.token_hex(4)}-{path.name}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path)
    try:
        if path.is_file():  # replacing a file keeps its permissions, as writing into it would
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def cache_dir() -> Path:
    """Where medpipe keeps what it can recompute (image hashes, the fitted input guard): `$MEDPIPE_CACHE_DIR`,
    else `~/.cache/medpipe`. Never inside the repository: fitted files are not committed."""
    return Path(os.environ.get("MEDPIPE_CACHE_DIR") or Path.home() / ".cache" / "medpipe")


def writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create `path` if needed and prove it takes a file; a file in the way, a read-only place or a full disk is
    one MedpipeError naming the folder, before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MedpipeError(f"{what} '{path}' is a file, not a folder; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = _new_temp_file(path / "write-probe")
        probe.unlink()
    except OSError as exc:
        raise MedpipeError(f"cannot write to {what} '{path}': {exc.strerror or exc}; choose another folder") from exc
    return path


@contextmanager
def staged_outputs(out_dir: str | Path, what: str = "outputs", last: tuple[str, ...] = ()) -> Iterator[Path]:
    """All-or-nothing output sets: write everything into a hidden staging folder inside `out_dir`, then move each
    file into place (renames within one file system, which a full disk cannot fail). If the block raises, the
    staging folder is removed and `out_dir` is left as it was; an OSError (full disk, permissions) becomes one
    MedpipeError line. Files named in `last` (a summary, a report) move after the others, so a set interrupted
    mid-move lacks its summary.
    """
    created = not Path(out_dir).exists()
    out = writable_dir(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    done = False
    try:
        yield staging
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        for src in sorted(files, key=lambda p: (p.name in last, str(p))):
            target = out / src.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, target)
        done = True
    except OSError as exc:
        raise MedpipeError(
            f"writing {what} to '{out}' failed ({exc.strerror or exc}); nothing was written — free space or fix "
            "permissions and run again"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not done:
            with suppress(OSError):  # a folder this run made and filled with nothing goes too
                out.rmdir()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (weights and archives can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

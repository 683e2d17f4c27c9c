"""Atomic writes: a reader (or a crash) never sees a half-written file; a set of outputs appears whole or not at all.

Files are created the way a plain `open(path, "w")` creates them: the permissions follow the umask (0644 under
the usual 022), or stay those of the file being replaced."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

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


def read_cache(name: str, version: int) -> dict[str, Any]:
    """The entries of `cache_dir()/name` written by `write_cache` with this `version`; empty when there is none, it
    is of another version or it cannot be read (a cache is only ever recomputed)."""
    try:
        stored = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(stored, dict) and stored.get("version") == version and isinstance(stored.get("entries"), dict)
    return dict(stored["entries"]) if ok else {}


def write_cache(name: str, version: int, entries: dict[str, Any]) -> None:
    """Store `entries` as `cache_dir()/name` (atomically); an unwritable cache costs only the recomputation."""
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_dir() / name, json.dumps({"version": version, "entries": entries}))
    except OSError:
        pass


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


def check_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """`writable_dir`'s check without creating anything: a job refuses a read-only or full place (or a file in the
    way) in one line before it starts, and a job refused later leaves no empty folder behind. A missing folder is
    probed in its nearest existing parent, where it would be made."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        shown = "" if existing == path else f" ('{existing}' is a file)"
        raise MedpipeError(f"{what} '{path}' is a file, not a folder{shown}; pass a folder path")
    try:
        _new_temp_file(existing / "write-probe").unlink()
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


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "_"


def distinct_names(paths: Sequence[str | Path], name: Callable[[Path], str] = lambda p: p.name) -> list[str]:
    """One output name per input path, never the same for two inputs: `name(path)` where that is unique among
    `paths`, else prefixed with as many of the path's parent folders as tell the inputs apart (`a/s1`, `b/s1` ->
    `a_s1`, `b_s1`); a path given twice gets `_2`, `_3` … Inputs named alike must not write over each other."""
    given = [os.path.abspath(p) for p in paths]
    unique = list(dict.fromkeys(given))  # the same input twice is one name, numbered below
    bases = [name(Path(p)) for p in unique]
    parents = [[_safe(part) for part in Path(p).parent.parts[1:]][::-1] for p in unique]  # nearest folder first
    depth = [0] * len(unique)

    def named(i: int) -> str:
        return "_".join([*parents[i][: depth[i]][::-1], bases[i]])

    while True:
        counts = Counter(named(i) for i in range(len(unique)))
        longer = [i for i in range(len(unique)) if counts[named(i)] > 1 and depth[i] < len(parents[i])]
        if not longer:
            break
        for i in longer:
            depth[i] += 1
    by_path = {p: named(i) for i, p in enumerate(unique)}
    seen: Counter[str] = Counter()
    names = []
    for p in given:
        n = by_path[p]
        seen[n] += 1
        names.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    taken = Counter(names)  # what the parents could not tell apart (one name used by two folders) is numbered too
    for n in [n for n, c in taken.items() if c > 1]:
        for k, i in enumerate([i for i, m in enumerate(names) if m == n][1:], start=2):
            names[i] = f"{n}_{k}"
    return names

"""Writing files so that a kill, a full disk or a permission error never leaves a damaged one.

Every file the toolkit writes goes through :func:`atomic_write`: the content is written to a
temporary file in the same folder (``.NAME.XXXXXXXX.tmp``), flushed to disk (``fsync``),
given the permissions a plain ``open(path, "w")`` would give (``0o666`` less the umask;
``mkstemp`` alone gives ``0o600``), then renamed over ``path``. A reader sees the old file or
the new one, never a torn one. A failed write removes its temporary file and raises
:class:`WriteError`, one sentence naming the file; a killed write leaves its temporary
file, which :func:`remove_stale_temps` clears at the next start.

This module imports nothing from the package: every layer may use it.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

# The temporary names atomic_write makes: "." + final name + "." + mkstemp's 8 characters.
_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux's
    ``/proc/self/status``): setting it to read it back would, for that instant, give files
    another thread creates the wrong permissions (training reads activations on a thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _file_mode() -> int:
    return 0o666 & ~_umask()


class WriteError(OSError):
    """A file could not be written (no space, no permission, read-only disk). The message
    names the file and the cause; whatever the file held before is unchanged."""

    def __str__(self) -> str:  # the sentence alone, without OSError's "[Errno N]"
        return str(self.strerror)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)``, then move the finished temporary file to ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(e.errno, f"cannot write {path}: {e.strerror or e}"
                         + (" (the disk is full)" if e.errno == 28 else "")) from e
    except RuntimeError as e:  # torch.save reports a failed write as RuntimeError
        raise WriteError(None, f"cannot write {path}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def json_safe(obj):
    """``obj`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = 2, compact: bool = False) -> str:
    """``obj`` as strict JSON: a non-finite number becomes ``null`` (JSON has no NaN, and a
    browser's ``JSON.parse`` rejects it). The walk that replaces them runs only when there
    is one, so large documents are dumped once. ``compact`` drops the spaces."""
    kwargs = dict(indent=indent, allow_nan=False, default=str, ensure_ascii=False,
                  separators=(",", ":") if compact else None)
    try:
        return json.dumps(obj, **kwargs)
    except ValueError:  # "Out of range float values are not JSON compliant"
        return json.dumps(json_safe(obj), **kwargs)


def json_line(obj) -> str:
    """One line of strict JSON (non-finite numbers as ``null``)."""
    return json_text(obj, indent=None)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2,
               compact: bool = False) -> None:
    """``obj`` as strict JSON (non-finite numbers as ``null``), atomically."""
    write_text(path, json_text(obj, indent, compact) + "\n")


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``folder``
    (and below it, with ``recursive``); returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    removed = 0
    for p in found:
        if _TEMP.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def check_writable(folder: str | os.PathLike) -> None:
    """Raise a clear error unless files can be created in ``folder`` (created later if
    missing): it must not be a file, and its nearest existing ancestor must be writable.
    Creates nothing."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise NotADirectoryError(f"{probe} is a file, not a folder: choose another output "
                                 "folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {probe}: choose an output folder you can "
                              "write to")
    try:
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    if read_only:
        raise PermissionError(f"{probe} is on a read-only file system: choose another "
                              "output folder")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

"""Files: atomic writes, output-path checks, run-folder locks and JSON-lines reading.

Temporary files are written beside their target as ``.{name}.{pid}-{host}.{random}.tinyset-tmp``
(``host`` is a short hash of this machine's host name), so that a later run can recognise the
ones left behind by a killed process and remove them (:func:`clean_stale_temps`).

New files follow the user's umask (they are created with mode ``0o666``, which the kernel masks
with the umask, like every other tool); replacing an existing file does not keep its mode.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import stat
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from tinyset.errors import ArtifactError, LockedError, OutputError

#: suffix of every temporary file tinyset writes
TEMP_SUFFIX = ".tinyset-tmp"
#: name of the lock file :class:`RunLock` creates in a run folder
LOCK_NAME = ".tinyset.lock"

_TEMP_RE = re.compile(
    r"^\.(?P<name>.*)\.(?P<pid>[0-9]+)-(?P<host>[0-9a-f]{8})\.(?P<rand>[0-9a-f]{8})"
    + re.escape(TEMP_SUFFIX) + r"$", re.DOTALL)
#: the part of the target's name kept in a temporary name (file names are limited to 255 bytes)
_MAX_NAME_CHARS = 100
#: a torn (unreadable) lock file younger than this may still be being written by its creator
_LOCK_GRACE_SECONDS = 2.0

#: temporary files this process is writing right now (never removed by clean_stale_temps)
_active_temps: set[str] = set()
_active_lock = threading.Lock()


def _host() -> str:
    return socket.gethostname()


def _host_tag() -> str:
    return hashlib.sha1(_host().encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (a process of another user counts)."""
    if pid <= 0:  # os.kill(0, ...) / negative pids address process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def _create_temp(folder: Path, name: str) -> Path:
    """Create (exclusively, mode 0o666 & ~umask) an empty temporary file in ``folder``."""
    short = name[:_MAX_NAME_CHARS]
    while True:
        tmp = folder / f".{short}.{os.getpid()}-{_host_tag()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        with _active_lock:
            _active_temps.add(os.path.abspath(tmp))
        return tmp


def _forget_temp(tmp: Path) -> None:
    with _active_lock:
        _active_temps.discard(os.path.abspath(tmp))


def _fsync_path(path: Path, directory: bool = False) -> None:
    """Flush ``path`` to disk; best effort for folders (not every filesystem supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only on success.

    The temporary file already exists (empty) when yielded; write to it in place. Missing parent
    folders are created. On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path.parent, path.name)
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 less the umask, as created
    try:
        yield tmp
        _fsync_path(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that recreated the file (safetensors: 0600)
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        _forget_temp(tmp)
    _fsync_path(path.parent, directory=True)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding) as fh:
            fh.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (plus a final newline) to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (Path, torch.device)):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_tagged_safetensors(path: str | os.PathLike, fmt: str, version: int, what: str,
                            keys: Iterable[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (all, or only ``keys``) and the JSON header (metadata key ``tinyset``) of a safetensors
    file that tinyset wrote as ``what`` (e.g. "checkpoint"), checked: the header must name ``fmt`` and
    ``version``. Never unpickles; every failure is an :class:`ArtifactError` naming the file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = json.loads((f.metadata() or {}).get("tinyset", "{}"))
            have = set(f.keys())
            wanted = sorted(have) if keys is None else list(keys)
            missing = [k for k in wanted if k not in have]
            if missing:
                raise ArtifactError(f"{path}: no tensor {missing[0]!r} in this {what}")
            tensors = {k: f.get_tensor(k) for k in wanted}
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"{path}: not a readable tinyset {what} ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise ArtifactError(f"{path}: not a tinyset {what} (no '{fmt}' header)")
    if header.get("format_version") != version:
        raise ArtifactError(f"{path}: {what} format version {header.get('format_version')!r}; this tinyset "
                            f"reads version {version}")
    return tensors, header


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove tinyset temporary files in ``folder`` (not recursive) left by dead processes.

    Only files named like :func:`atomic_path`'s temporary files, created on this host, whose
    writer pid no longer exists are removed (and this process's own leftovers that it is no longer
    writing). Temporary files of live processes and of other hosts, and all other files, are kept.
    Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    me, tag = os.getpid(), _host_tag()
    removed: list[Path] = []
    with os.scandir(folder) as entries:
        candidates = [e for e in entries if _TEMP_RE.match(e.name)]
    for entry in candidates:
        m = _TEMP_RE.match(entry.name)
        assert m is not None
        if m["host"] != tag:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
        except OSError:
            continue
        pid = int(m["pid"])
        if pid == me:
            with _active_lock:
                if os.path.abspath(entry.path) in _active_temps:
                    continue
        elif _pid_alive(pid):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:  # another cleaner was faster
            continue
        removed.append(Path(entry.path))
    return removed


# ---------------------------------------------------------------------------- output checks

def _access(path: Path, mode: int) -> bool:
    """os.access with the effective ids (what an actual write will be checked against)."""
    if os.access in os.supports_effective_ids:
        return os.access(path, mode, effective_ids=True)
    return os.access(path, mode)


def _check_writable_folder(folder: Path, flag: str, path: Path, what: str) -> None:
    """Raise OutputError unless files can be created in ``folder`` (permission bits + a probe)."""
    if not _access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: cannot write {what}: folder {folder} is not writable; "
                          f"choose another location or fix its permissions")
    try:
        probe = _create_temp(folder, "probe")
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot write {what}: creating a file in folder {folder} "
                          f"failed ({exc.strerror or exc}); choose another location") from exc
    try:
        probe.unlink()
    finally:
        _forget_temp(probe)


def check_output_file(path: str | os.PathLike, *, force: bool = False, flag: str = "--out") -> Path:
    """Check, before any work starts, that ``path`` can be written as a new output file.

    Refuses (with :class:`OutputError`) an existing folder, an existing file unless ``force`` (and
    then also a read-only or non-regular one), a missing parent folder, a parent that is not a
    folder, a parent where files cannot be created, an empty path and a path ending in a separator
    (which names a folder). Returns the resolved path.
    """
    text = str(os.fspath(path))
    if not text.strip():
        raise OutputError(f"{flag} '': empty path; expected the path of a file to write")
    if text.endswith(("/", os.sep)):
        raise OutputError(f"{flag} {text}: ends with a path separator, so it names a folder; expected "
                          f"the path of a file to write")
    raw = Path(path).expanduser()
    resolved = raw.resolve()
    if resolved.is_dir():
        raise OutputError(f"{flag} {raw}: is a folder; expected the path of a file to write "
                          f"(e.g. {raw / 'results.json'})")
    parent = resolved.parent
    if not parent.exists():
        raise OutputError(f"{flag} {raw}: folder {parent} does not exist; create it first or "
                          f"choose another path")
    if not parent.is_dir():
        raise OutputError(f"{flag} {raw}: {parent} is not a folder, so no file can be created in "
                          f"it; choose another path")
    if resolved.exists() or resolved.is_symlink():
        if not force:
            raise OutputError(f"{flag} {raw}: already exists; pass --force to replace it, or "
                              f"choose another path")
        if not resolved.is_file():
            raise OutputError(f"{flag} {raw}: exists and is not a regular file; refusing to "
                              f"replace it even with --force; choose another path")
        if not _access(resolved, os.W_OK):
            raise OutputError(f"{flag} {raw}: exists and is read-only; refusing to replace it "
                              f"even with --force; make it writable or choose another path")
    _check_writable_folder(parent, flag, raw, "the file")
    return resolved


def check_output_dir(path: str | os.PathLike, *, flag: str = "--out",
                     must_be_empty: bool = False) -> Path:
    """Check, before any work starts, that ``path`` can be used as an output folder.

    An existing file is refused; a missing folder is fine (it will be created) provided its
    nearest existing ancestor is a writable folder; with ``must_be_empty`` an existing non-empty
    folder is refused, and so is an empty path. Returns the resolved path.
    """
    if not str(os.fspath(path)).strip():
        raise OutputError(f"{flag} '': empty path; expected a folder for the outputs")
    raw = Path(path).expanduser()
    resolved = raw.resolve()
    if resolved.exists():
        if not resolved.is_dir():
            raise OutputError(f"{flag} {raw}: is a file, not a folder; expected a folder for the "
                              f"outputs; choose another path")
        if must_be_empty and any(resolved.iterdir()):
            raise OutputError(f"{flag} {raw}: folder exists and is not empty; choose a new folder "
                              f"(or empty this one)")
        _check_writable_folder(resolved, flag, raw, "into the folder")
        return resolved
    ancestor = resolved.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{flag} {raw}: cannot create the folder because {ancestor} is a file, "
                          f"not a folder; choose another path")
    _check_writable_folder(ancestor, flag, raw, "the folder")
    return resolved


# ---------------------------------------------------------------------------- run lock

class RunLock:
    """Exclusive lock on a run folder: ``folder/.tinyset.lock`` holding ``{"pid", "host", "started"}``.

    Use as a context manager. Creates ``folder`` if needed. A lock left by a dead process on this
    host, or a lock file with unreadable content, is stale: it is replaced and described in
    :attr:`took_over_stale` (``None`` otherwise). Any other existing lock raises
    :class:`~tinyset.errors.LockedError`. On exit the lock file is removed if it is still ours.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.took_over_stale: dict | None = None
        self._content: bytes | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        if self._content is not None:
            raise RuntimeError(f"RunLock on {self.folder} is already held by this object")
        self.folder.mkdir(parents=True, exist_ok=True)
        content = (json.dumps({
            "pid": os.getpid(),
            "host": _host(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="microseconds"),
        }) + "\n").encode()
        deadline = time.monotonic() + _LOCK_GRACE_SECONDS + 1.0
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                pass
            except OSError as exc:
                raise OutputError(f"{self.folder}: cannot create the lock file {self.path} "
                                  f"({exc.strerror or exc}); expected a writable run folder") from exc
            else:
                try:
                    os.write(fd, content)
                    os.fsync(fd)
                except BaseException:
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        os.unlink(self.path)
                    raise
                os.close(fd)
                self._content = content
                return
            # somebody's lock is there: is it stale?
            try:
                existing = self.path.read_bytes()
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            holder = _parse_lock(existing)
            if holder is None:
                if age < _LOCK_GRACE_SECONDS and time.monotonic() < deadline:
                    time.sleep(0.05)  # its creator may still be writing it
                    continue
                stale = {"reason": "unreadable lock file", "content": existing.decode("utf-8", "replace")}
            elif holder["host"] == _host() and not _pid_alive(holder["pid"]):
                stale = dict(holder, reason=f"process {holder['pid']} no longer exists")
            else:
                raise LockedError(
                    f"{self.folder}: in use by another tinyset run (pid {holder['pid']} on host "
                    f"{holder['host']}, started {holder.get('started', '?')}); wait for it to "
                    f"finish or use another output folder. If that process no longer exists "
                    f"(e.g. it ran on another machine), delete {self.path} and retry")
            # remove the stale lock only if it has not been replaced meanwhile
            try:
                if self.path.read_bytes() == existing:
                    self.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise LockedError(f"{self.folder}: stale lock file {self.path} ({stale['reason']}) "
                                  f"cannot be removed ({exc.strerror or exc}); delete it by hand "
                                  f"and retry") from exc
            self.took_over_stale = stale

    def release(self) -> None:
        if self._content is None:
            return
        try:
            if self.path.read_bytes() == self._content:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            self._content = None


def _parse_lock(content: bytes) -> dict | None:
    """The holder described by a lock file's content, or None if it is unreadable or torn."""
    try:
        data = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if (not isinstance(data, dict) or not isinstance(data.get("pid"), int)
            or isinstance(data.get("pid"), bool) or not isinstance(data.get("host"), str)):
        return None
    return data


# ---------------------------------------------------------------------------- JSON lines

def read_jsonl(path: str | os.PathLike) -> tuple[list[dict], bool]:
    """Records of a JSON-lines file, and whether a torn last line was dropped.

    The last non-blank line is dropped (``torn`` is True) when it has no trailing newline or is
    not valid JSON: that is what a writer killed mid-line leaves. Blank lines are ignored. Any
    other line that is not a JSON object raises :class:`~tinyset.errors.ArtifactError`.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file does not exist; expected a JSON-lines file") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path}: is a folder; expected a JSON-lines file") from None
    lines = data.split(b"\n")
    complete = len(lines) - 1  # lines[:complete] ended with a newline; lines[-1] did not
    numbered = [(i + 1, line, i < complete) for i, line in enumerate(lines) if line.strip()]
    records: list[dict] = []
    torn = False
    for k, (lineno, line, has_newline) in enumerate(numbered):
        is_last = k == len(numbered) - 1
        if is_last and not has_newline:
            torn = True
            break
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if is_last:
                torn = True
                break
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise ArtifactError(f"{path}, line {lineno}: not valid JSON ({detail}); expected one "
                                f"JSON object per line: the file is corrupt") from None
        if not isinstance(rec, dict):
            raise ArtifactError(f"{path}, line {lineno}: a JSON {type(rec).__name__}, expected a "
                                f"JSON object per line")
        records.append(rec)
    return records, torn


def rewrite_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Replace ``path`` atomically with ``records``, one JSON object per line."""
    write_text(path, "".join(json.dumps(r, default=json_default) + "\n" for r in records))

"""Tests of tinyset.files: atomic writes, output checks, run locks, JSON lines."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinyset import files
from tinyset.errors import ArtifactError, LockedError, OutputError, TinysetError
from tinyset.files import (
    LOCK_NAME, RunLock, atomic_path, check_output_dir, check_output_file, clean_stale_temps,
    read_jsonl, rewrite_jsonl, write_json, write_text,
)

is_root = hasattr(os, "geteuid") and os.geteuid() == 0
skip_if_root = pytest.mark.skipif(is_root, reason="root ignores permission bits")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(files.TEMP_SUFFIX))


def _dead_pid() -> int:
    """A pid that no process on this machine has right now."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    if not files._pid_alive(proc.pid):
        return proc.pid
    for pid in range(4_000_000, 3_000_000, -1):  # pragma: no cover - pid was reused already
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise AssertionError("no free pid found")


def _temp_name(target: str, pid: int, host_tag: str | None = None) -> str:
    return f".{target}.{pid}-{host_tag or files._host_tag()}.0123abcd{files.TEMP_SUFFIX}"


@pytest.fixture
def umask():
    """Set the process umask for one test; restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


@pytest.fixture
def sleeper():
    """A live child process (a pid that is not ours)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


# ---------------------------------------------------------------------------- atomic writes

def test_atomic_path_writes_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.exists() and not target.exists()
        assert tmp.name.startswith(".out.bin.") and tmp.name.endswith(".tinyset-tmp")
        assert f".{os.getpid()}-" in tmp.name
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert _temps(tmp_path) == []


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_follow_umask(tmp_path, umask, mask, expected):
    umask(mask)
    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "b.json", {"a": 1})
    with atomic_path(tmp_path / "c.bin") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"c")
    assert _mode(tmp_path / "a.txt") == expected
    assert _mode(tmp_path / "b.json") == expected
    assert _mode(tmp_path / "c.bin") == expected


def test_replacing_does_not_keep_old_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "a.txt"
    target.write_text("old")
    target.chmod(0o600)
    write_text(target, "new")
    assert target.read_text() == "new"
    assert _mode(target) == 0o644


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"v": 1}
    assert _temps(tmp_path) == []
    with pytest.raises(TypeError):  # not serialisable: fails inside the write
        write_json(target, {"v": object()})
    assert json.loads(target.read_text()) == {"v": 1}
    assert _temps(tmp_path) == []


def test_failed_write_of_new_file_creates_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "new.bin"):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_creates_missing_parents(tmp_path):
    target = tmp_path / "run" / "sub" / "x.json"
    write_json(target, [1, 2])
    assert json.loads(target.read_text()) == [1, 2]


def test_write_json_and_json_default(tmp_path):
    target = tmp_path / "r.json"
    write_json(target, {"t": torch.tensor([1.0, 2.0]), "s": torch.tensor(3), "p": Path("a/b"),
                        "d": torch.device("cpu")})
    assert target.read_text().endswith("\n")
    assert json.loads(target.read_text()) == {"t": [1.0, 2.0], "s": 3, "p": "a/b", "d": "cpu"}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        files.json_default(object())


def test_long_names_fit(tmp_path):
    target = tmp_path / ("n" * 250)
    write_text(target, "ok")
    assert target.read_text() == "ok"


# ---------------------------------------------------------------------------- stale temps

def test_clean_stale_temps_removes_dead_keeps_live(tmp_path, sleeper):
    dead = tmp_path / _temp_name("ckpt.safetensors", _dead_pid())
    live_other = tmp_path / _temp_name("ckpt.safetensors", sleeper)
    other_host = tmp_path / _temp_name("ckpt.safetensors", _dead_pid(), host_tag="ffffffff"
                                       if files._host_tag() != "ffffffff" else "00000000")
    unrelated = [tmp_path / "ckpt.safetensors", tmp_path / ".ckpt.safetensors.abc123.tmp",
                 tmp_path / "x.tinyset-tmp", tmp_path / ".x.12.tinyset-tmp"]
    for p in [dead, live_other, other_host, *unrelated]:
        p.write_text("x")
    folder_like = tmp_path / _temp_name("d", _dead_pid())
    folder_like.mkdir()

    with atomic_path(tmp_path / "busy.json") as in_progress:
        removed = clean_stale_temps(tmp_path)
        assert in_progress.exists()  # our own live write is kept
    assert removed == [dead]
    assert not dead.exists()
    for p in [live_other, other_host, *unrelated, folder_like]:
        assert p.exists(), p


def test_clean_stale_temps_removes_own_pid_leftover(tmp_path):
    # a leftover carrying our pid that this process is not writing (e.g. pid reused in a container)
    leftover = tmp_path / _temp_name("a.json", os.getpid())
    leftover.write_text("x")
    assert clean_stale_temps(tmp_path) == [leftover]


def test_clean_stale_temps_missing_folder(tmp_path):
    assert clean_stale_temps(tmp_path / "nope") == []


def test_kill_9_leftover_is_cleaned(tmp_path):
    code = ("import os, signal, sys\n"
            "from tinyset.files import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'partial')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt.bin")])
    assert proc.returncode == -signal.SIGKILL
    orphans = _temps(tmp_path)
    assert len(orphans) == 1 and not (tmp_path / "ckpt.bin").exists()
    assert clean_stale_temps(tmp_path) == orphans
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- output file checks

def test_check_output_file_ok(tmp_path):
    got = check_output_file(tmp_path / "r.json")
    assert got == (tmp_path / "r.json").resolve()
    assert list(tmp_path.iterdir()) == []  # the probe is gone


def test_check_output_file_relative_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_file("r.json") == tmp_path.resolve() / "r.json"


def test_check_output_file_directory(tmp_path):
    with pytest.raises(OutputError, match=r"--json .*is a folder") as ei:
        check_output_file(tmp_path, flag="--json")
    assert str(tmp_path) in str(ei.value)


def test_check_output_file_existing_needs_force(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("keep")
    with pytest.raises(OutputError, match=r"--out .*r\.json: already exists; pass --force"):
        check_output_file(target)
    assert target.read_text() == "keep"
    assert check_output_file(target, force=True) == target.resolve()


def test_check_output_file_missing_parent(tmp_path):
    with pytest.raises(OutputError, match=r"--json .*does not exist"):
        check_output_file(tmp_path / "no" / "r.json", flag="--json")
    assert not (tmp_path / "no").exists()


def test_check_output_file_parent_is_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError, match=r"is not a folder"):
        check_output_file(tmp_path / "file.txt" / "x.json")


def test_check_output_file_errors_are_tinyset_errors(tmp_path):
    with pytest.raises(TinysetError):
        check_output_file(tmp_path)


@skip_if_root
def test_check_output_file_read_only_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match=r"not writable"):
            check_output_file(ro / "r.json")
    finally:
        ro.chmod(0o700)


@skip_if_root
def test_check_output_file_read_only_file_with_force(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("x")
    target.chmod(0o400)
    with pytest.raises(OutputError, match=r"read-only"):
        check_output_file(target, force=True)


def test_check_output_file_probe_failure(tmp_path, monkeypatch):
    # root passes os.access on a read-only filesystem: the probe file must catch it
    def fail(folder, name):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(files, "_create_temp", fail)
    with pytest.raises(OutputError, match=r"Read-only file system"):
        check_output_file(tmp_path / "r.json")
    with pytest.raises(OutputError, match=r"Read-only file system"):
        check_output_dir(tmp_path / "run")


def test_check_output_file_refuses_non_regular_with_force(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="not a regular file"):
        check_output_file(fifo, force=True)


# ---------------------------------------------------------------------------- output folder checks

def test_check_output_dir_missing_is_fine_and_not_created(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    assert check_output_dir(target) == target.resolve()
    assert not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []


def test_check_output_dir_existing_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match=r"--out .*f: is a file"):
        check_output_dir(tmp_path / "f")


def test_check_output_dir_ancestor_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match=r"is a file, not a folder"):
        check_output_dir(tmp_path / "f" / "sub" / "run", flag="--save")


def test_check_output_dir_must_be_empty(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert check_output_dir(run, must_be_empty=True) == run.resolve()
    (run / "x").write_text("x")
    assert check_output_dir(run) == run.resolve()
    with pytest.raises(OutputError, match=r"not empty"):
        check_output_dir(run, must_be_empty=True)


@skip_if_root
def test_check_output_dir_read_only_ancestor(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match=r"not writable"):
            check_output_dir(ro / "x" / "run")
        with pytest.raises(OutputError, match=r"not writable"):
            check_output_dir(ro)
    finally:
        ro.chmod(0o700)


# ---------------------------------------------------------------------------- run lock

def _write_lock(folder: Path, pid: int, host: str, age: float = 0.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host, "started": "2024-01-01T00:00:00"}))
    if age:
        t = time.time() - age
        os.utime(path, (t, t))
    return path


def test_run_lock_content_and_release(tmp_path):
    run = tmp_path / "run"
    with RunLock(run) as lock:
        data = json.loads((run / LOCK_NAME).read_text())
        assert data["pid"] == os.getpid() and data["host"] == socket.gethostname()
        assert isinstance(data["started"], str)
        assert lock.took_over_stale is None
    assert not (run / LOCK_NAME).exists()


def test_run_lock_released_on_exception(tmp_path):
    with pytest.raises(ValueError):
        with RunLock(tmp_path):
            raise ValueError("x")
    assert not (tmp_path / LOCK_NAME).exists()


def test_second_lock_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(LockedError) as ei:
            with RunLock(tmp_path):
                pass
        msg = str(ei.value)
        assert str(tmp_path) in msg and f"pid {os.getpid()}" in msg
        assert socket.gethostname() in msg
        assert (tmp_path / LOCK_NAME).exists()  # the refused one did not remove ours
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path):  # free again
        pass


def test_lock_of_live_process_is_refused(tmp_path, sleeper):
    _write_lock(tmp_path, sleeper, socket.gethostname())
    with pytest.raises(LockedError, match=f"pid {sleeper}"):
        RunLock(tmp_path).acquire()


def test_stale_lock_of_dead_pid_is_taken_over(tmp_path):
    pid = _dead_pid()
    _write_lock(tmp_path, pid, socket.gethostname())
    with RunLock(tmp_path) as lock:
        assert lock.took_over_stale is not None and lock.took_over_stale["pid"] == pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_from_other_host_is_refused(tmp_path):
    path = _write_lock(tmp_path, _dead_pid(), "some-other-host.example")
    with pytest.raises(LockedError) as ei:
        with RunLock(tmp_path):
            pass
    msg = str(ei.value)
    assert "some-other-host.example" in msg and str(path) in msg and "delete" in msg
    assert path.exists()


@pytest.mark.parametrize("content", [b"", b'{"pid": 12', b"\xff\xfe", b'["x"]', b'{"pid": "1", "host": "h"}'])
def test_torn_lock_is_stale(tmp_path, content):
    path = tmp_path / LOCK_NAME
    path.write_bytes(content)
    t = time.time() - 60
    os.utime(path, (t, t))
    with RunLock(tmp_path) as lock:
        assert lock.took_over_stale is not None
        assert "unreadable" in lock.took_over_stale["reason"]


def test_release_keeps_a_lock_that_is_not_ours(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    _write_lock(tmp_path, 4242, "another-host")  # replaced behind our back
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "another-host"


# ---------------------------------------------------------------------------- JSON lines

def test_read_jsonl_clean(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"i": 1}\n\n{"i": 2}\n  \n')
    assert read_jsonl(p) == ([{"i": 1}, {"i": 2}], False)


def test_read_jsonl_empty(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("")
    assert read_jsonl(p) == ([], False)


@pytest.mark.parametrize("tail", ['{"i": 3, "lo', '{"i": 3}', '{"i": 3, "lo\n', "\xe9"])
def test_read_jsonl_drops_torn_last_line(tmp_path, tail):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"i": 1}\n{"i": 2}\n' + tail.encode("utf-8")[:-1 if tail == "\xe9" else None])
    assert read_jsonl(p) == ([{"i": 1}, {"i": 2}], True)


def test_read_jsonl_middle_corruption_names_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"i": 1}\n{"i": 2,,\n{"i": 3}\n')
    with pytest.raises(ArtifactError, match=r"m\.jsonl, line 2: not valid JSON"):
        read_jsonl(p)


def test_read_jsonl_non_object_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"i": 1}\n[1, 2]\n')
    with pytest.raises(ArtifactError, match=r"line 2: a JSON list, expected a JSON object"):
        read_jsonl(p)


def test_read_jsonl_missing(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_rewrite_jsonl_repairs_torn_file(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"i": 1}\n{"i": 2, "t": ')
    records, torn = read_jsonl(p)
    assert torn
    rewrite_jsonl(p, records)
    assert p.read_text() == '{"i": 1}\n'
    with open(p, "a") as fh:
        fh.write(json.dumps({"i": 2}) + "\n")
    assert read_jsonl(p) == ([{"i": 1}, {"i": 2}], False)
    rewrite_jsonl(p, [{"t": torch.tensor(1.5)}])
    assert read_jsonl(p) == ([{"t": 1.5}], False)
    assert _temps(tmp_path) == []

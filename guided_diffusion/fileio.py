"""Atomic file writes: every file the toolkit writes goes to a temporary name in its final folder and is renamed
into place, so a reader, or a run that is killed, never sees half a file.

Temporary names are hidden and made of letters only (`.tmp-<16 letters>.part`): the ISIC challenge's scorer
pairs each ground truth with the one file whose name holds its 7-digit id, so no temporary file may carry digits
(and none ends in an image suffix). The `.part` ending matters to torch.save, which names the archive inside the
file after the file name up to its last dot.
"""
from __future__ import annotations

import os
import secrets
import string
from pathlib import Path
from typing import Callable, Union

TMP_PREFIX, TMP_SUFFIX = ".tmp-", ".part"
Content = Union[bytes, str, Callable[[Path], None]]


def _new_tmp(folder: Path) -> Path:
    """Create (exclusively) and return a fresh hidden temporary file in `folder`."""
    while True:
        name = TMP_PREFIX + "".join(secrets.choice(string.ascii_lowercase) for _ in range(16)) + TMP_SUFFIX
        try:
            os.close(os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return folder / name
        except FileExistsError:
            continue


def atomic_write(path: Path | str, content: Content) -> Path:
    """Write bytes, text (UTF-8), or whatever `content(tmp_path)` writes, to `path` through a temporary file in
    the same folder and os.replace (atomic on POSIX and Windows); the folder is made when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_tmp(path.parent)
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as fh:
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_tmp(folder: Path | str, recursive: bool = False) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder` (its subfolders too with `recursive`); call it
    only while holding the folder's lock (OutDirLock), when no live writer of ours can own one."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f"{TMP_PREFIX}*{TMP_SUFFIX}"
    found = sorted(folder.rglob(pattern) if recursive else folder.glob(pattern))
    for path in found:
        path.unlink(missing_ok=True)
    return found


LOCK_FILE = ".lock"


class OutDirLock:
    """An exclusive lock on an output folder while one run writes it: a second run into the same folder stops with
    a one-line error instead of interleaving its files. The lock is an OS file lock (flock) on <folder>/.lock, so
    it is released when the process ends, however it ends (kill -9 included); no stale lock to clean by hand.
    Where the OS has no flock (Windows) the lock is a no-op."""

    def __init__(self, folder: Path | str, flag: str = "--out_dir"):
        self.folder, self.flag, self.fh = Path(folder), flag, None

    def acquire(self) -> "OutDirLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"{self.flag} {self.folder} is a file, not a folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fh = open(self.folder / LOCK_FILE, "a+")
        except OSError as exc:
            raise ValueError(f"{self.flag} {self.folder}: cannot write there ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            owner = fh.read().strip() or "?"
            fh.close()
            raise ValueError(f"{self.flag} {self.folder} is being written by another run (pid {owner}); wait for it "
                             f"to finish, or use another {self.flag}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self.fh = fh
        return self

    def release(self) -> None:
        if self.fh is not None:
            self.fh.close()  # closing the descriptor drops the flock
            self.fh = None

    def __enter__(self) -> "OutDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

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

"""Tests of guided_diffusion.fileio: a failed atomic write keeps the old file and no temp; temp names hold no digits."""
import re

import numpy as np
import pytest
from image_files import read_png, temp_files

from guided_diffusion import fileio
from guided_diffusion.sampling.outputs import atomic_write_png


def test_atomic_write_png_failure_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    old = np.full((4, 4), 7, np.uint8)
    atomic_write_png(path, old)

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_png(path, np.zeros((4, 4), np.uint8))
    monkeypatch.undo()
    assert np.array_equal(read_png(path), old)
    assert temp_files(tmp_path) == []


def test_temp_names_never_hold_digits(tmp_path):
    for _ in range(200):
        name = fileio._new_tmp(tmp_path).name
        assert name.startswith(".") and not re.search(r"\d", name) and not name.endswith(".png")

"""Tests for guided_diffusion.checkpoint: atomic save, latest, kinds, the one-line errors that name the flag."""
import random

import numpy as np
import pytest
import torch

from guided_diffusion.checkpoint import (FORMAT, CheckpointError, capture_rng_state, check_flags, find_latest,
                                         load_checkpoint, restore_rng_state, save_checkpoint)


def test_save_points_latest_at_the_newest_and_keeps_only_the_newest(tmp_path):
    for step in (1, 20, 300):
        save_checkpoint(tmp_path, step, {"step": step, "kind": "preseg"}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("model_*.pt")) == ["model_0000020.pt", "model_0000300.pt"]
    assert (tmp_path / "latest").read_text().strip() == "model_0000300.pt"
    assert not list(tmp_path.glob(".tmp-*")), "a temporary file was left behind"
    ckpt = load_checkpoint(tmp_path, kind="preseg")  # a folder means its latest
    assert ckpt["step"] == 300 and ckpt["format"] == FORMAT and ckpt["path"].endswith("model_0000300.pt")


def test_find_latest_falls_back_to_the_highest_step_when_latest_is_stale(tmp_path):
    save_checkpoint(tmp_path, 5, {"step": 5})
    save_checkpoint(tmp_path, 7, {"step": 7})
    (tmp_path / "latest").write_text("model_0000999.pt\n")  # names a file that is gone
    assert find_latest(tmp_path).name == "model_0000007.pt"
    assert find_latest(tmp_path / "nothing") is None


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "folder holds no model_*.pt checkpoint"),
    (lambda p: p / "missing.pt", "no such file"),
    (lambda p: (p / "junk.pt").write_bytes(b"not torch") and p / "junk.pt", "not a readable checkpoint"),
    (lambda p: torch.save({"weights": 1}, p / "other.pt") or p / "other.pt", "not a checkpoint of this toolkit"),
])
def test_bad_checkpoints_are_one_line_errors_naming_the_flag(tmp_path, make, message):
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(make(tmp_path), flag="--preseg_path")
    text = str(exc.value)
    assert text.startswith("--preseg_path ") and message in text and "\n" not in text


def test_a_checkpoint_of_another_kind_names_the_script_that_trains_the_right_one(tmp_path):
    save_checkpoint(tmp_path, 1, {"step": 1, "kind": "denoiser"})
    with pytest.raises(CheckpointError, match=r"--model_path .* is a denoising network checkpoint, not a diffusion "
                                              r"model one; train that with scripts/segmentation_train.py"):
        load_checkpoint(tmp_path, kind="diffusion")
    save_checkpoint(tmp_path, 2, {"step": 2})  # no kind: a diffusion model (checkpoints from before kinds)
    assert load_checkpoint(tmp_path, kind="diffusion")["step"] == 2


def test_check_flags_ignores_unset_and_skipped_flags_and_names_a_contradiction():
    saved = {"image_size": 64, "num_channels": 16}
    check_flags({"image_size": None, "num_channels": 16, "new_flag": 3}, saved, "the checkpoint")
    check_flags({"image_size": 32}, saved, "the checkpoint", skip=("image_size",))
    with pytest.raises(ValueError, match=r"^--image_size 32 contradicts the checkpoint \(64\); drop it$"):
        check_flags({"image_size": 32}, saved, "the checkpoint", hint=lambda key: "drop it")


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path, 1, {"rng": capture_rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(load_checkpoint(tmp_path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected

"""Tests of guided_diffusion.sampling.outputs: PNGs, resizing, overlays, the prediction folder, the manifest."""
import csv
import os
import re

import numpy as np
import pytest
import torch
from image_files import read_png, temp_files
from PIL import Image

from guided_diffusion.sampling import outputs
from guided_diffusion.sampling.outputs import PredictionWriter, atomic_write_png, overlay, resize_prob, to_uint8


def record(id: str, **extra) -> dict:
    """A manifest record with the contract's columns."""
    return {"id": id, "sampler": "dpm_solver++", "steps": 20, "nfe": 20, "seconds": 1.5, **extra}


def blob(h: int = 32, w: int = 32) -> torch.Tensor:
    """A smooth probability map with a foreground blob in the middle."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.sigmoid(8 * (0.5 - (yy**2 + xx**2).sqrt()))


# ---------------------------------------------------------------- small functions
def test_to_uint8_rounds_and_clips():
    x = np.array([0.0, 1.0, 0.5, 0.2, -1.0, 2.0, np.nan])
    assert to_uint8(x).tolist() == [0, 255, 128, 51, 0, 255, 0]
    assert to_uint8(torch.tensor([[0.0, 1.0]])).dtype == np.uint8


def test_atomic_write_png_roundtrip_creates_parents_and_leaves_no_temp(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    path = tmp_path / "a" / "b" / "x.png"
    atomic_write_png(path, arr)
    assert np.array_equal(read_png(path), arr)
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    atomic_write_png(path, rgb)
    assert np.array_equal(read_png(path), rgb)
    assert temp_files(tmp_path) == []
    with pytest.raises(ValueError):
        atomic_write_png(path, arr.astype(np.float32))
    with pytest.raises(ValueError):
        atomic_write_png(path, np.zeros((3, 4, 2), np.uint8))


def test_resize_prob_is_bilinear_clamped_and_sized():
    coarse = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    big = resize_prob(coarse, (5, 9))
    assert big.shape == (5, 9) and big.dtype == torch.float32
    assert big.min() >= 0 and big.max() <= 1
    row = big[2]
    assert torch.all(row[1:] >= row[:-1])  # monotone ramp, not a nearest-neighbour step
    assert ((row > 0.05) & (row < 0.95)).sum() >= 3
    torch.testing.assert_close(resize_prob(torch.full((8, 8), 0.3), (20, 13)), torch.full((20, 13), 0.3))
    small = resize_prob(blob(64, 64), (16, 16))
    assert small.shape == (16, 16)
    same = torch.rand(6, 7)
    torch.testing.assert_close(resize_prob(same, (6, 7)), same)
    with pytest.raises(ValueError):
        resize_prob(torch.zeros(1, 4, 4), (8, 8))


def test_overlay_shape_dtype_contour_and_tint():
    image = np.full((60, 80, 3), 100, np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[20:40, 30:50] = True
    out = overlay(image, mask)
    assert out.shape == (60, 80, 3) and out.dtype == np.uint8
    assert tuple(out[20, 40]) == outputs.CONTOUR_RGB  # on the boundary
    assert tuple(out[30, 40]) == (100, 100, 100)  # interior untouched
    assert tuple(out[5, 5]) == (100, 100, 100)  # background untouched
    unc = np.zeros((60, 80), np.float32)
    unc[0:10, 0:10] = 1.0
    tinted = overlay(image, mask, unc)
    assert not np.array_equal(tinted[5, 5], out[5, 5]) and np.array_equal(tinted[50, 70], out[50, 70])
    gray = overlay(np.full((60, 80), 100, np.uint8), mask)
    assert gray.shape == (60, 80, 3)
    with pytest.raises(ValueError):
        overlay(image, mask[:10])


def test_overlay_contour_scales_with_image_size():
    mask = np.zeros((900, 900), bool)
    mask[200:700, 200:700] = True
    out = overlay(np.zeros((900, 900, 3), np.uint8), mask)
    contour = np.all(out == outputs.CONTOUR_RGB, axis=2)
    assert contour[450, 200:203].all() and not contour[450, 203]  # 3 px thick at 900 px
    assert not contour[~mask].any()


# ---------------------------------------------------------------- the prediction folder
def test_writer_writes_files_at_original_size(tmp_path):
    prob, unc = blob(32, 32), torch.rand(32, 32)
    size = (50, 70)
    w = PredictionWriter(tmp_path, save_overlays=True)
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    w.write("ISIC_0000007", prob, unc, size, image=image, record=record("ISIC_0000007"))
    w.close()
    for sub in ("", "prob", "uncertainty", "overlays"):
        path = tmp_path / sub / "ISIC_0000007.png"
        assert path.is_file(), path
        with Image.open(path) as im:
            assert im.size == (70, 50)  # PIL sizes are (W, H)
            assert im.mode == ("RGB" if sub == "overlays" else "L")
    mask = read_png(tmp_path / "ISIC_0000007.png")
    assert set(np.unique(mask).tolist()) == {0, 255}
    big = resize_prob(prob, size).numpy()
    stored = read_png(tmp_path / "prob" / "ISIC_0000007.png") / 255.0
    assert np.abs(stored - big).max() <= 0.5 / 255 + 1e-6
    assert np.array_equal(mask == 255, big > 0.5)
    stored_unc = read_png(tmp_path / "uncertainty" / "ISIC_0000007.png") / 255.0
    assert np.abs(stored_unc - resize_prob(unc, size).numpy()).max() <= 0.5 / 255 + 1e-6
    assert temp_files(tmp_path) == []


def test_done_and_overwrite(tmp_path):
    w = PredictionWriter(tmp_path)
    assert not w.done("cju0qkwl35piu0993l0dewei2")
    w.write("cju0qkwl35piu0993l0dewei2", blob(), torch.zeros(32, 32), (40, 40), record=record("cju0qkwl35piu0993l0dewei2"))
    assert w.done("cju0qkwl35piu0993l0dewei2")
    assert not PredictionWriter(tmp_path, overwrite=True).done("cju0qkwl35piu0993l0dewei2")
    assert not PredictionWriter(tmp_path, save_overlays=True).done("cju0qkwl35piu0993l0dewei2")  # overlay missing
    (tmp_path / "cju0qkwl35piu0993l0dewei2.png").unlink()  # interrupted before the mask
    assert not w.done("cju0qkwl35piu0993l0dewei2")


def test_mask_is_written_last(tmp_path, monkeypatch):
    order = []
    real = outputs.atomic_write_png

    def spy(path, array):
        order.append(path.relative_to(tmp_path).as_posix())
        real(path, array)

    monkeypatch.setattr(outputs, "atomic_write_png", spy)
    w = PredictionWriter(tmp_path, save_overlays=True)
    w.write("a", blob(), torch.zeros(32, 32), (32, 32), image=np.zeros((32, 32, 3), np.uint8), record=record("a"))
    assert order == ["prob/a.png", "uncertainty/a.png", "overlays/a.png", "a.png"]


def test_write_rejects_bad_records_ids_and_missing_image(tmp_path):
    w = PredictionWriter(tmp_path, save_overlays=True)
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="nfe"):
        w.write("a", blob(8, 8), torch.zeros(8, 8), (8, 8), image=img, record={"sampler": "ddim", "steps": 1, "seconds": 0})
    with pytest.raises(ValueError, match="differs"):
        w.write("a", blob(8, 8), torch.zeros(8, 8), (8, 8), image=img, record=record("b"))
    with pytest.raises(ValueError):
        w.write("../a", blob(8, 8), torch.zeros(8, 8), (8, 8), image=img, record=record("../a"))
    with pytest.raises(ValueError, match="image"):
        w.write("a", blob(8, 8), torch.zeros(8, 8), (8, 8), record=record("a"))
    with pytest.raises(ValueError, match="original size"):
        w.write("a", blob(8, 8), torch.zeros(8, 8), (9, 8), image=img, record=record("a"))
    assert not any(tmp_path.rglob("*.png"))  # nothing half-written


def read_manifest(path):
    """Manifest rows keyed by id, and the header."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return {r["id"]: r for r in reader}, reader.fieldnames


def test_manifest_merges_across_sessions(tmp_path):
    w = PredictionWriter(tmp_path)
    for id in ("a", "b"):
        w.write(id, blob(), torch.zeros(32, 32), (32, 32), record=record(id, seconds=1.0))
    w.close()
    rows, cols = read_manifest(tmp_path / "manifest.csv")
    assert list(cols[:5]) == ["id", "sampler", "steps", "nfe", "seconds"] and set(rows) == {"a", "b"}

    w = PredictionWriter(tmp_path)  # resumed run: a and b are done, c is new
    assert w.done("a") and w.done("b") and not w.done("c")
    w.write("c", blob(), torch.zeros(32, 32), (32, 32), record=record("c", seconds=3.0, fusion="staple"))
    w.close()
    rows, cols = read_manifest(tmp_path / "manifest.csv")
    assert set(rows) == {"a", "b", "c"} and "fusion" in cols
    assert rows["a"]["seconds"] == "1.0" and rows["c"]["fusion"] == "staple" and rows["a"]["fusion"] == ""

    w = PredictionWriter(tmp_path, overwrite=True)  # rewrite b only: a and c keep their rows
    w.write("b", blob(), torch.zeros(32, 32), (32, 32), record=record("b", seconds=9.0))
    w.close()
    rows, _ = read_manifest(tmp_path / "manifest.csv")
    assert set(rows) == {"a", "b", "c"} and rows["b"]["seconds"] == "9.0" and rows["c"]["seconds"] == "3.0"
    assert temp_files(tmp_path) == []


def test_manifest_row_is_on_disk_as_soon_as_its_mask(tmp_path):
    with PredictionWriter(tmp_path) as w:
        w.write("a", blob(), torch.zeros(32, 32), (32, 32), record=record("a"))
        rows, _ = read_manifest(tmp_path / "manifest.csv")  # a crash now would keep this row
        assert set(rows) == {"a"}
    assert (tmp_path / "manifest.csv").is_file()


def test_isic_scorer_sees_exactly_one_file_per_id(tmp_path):
    ids = ["ISIC_0000001", "ISIC_0000002"]
    w = PredictionWriter(tmp_path, save_overlays=True)
    for id in ids:
        image = np.zeros((40, 30, 3), np.uint8)
        w.write(id, blob(), torch.rand(32, 32), (40, 30), image=image, record=record(id))
    w.close()
    top = [p.name for p in tmp_path.iterdir()]
    for id in ids:
        number = re.search(r"\d{7}", id).group(0)
        holders = [name for name in top if number in name]
        assert holders == [f"{id}.png"], top
    assert sorted(top) == sorted(["ISIC_0000001.png", "ISIC_0000002.png", "manifest.csv", *outputs.SUBDIRS])
    assert not any(os.path.basename(p).startswith(".") for p in top)


def test_writers_sharing_a_folder_keep_each_others_rows(tmp_path):
    # One writer per torchrun rank, each with its own ids, all flushing the same manifest.
    first, second = PredictionWriter(tmp_path), PredictionWriter(tmp_path)
    first.write("a", blob(), torch.zeros(32, 32), (32, 32), record=record("a"))
    second.write("b", blob(), torch.zeros(32, 32), (32, 32), record=record("b"))
    first.close()
    second.close()
    rows, _ = read_manifest(tmp_path / "manifest.csv")
    assert set(rows) == {"a", "b"}


def test_concurrent_flushes_lose_no_rows(tmp_path):
    import threading

    writers = [PredictionWriter(tmp_path) for _ in range(4)]

    def run(rank):
        for k in range(5):
            id = f"r{rank}_{k}"
            writers[rank].write(id, blob(8, 8), torch.zeros(8, 8), (8, 8), record=record(id))
        writers[rank].close()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows, _ = read_manifest(tmp_path / "manifest.csv")
    assert set(rows) == {f"r{r}_{k}" for r in range(4) for k in range(5)}
    assert temp_files(tmp_path) == []


def test_a_mask_whose_row_never_reached_the_manifest_is_sampled_again(tmp_path, monkeypatch):
    w = PredictionWriter(tmp_path)
    w.write("a", blob(), torch.zeros(32, 32), (32, 32), record=record("a"))
    monkeypatch.setattr(PredictionWriter, "_append", lambda self, row: None)  # killed between b's mask and its row
    w.write("b", blob(), torch.zeros(32, 32), (32, 32), record=record("b"))
    monkeypatch.undo()
    with open(tmp_path / "manifest.csv", "a") as fh:
        fh.write("c,dpm_solv")  # and a row cut short: c has no mask either
    resumed = PredictionWriter(tmp_path)  # no close(): as after kill -9
    assert resumed.done("a") and not resumed.done("b") and not resumed.done("c")
    resumed.write("b", blob(), torch.zeros(32, 32), (32, 32), record=record("b"))
    rows, _ = read_manifest(tmp_path / "manifest.csv")
    assert rows["b"]["seconds"] == "1.5" and rows["c"]["steps"] is None  # b's row starts on a line of its own
    resumed.close()
    text = (tmp_path / "manifest.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in text] == ["id", "a", "b"]


def test_clear_prediction_folder_removes_only_the_samplers_outputs(tmp_path):
    w = PredictionWriter(tmp_path, save_overlays=True)
    w.write("a", blob(), torch.zeros(32, 32), (32, 32), image=np.zeros((32, 32, 3), np.uint8), record=record("a"))
    w.close()
    outputs.write_settings(tmp_path, {"model": {"weights": "x"}})
    for name in ("split.json", "notes.txt", "eval/evaluation.csv", "evaluation.csv", "evaluation.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    outputs.clear_prediction_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "split.json"]


def test_settings_conflict_names_what_differs():
    old = {"model": {"file": "model_0000100.pt", "weights": "1"}, "settings": {"sampler": "ddim", "steps": 10,
                                                                                 "eta": 0.0}}
    same = {"model": {"file": "model_0000100.pt", "path": "/elsewhere", "weights": "1"}, "settings": old["settings"]}
    assert outputs.settings_conflict("P", old, same) is None
    new = {"model": {"file": "model_0000200.pt", "weights": "2"}, "settings": {"sampler": "ddim", "steps": 20,
                                                                                 "eta": 0.0}}
    assert outputs.settings_conflict("P", old, new) == (
        "--out_dir P holds masks of model_0000100.pt with --steps 10; this run: model_0000200.pt with --steps 20; "
        "use --overwrite True to replace them, or another --out_dir")
    solver = {"model": old["model"], "settings": {"sampler": "dpm_solver++", "steps": 10, "order": 2}}
    assert "with --sampler ddim; this run: --sampler dpm_solver++;" in outputs.settings_conflict("P", old, solver)
    # ADDPM's networks: by their weights, named by file (or path when the files share a name)
    den = {"file": "model_0000002.pt", "path": "/a/den/model_0000002.pt", "weights": "d1"}
    addpm = {"model": old["model"], "networks": {"denoiser_path": den}, "settings": {"sampler": "addpm"}}
    moved = {**addpm, "networks": {"denoiser_path": {**den, "path": "/b/den/model_0000002.pt"}}}
    assert outputs.settings_conflict("P", addpm, moved) is None
    other = {**addpm, "networks": {"denoiser_path": {**moved["networks"]["denoiser_path"], "weights": "d2"}}}
    assert ("holds masks of model_0000100.pt with --denoiser_path /a/den/model_0000002.pt; this run: "
            "--denoiser_path /b/den/model_0000002.pt;") in outputs.settings_conflict("P", addpm, other)


def test_new_files_undo_removes_what_the_run_created_only(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    created = outputs.NewFiles(mine)
    for name in ("split.json", "manifest.csv", "sampling.json", ".lock", "prob/x.png"):
        (mine / name).parent.mkdir(exist_ok=True)
        (mine / name).write_text("x")
    created.undo()
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    fresh = tmp_path / "fresh"
    created = outputs.NewFiles(fresh)
    fresh.mkdir()
    (fresh / "split.json").write_text("x")
    created.undo()
    assert not fresh.exists()
    started = outputs.NewFiles(fresh)  # once a mask is written, every file stays, for a resume
    fresh.mkdir()
    (fresh / "split.json").write_text("x")
    (fresh / "a.png").write_bytes(b"mask")
    assert started.undo() == [] and (fresh / "split.json").exists()

"""Tests for guided_diffusion.reports.quickstart: a tiny quickstart end to end, its report checked against the masks."""
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.data import datasets
from guided_diffusion.reports.quickstart import QuickstartConfig, run_quickstart


def tiny(base: Path, **kw) -> QuickstartConfig:
    return QuickstartConfig(**{**dict(
        data_name="SYNTHETIC", data_dir=str(base / "data"), out_dir=str(base / "qs"), image_size=16,
        train_flags="--num_channels 8 --batch_size 4", train_steps=3, diffusion_steps=40,
        samplers="dpm_solver++:3,sde-dpm_solver++:3",
        ddpm_images=2, max_images=3, num_ensemble=2, panel_images=2, device="cpu"), **kw})


def dice_from_files(pred: Path, gt: Path) -> float:
    """Dice recomputed from the written mask and the ground-truth file, independently of metrics.py."""
    a = np.array(Image.open(pred).convert("L")) > 128
    b = datasets.load_mask(gt)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else 2.0 * (a & b).sum() / denom


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the markdown table that follows `header`."""
    block = text.split(header, 1)[1].split("\n\n", 2)[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    base = tmp_path_factory.mktemp("qs")
    datasets.make_synthetic(base / "data", num_images=20)
    cfg = tiny(base)
    return cfg, run_quickstart(cfg)


def test_quickstart_writes_model_masks_report_and_figures(quick):
    cfg, paths = quick
    out = Path(cfg.out_dir)
    assert paths["model"].is_file() and paths["model"].parent == out / "model"
    for tag in ("ddpm-40", "dpm_solver++-3", "sde-dpm_solver++-3"):
        with Image.open(out / f"panel_{tag}.png") as im:
            im.load()
            assert im.size[0] > 200
    assert (out / "quant.png").is_file()
    report = paths["report"].read_text()
    for name in ("quant.png", "panel_ddpm-40.png", "panel_sde-dpm_solver++-3.png"):
        assert f"]({name})" in report
    # the fast samplers ran on 3 test images, the reference on 2
    folders = {k: v for k, v in paths.items() if k.startswith("masks")}
    counts = {k: len(list(v.glob("*.png"))) for k, v in folders.items()}
    assert counts == {"masks ddpm-40": 2, "masks dpm_solver++-3": 3, "masks sde-dpm_solver++-3": 3}


def test_quickstart_report_numbers_match_the_mask_files(quick):
    cfg, paths = quick
    report = paths["report"].read_text()
    split = datasets.load_split(paths["masks ddpm-40"] / "split.json")
    pairs = {p.id: p for p in datasets.list_pairs(cfg.data_name, cfg.data_dir, "test",
                                                  split_file=paths["masks ddpm-40"] / "split.json")}
    ref_ids = sorted(split["test"])[:2]
    head = table_rows(report, "on the same 2 test images")
    assert [(r[0], r[1], r[3]) for r in head] == [("ddpm", "40", "40"), ("dpm_solver++", "3", "4"),
                                                  ("sde-dpm_solver++", "3", "4")]
    ref_dice = None
    for row in head:
        folder = paths[f"masks {row[0]}-{row[1]}"]
        expected = np.mean([dice_from_files(folder / f"{i}.png", pairs[i].mask) for i in ref_ids])
        assert float(row[5]) == pytest.approx(expected, abs=1e-4), row
        ref_dice = expected if row[0] == "ddpm" else ref_dice
        assert float(row[7]) == pytest.approx(expected - ref_dice, abs=2e-4)
    full = table_rows(report, "## Every sampled test image")
    for row in full[1:]:
        folder = paths[f"masks {row[0]}-{row[1]}"]
        ids = sorted(split["test"])[:3]
        expected = np.mean([dice_from_files(folder / f"{i}.png", pairs[i].mask) for i in ids])
        assert row[4] == "3" and float(row[5].split()[0]) == pytest.approx(expected, abs=1e-4)
    assert re.search(r"took \d+\.\d minutes", report)


def test_quickstart_rerun_keeps_the_trained_model(quick, tmp_path):
    cfg, paths = quick
    before = paths["model"].stat().st_mtime_ns
    again = run_quickstart(tiny(Path(cfg.out_dir).parent, samplers="dpm_solver++:2", ddpm_images=0, max_images=1))
    assert again["model"] == paths["model"] and paths["model"].stat().st_mtime_ns == before
    assert "Against DDPM" not in again["report"].read_text()  # no reference row asked for


@pytest.mark.slow
@pytest.mark.parametrize("flags,needle", [(["--ddpm_images", "-1"], "--ddpm_images"),
                                          (["--samplers", "dpm_solver++"], "--samplers entries are sampler:steps"),
                                          (["--samplers", "", "--ddpm_images", "0"], "nothing to sample"),
                                          (["--samplers", "dpm_solvr:20"], "unknown sampler 'dpm_solvr'"),
                                          (["--device", "tpu"], "--device")])
def test_quickstart_bad_flags_are_one_line_errors(flags, needle, tmp_path, script):
    r = script("quickstart.py", "--out_dir", str(tmp_path / "q"), "--data_dir", str(tmp_path / "d"), *flags,
               timeout=300)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "q").exists()  # nothing started

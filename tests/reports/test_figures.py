"""Tests for guided_diffusion.reports.figures: the example grid's layout and errors, the speed/quality plot's."""
import numpy as np
import pytest
from PIL import Image

from guided_diffusion.data import datasets
from guided_diffusion.reports import figures


def test_example_grid_errors_and_layout(tmp_path):
    datasets.make_synthetic(tmp_path / "data", num_images=20)
    pairs = datasets.list_pairs("SYNTHETIC", tmp_path / "data", "all")[:2]
    folder = tmp_path / "pred"
    (folder / "uncertainty").mkdir(parents=True)
    for p in pairs:
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(folder / f"{p.id}.png")
        Image.fromarray(np.full((10, 12), 128, np.uint8)).save(folder / "uncertainty" / f"{p.id}.png")
    one = figures.example_grid(pairs, [figures.Column("m", folder)], tmp_path / "one.png")
    two = figures.example_grid(pairs, [figures.Column("m", folder), figures.Column("u", folder, "uncertainty"),
                                       figures.Column("m2", folder)], tmp_path / "two.png")
    with Image.open(one) as a, Image.open(two) as b:
        assert b.size[0] > a.size[0] * 1.3 and abs(b.size[1] - a.size[1]) < 0.1 * a.size[1]
    (folder / f"{pairs[1].id}.png").unlink()
    with pytest.raises(FileNotFoundError, match=pairs[1].id):
        figures.example_grid(pairs, [figures.Column("m", folder)], tmp_path / "three.png")
    assert not (tmp_path / "three.png").exists()
    with pytest.raises(ValueError):
        figures.speed_quality_plot([], tmp_path / "q.png")

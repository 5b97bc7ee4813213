"""Tests for guided_diffusion.reports.figures: the example grid's layout and errors, the speed/quality and Dice/NFE plots."""
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


def _drawn(ax_calls, monkeypatch):
    """Record every line the plots draw (x and y data, label) instead of trusting the PNG's pixels."""
    import matplotlib.axes

    real = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        lines = real(self, *args, **kwargs)
        ax_calls.extend((list(map(float, ln.get_xdata())), list(map(float, ln.get_ydata())), ln.get_label())
                        for ln in lines)
        return lines

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)


def test_speed_and_nfe_plots_draw_one_sorted_line_per_group(tmp_path, monkeypatch):
    calls = []
    _drawn(calls, monkeypatch)
    points = [figures.SpeedPoint("ddim", 20, 2.0, 0.6), figures.SpeedPoint("ddim", 10, 1.0, 0.5),
              figures.SpeedPoint("sde", 10, 1.1, 0.7)]
    ref = figures.SpeedPoint("ddpm", 1000, 50.0, 0.8)
    path = figures.speed_quality_plot(points, tmp_path / "q.png", reference=ref)
    assert path.is_file() and Image.open(path).size[0] > 100
    assert calls[:2] == [([1.0, 2.0], [0.5, 0.6], "ddim"), ([1.1], [0.7], "sde")]
    assert calls[2] == ([50.0], [0.8], "reference: ddpm 1000")
    calls.clear()
    nfe = [figures.NfePoint("diffusion", "ddim 10", 10, 0.7), figures.NfePoint("diffusion", "ddim 1", 1, 0.72),
           figures.NfePoint("b1", "ddim 1", 1, 0.6)]
    path = figures.dice_nfe_plot(nfe, tmp_path / "n.png", baseline=("plain UNet", 0.71))
    assert path.is_file()
    assert calls == [([1.0, 10.0], [0.72, 0.7], "diffusion"), ([1.0], [0.6], "b1")]
    with pytest.raises(ValueError):
        figures.dice_nfe_plot([], tmp_path / "e.png")


def test_coinciding_points_share_one_label(tmp_path, monkeypatch):
    import matplotlib.axes

    labels = []
    real = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **k: labels.append(text) or real(self, text, *a, **k))
    nfe = [figures.NfePoint("diffusion", "dpm_solver++ 10", 11, 0.83),
           figures.NfePoint("diffusion", "dpm_solver++ (seed) 10", 11, 0.83),
           figures.NfePoint("diffusion", "ddim 10", 10, 0.83)]
    figures.dice_nfe_plot(nfe, tmp_path / "n.png")
    assert labels == ["ddim 10", "dpm_solver++ 10 = dpm_solver++ (seed) 10"]


def test_many_models_each_get_their_own_style_and_only_the_main_one_is_labelled(tmp_path, monkeypatch):
    import matplotlib.axes

    styles = {tuple(sorted(figures.line_style(k).items())) for k in range(40)}
    assert len(styles) == 40  # no two of 40 lines look alike
    labels, widths = [], {}
    real_annotate, real_plot = matplotlib.axes.Axes.annotate, matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **k: labels.append(text) or real_annotate(self, text, *a, **k))

    def plot(self, *a, **k):
        widths[k.get("label")] = k.get("linewidth")
        return real_plot(self, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    nfe = [figures.NfePoint(model, sampler, n, 0.5 + 0.01 * k)
           for k, model in enumerate(["diffusion", "eps", "v"]) for sampler, n in (("ddim 1", 1), ("dpm 10", 11))]
    figures.dice_nfe_plot(nfe, tmp_path / "n.png", baseline=("plain UNet", 0.5))
    assert labels == ["ddim 1", "dpm 10"]  # the main model's points only
    assert widths["diffusion"] > widths["eps"] == widths["v"]


def test_labels_of_points_in_one_column_are_stacked_in_order_of_dice():
    spots = [(11, 0.74), (1, 0.75), (10, 0.75), (11, 0.73), (100, 0.2)]
    assert figures.label_lifts(spots) == [0.0, 0.0, 7.0, -7.0, 0.0]  # 10 and 11 NFE: one column, 0.73 < 0.74 < 0.75

"""Tests for reports/pooling.py and scripts/pool_quality.py: paired differences pooled over splits and seeds."""
import numpy as np
import pandas as pd
import pytest

from guided_diffusion.evaluation.metrics import bootstrap_ci
from guided_diffusion.layout import row_views
from guided_diffusion.reports.pooling import (Pooled, benchmark_runs, compare, row_title, run_interval,
                                              to_markdown)

IDS = ["a", "b", "c"]


def scored(run, row, dice, ids=IDS):
    folder = run / "samples" / row / "eval"
    folder.mkdir(parents=True)
    pd.DataFrame({"id": ids, "dice": dice, "iou": dice}).to_csv(folder / "evaluation.csv", index=False)


def benchmark(root, runs: dict):
    """runs: {relative run folder: (solver, read-out, UNet) Dice per image}."""
    for rel, (solver, one, unet) in runs.items():
        run = root / rel
        scored(run, "diffusion/dpm_solver++-10-n5", solver)
        scored(run, "diffusion/ddim-1-n5", one)
        scored(run, "plain_UNet/preseg-1-n5", unet)
    return root


def by_name(results):
    return {p.name: p for p in results}


def test_differences_are_averaged_over_a_splits_seeds_then_pooled_over_images(tmp_path):
    s0 = benchmark(tmp_path / "split0", {".": ([.8, .7, .9], [.8, .6, .9], [.7, .7, .7]),
                                         "seed1": ([.6, .7, .5], [.6, .7, .6], [.8, .6, .7])})
    s1 = benchmark(tmp_path / "split1", {".": ([.5, .9, .4], [.5, .8, .4], [.6, .6, .6])})
    scored(s1, "diffusion/ddpm-0-n5", [.4, .8], ids=["a", "b"])  # DDPM on the first two images only
    (s0 / "seed1x").mkdir()  # not a run folder
    assert benchmark_runs(s0) == [s0, s0 / "seed1"]
    got = by_name(compare([s0, s1]))
    # split 0: per image (0.1 + -0.2) / 2, (0 + 0.1) / 2, (0.2 - 0.2) / 2; split 1: -0.1, 0.3, -0.2
    expected = np.array([-0.05, 0.05, 0.0, -0.1, 0.3, -0.2])
    p = got["dpm_solver++ 10 − UNet"]
    assert p.mean == pytest.approx(expected.mean()) and (p.images, p.runs) == (6, 3)
    assert (p.low, p.high) == pytest.approx(bootstrap_ci(expected, n_boot=2000, seed=0))
    assert p.per_run == pytest.approx([0.1, -0.1, 0.0])
    # over runs: mean 0, s = 0.1, t(0.975, 2) = 4.302653 (the t table), half-width 4.302653 * 0.1 / sqrt(3)
    mean, low, high = p.over_runs
    assert mean == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(4.302653 * 0.1 / 3 ** 0.5, rel=1e-6)
    assert low == pytest.approx(-high) and p.at_or_above == 2
    read_out = got["dpm_solver++ 10 − ddim 1"]
    assert read_out.mean == pytest.approx(np.mean([0, 0.05, -0.05, 0, 0.1, 0]))
    ddpm = got["dpm_solver++ 10 − ddpm all"]  # only the images and the run DDPM sampled
    assert (ddpm.mean, ddpm.images, ddpm.runs) == (pytest.approx(0.1), 2, 1)
    assert got["ddpm all − UNet"].mean == pytest.approx(0.0) and got["ddpm all − UNet"].images == 2
    assert set(got) == {"ddim 1 − UNet", "ddpm all − UNet", "dpm_solver++ 10 − UNet", "dpm_solver++ 10 − ddim 1",
                        "dpm_solver++ 10 − ddpm all"}


def test_rows_of_several_ensemble_sizes_are_told_apart_and_the_solver_is_compared_at_the_read_outs_size(tmp_path):
    s0 = benchmark(tmp_path / "split0", {".": ([.8, .7, .9], [.8, .6, .9], [.7, .7, .7])})
    scored(s0, "diffusion/dpm_solver++-10-n15", [.9, .9, .9])
    got = by_name(compare([s0]))
    assert got["dpm_solver++ 10 × 15 − UNet"].mean == pytest.approx(0.2)
    assert got["dpm_solver++ 10 × 5 − UNet"].mean == pytest.approx(0.1)
    assert got["dpm_solver++ 10 × 5 − ddim 1 × 5"].mean == pytest.approx(0.1 / 3)
    assert row_title("dpm_solver++-10-n15", members=True) == "dpm_solver++ 10 × 15"


def test_rows_of_several_views_are_compared_with_the_unet_of_the_same_views_and_with_the_one_view_unet(tmp_path):
    s0 = benchmark(tmp_path / "split0", {".": ([.8, .7, .9], [.8, .6, .9], [.7, .7, .7])})
    scored(s0, "diffusion/dpm_solver++-10-n5-views4", [.9, .8, .9])
    scored(s0, "diffusion/dpm_solver++-10-n5-seed+views4", [.9, .8, .9])
    scored(s0, "diffusion/ddim-10-n5-views2", [.7, .7, .7])  # no UNet row of 2 views: the one-view UNet's
    scored(s0, "plain_UNet/preseg-1-n5-views4", [.8, .8, .6])
    got = {name: p.mean for name, p in by_name(compare([s0])).items()}
    assert got["dpm_solver++ 10 (views4) − UNet with 4 views"] == pytest.approx(0.4 / 3)
    assert got["dpm_solver++ 10 (seed+views4) − UNet with 4 views"] == pytest.approx(0.4 / 3)
    assert got["dpm_solver++ 10 (views4) − the one-view UNet"] == pytest.approx(0.5 / 3)
    assert got["UNet with 4 views − UNet"] == pytest.approx(0.1 / 3)
    assert got["ddim 10 (views2) − UNet"] == pytest.approx(0.0)
    assert got["dpm_solver++ 10 (views4) − dpm_solver++ 10"] == pytest.approx(0.2 / 3)  # what views add to a row
    assert "dpm_solver++ 10 (seed+views4) − dpm_solver++ 10 (seed)" not in got  # no one-view row of it was scored
    assert not any(name.startswith("ddim 10 (views2) − ddim") for name in got)
    assert got["dpm_solver++ 10 − UNet"] == pytest.approx(0.1)  # the one-view rows as before
    assert got["dpm_solver++ 10 − ddim 1"] == pytest.approx(0.1 / 3)
    assert row_views("views4") == 4 and row_views("seed+views2") == 2 and row_views("seed") == row_views(None) == 1


def test_against_pairs_the_same_split_and_seed_and_skips_runs_the_other_lacks(tmp_path):
    new = benchmark(tmp_path / "new", {".": ([.8, .8, .8], [.8, .8, .8], [.7] * 3),
                                       "seed1": ([.5, .5, .5], [.5, .5, .5], [.7] * 3)})
    old = benchmark(tmp_path / "old", {".": ([.6, .9, .8], [.6, .9, .8], [.7] * 3)})
    p = by_name(compare([new], against=[old]))["dpm_solver++ 10 − the other benchmark's"]
    assert p.mean == pytest.approx(np.mean([0.2, -0.1, 0.0])) and p.runs == 1
    with pytest.raises(ValueError, match="one folder per benchmark folder"):
        compare([new], against=[old, old])


def test_bad_folders_are_errors_that_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a benchmark_quality.py folder"):
        compare([tmp_path])
    (tmp_path / "samples").mkdir()
    with pytest.raises(FileNotFoundError, match="no scored rows"):
        compare([tmp_path])


@pytest.mark.slow
def test_the_script_prints_and_writes_the_table_and_refuses_a_bad_folder(tmp_path, script):
    s0 = benchmark(tmp_path / "split0", {".": ([.8, .7, .9], [.8, .6, .9], [.7, .7, .7])})
    result = script("pool_quality.py", s0, "--out", tmp_path / "pooled.md")
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("| dpm_solver++ 10 − UNet"))
    assert "| +0.100 [" in line and "| +0.100 | 1 of 1 |" in line
    assert (tmp_path / "pooled.md").read_text() == result.stdout
    bad = script("pool_quality.py", tmp_path / "nothing")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
    assert "nothing is not a benchmark_quality.py folder" in bad.stderr


def test_the_interval_over_runs_is_students_t_and_one_run_has_none():
    # values 1, 2, 3, 6: mean 3, s = sqrt(14 / 3); t(0.975, 3) = 3.182446 from the t table
    mean, low, high = run_interval([1.0, 2.0, 3.0, 6.0, float("nan")])
    half = 3.182446 * (14 / 3) ** 0.5 / 2
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - half, 3.0 + half), rel=1e-6)
    # a 90% interval: t(0.95, 3) = 2.353363
    ninety = 3 + 2.353363 * (14 / 3) ** 0.5 / 2
    assert run_interval([1.0, 2.0, 3.0, 6.0], level=0.9)[2] == pytest.approx(ninety, rel=1e-6)
    one = run_interval([0.25])
    assert one[0] == 0.25 and np.isnan(one[1]) and np.isnan(one[2])
    assert all(np.isnan(v) for v in run_interval([]))
    table = to_markdown([Pooled("a − b", 0.25, 0.1, 0.4, 3, 1, [0.25]),
                         Pooled("c − d", -0.01, -0.03, 0.01, 6, 2, [-0.02, 0.0])])
    rows = table.splitlines()[2:]
    assert rows[0] == "| a − b | +0.250 [+0.100, +0.400] | 3 | 1 | +0.250 | 1 of 1 | +0.250 |"
    half = 12.706205 * 0.02 / 2 ** 0.5 / 2 ** 0.5  # t(0.975, 1) = 12.706205; s = 0.02 / sqrt(2)
    assert rows[1] == (f"| c − d | -0.010 [-0.030, +0.010] | 6 | 2 | "
                       f"-0.010 [{-0.01 - half:+.3f}, {-0.01 + half:+.3f}] | 1 of 2 | -0.020 / +0.000 |")


def test_row_titles():
    assert row_title("dpm_solver++-10-n5") == "dpm_solver++ 10"
    assert row_title("sde-dpm_solver++-10-n5") == "sde-dpm_solver++ 10"
    assert row_title("dpm_solver++-10-n5-seed") == "dpm_solver++ 10 (seed)"
    assert row_title("ddpm-0-n5") == "ddpm all"

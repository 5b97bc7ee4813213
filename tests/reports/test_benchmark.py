"""Tests for guided_diffusion.reports.benchmark: benchmark_sampling.py against the DDPM reference, its ADDPM rows."""
import csv

import pytest
from PIL import Image


@pytest.mark.slow
def test_benchmark_compares_against_the_ddpm_reference(trained, tmp_path, script):
    from guided_diffusion.reports import benchmark
    assert benchmark.parse_configs("ddpm:40, dpm_solver++:4") == [("ddpm", 40), ("dpm_solver++", 4)]
    with pytest.raises(ValueError, match="--configs"):
        benchmark.parse_configs("ddpm")
    r = script("benchmark_sampling.py", "--model_path", trained / "run", "--out_dir", tmp_path / "b", "--configs",
               "ddpm:1000,ddim:4,dpm_solver++:3,sde-dpm_solver++:3", "--num_ensemble", 2, "--max_images", 2,
               "--ensemble_check", "dpm_solver++:3", "--device", "cpu", "--plot", "True", "--plot_dir",
               tmp_path / "fig", "--plot_images", 2)
    assert r.returncode == 0, r.stderr
    import csv
    rows = list(csv.DictReader(open(tmp_path / "b" / "benchmark.csv")))
    assert [(x["sampler"], x["steps"], x["nfe"]) for x in rows] == [("ddpm", "40", "40"), ("ddim", "4", "4"),
                                                                     ("dpm_solver++", "3", "4"),
                                                                     ("sde-dpm_solver++", "3", "4")]
    ref = rows[0]
    assert float(ref["dice_delta"]) == 0 and float(ref["speedup"]) == 1
    for x in rows:
        assert float(x["dice_delta"]) == pytest.approx(float(x["dice"]) - float(ref["dice"]))
    assert "ensemble cost" in (tmp_path / "b" / "benchmark.md").read_text()
    # --plot: the two figures, complete PNGs, nothing half-written beside them
    for name in ("quant.png", "qual.png"):
        with Image.open(tmp_path / "fig" / name) as im:
            im.load()
            assert im.size[0] > 200 and im.size[1] > 100
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["qual.png", "quant.png"]


def test_benchmark_has_addpm_rows(runs, tmp_path, run_script, capsys):
    out = tmp_path / "b"
    common = ["--model_path", runs / "diff", "--out_dir", out, "--num_ensemble", 2, "--max_images", 2,
              "--ensemble_check", "", "--device", "cpu", "--pre_t", 12, "--stop_t", 10, "--denoiser_path", runs / "den"]
    run_script("benchmark_sampling.py", *common, "--configs", "ddpm:1000,addpm-ddpm:0,addpm-dpm_solver++:2",
               "--preseg", f"{runs / 'preseg'},head")
    rows = list(csv.DictReader(open(out / "benchmark.csv")))
    assert [(r["sampler"], r["steps"], r["nfe"], r["nfe_parts"]) for r in rows] == [
        ("ddpm", "40", "40", ""), ("addpm-ddpm (preseg)", "2", "4", "1+2+1"), ("addpm-ddpm (head)", "2", "3", "0+2+1"),
        ("addpm-dpm_solver++ (preseg)", "2", "4", "1+2+1"), ("addpm-dpm_solver++ (head)", "2", "3", "0+2+1")]
    assert float(rows[0]["dice_delta"]) == 0
    text = (out / "benchmark.md").read_text()
    assert "| addpm-ddpm (preseg) | 2 | 2 | 4 = 1+2+1 |" in text and "chain from x_12 to x_10" in text
    # --reuse: finished rows are read back from their manifests, not resampled
    before = {p: p.stat().st_mtime_ns for p in out.rglob("synth_*.png")}
    run_script("benchmark_sampling.py", *common, "--configs", "ddpm:1000,addpm-ddpm:0", "--preseg", runs / "preseg",
               "--reuse", "True")
    again = list(csv.DictReader(open(out / "benchmark.csv")))
    keys = ("sampler", "steps", "nfe", "nfe_parts", "dice")
    assert [tuple(r[k] for k in keys) for r in again] == [tuple(r[k] for k in keys) for r in rows[:2]]
    assert float(again[1]["seconds_per_image"]) == pytest.approx(float(rows[1]["seconds_per_image"]), abs=1e-3)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("synth_*.png")}
    # a row folder from before sampling.json existed cannot be reused: it is sampled again, not an error
    legacy = out / "ddpm-40-n2"
    (legacy / "sampling.json").unlink()
    capsys.readouterr()
    run_script("benchmark_sampling.py", *common, "--configs", "ddpm:1000", "--reuse", "True")
    assert "masks without sampling.json (an older run's); sampling them again" in capsys.readouterr().out
    assert (legacy / "sampling.json").is_file()
    assert all(p.stat().st_mtime_ns > before[p] for p in legacy.glob("synth_*.png"))
    from guided_diffusion.reports import benchmark
    from guided_diffusion.sampling.pipeline import SamplingSummary
    other = SamplingSummary("addpm-ddpm", 2, 2, images=0, skipped=0, seconds=0.0, nfe=0, nfe_parts={},
                            settings={"pre_t": 12, "stop_t": 9, "preseg": "head"}, out_dir="")
    with pytest.raises(ValueError, match="--reuse: .* holds masks sampled with"):
        benchmark.manifest_cost(out / "addpm-ddpm-0-n2-head",
                                [r["id"] for r in csv.DictReader(open(out / "ddpm-40-n2" / "manifest.csv"))], other)

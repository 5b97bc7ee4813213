"""Tests for guided_diffusion.reports.train_speed: benchmark_train.py on CPU, and its variant and data-mode parsing."""
import csv

import pytest

from guided_diffusion.reports import train_speed


def test_benchmark_train_script_on_cpu(syn_dir, tmp_path, run_script):
    run_script("benchmark_train.py", "--data_dir", syn_dir, "--image_size", 16, "--num_channels", 8,
               "--num_res_blocks", 1, "--attention_resolutions", 8, "--diffusion_steps", 20, "--batch_size", 2,
               "--num_workers", 0, "--device", "cpu", "--warmup", 1, "--steps", 2, "--variants",
               "fp32,channels_last,bf16,tf32", "--out_dir", tmp_path, "--data", "memory,loader,loader_only")
    with open(tmp_path / "benchmark_train.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    alone, rows = rows[:2], rows[2:]
    assert [(r["variant"], r["data"]) for r in alone] == [("preload False", "loader_only"),
                                                           ("preload True", "loader_only")]
    assert all(float(r["images_per_s"]) > 0 and r["data_wait"] == "" for r in alone)
    assert float(alone[0]["speedup"]) == 1.0
    assert float(alone[1]["speedup"]) == pytest.approx(float(alone[1]["images_per_s"]) / float(alone[0]["images_per_s"]))
    assert [(r["variant"], r["data"]) for r in rows] == [
        (v, d) for v in ("fp32", "channels_last", "bf16", "tf32") for d in ("memory", "loader")]
    for r in rows[:6]:
        assert float(r["images_per_s"]) > 0 and float(r["peak_mem_mib"]) > 0 and r["note"] == ""
        assert 0.0 <= float(r["data_wait"]) < 1.0
    assert float(rows[0]["data_wait"]) == 0.0 and float(rows[0]["speedup"]) == 1.0
    assert rows[6]["note"] == "tf32: CUDA only" and rows[6]["images_per_s"] == ""
    assert "| variant | data | images/s |" in (tmp_path / "benchmark_train.md").read_text()


def test_variant_parsing():
    assert train_speed.parse_variants("fp32, bf16+channels_last") == [frozenset(), {"bf16", "channels_last"}]
    assert train_speed.variant_name(frozenset({"compile", "bf16"})) == "bf16+compile"
    with pytest.raises(ValueError, match="unknown option 'fast'"):
        train_speed.parse_variants("fp32,fast")
    with pytest.raises(ValueError, match="both bf16 and fp16"):
        train_speed.parse_variants("bf16+fp16")
    assert train_speed.parse_data_modes("loader_only, memory") == ("loader_only", "memory")
    with pytest.raises(ValueError, match="--data must be a comma-separated list of memory, loader, loader_only"):
        train_speed.parse_data_modes("disk")

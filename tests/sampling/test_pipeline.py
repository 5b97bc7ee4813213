"""Tests for guided_diffusion.sampling.pipeline: flags against the checkpoint, and segmentation_sample.py end to end."""
import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion.sampling import pipeline
from guided_diffusion.sampling.samplers import SamplerSpec, sample_ensemble


def test_seed_fast_command_means_dpm_solver_pp_on_trained_schedule():
    cfg = pipeline.SampleConfig(dpm_solver=True)
    spec = pipeline.resolve_spec(cfg, 50, 1000)
    assert (spec.sampler, spec.steps, spec.order, spec.method) == ("dpm_solver++", 50, 2, "multistep")
    assert pipeline.resolve_spec(pipeline.SampleConfig(), 1000, 1000).sampler == "ddpm"
    assert pipeline.resolve_spec(pipeline.SampleConfig(), None, 1000).steps == 1000
    ckpt = {"path": "m.pt", "config": {"model": {"image_size": 64}, "diffusion": {"diffusion_steps": 1000}}}
    pipeline.check_flags_against_checkpoint({"diffusion_steps": 50, "image_size": 64}, ckpt, dpm_solver=True)
    with pytest.raises(ValueError, match="--diffusion_steps 50 contradicts"):
        pipeline.check_flags_against_checkpoint({"diffusion_steps": 50}, ckpt, dpm_solver=False)
    with pytest.raises(ValueError, match="--image_size 256 contradicts"):
        pipeline.check_flags_against_checkpoint({"image_size": 256}, ckpt, dpm_solver=True)


# ----- end to end through the scripts, on a tiny trained checkpoint (conftest's `trained`) -----------------
def read(p):
    return np.array(Image.open(p))


@pytest.mark.slow
def test_sample_script_writes_the_contract_and_resumes(trained, script):
    out = trained / "pred"
    common = ["--model_path", trained / "run", "--out_dir", out, "--num_ensemble", 3, "--batch_size", 2,
              "--num_workers", 0, "--device", "cpu", "--max_images", 3]
    r = script("segmentation_sample.py", *common, "--sampler", "dpm_solver++", "--steps", 4, "--save_overlays",
               "True", "--fusion", "staple")
    assert r.returncode == 0, r.stderr
    import csv
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 3 and {"id", "sampler", "steps", "nfe", "seconds"} <= set(rows[0])
    assert rows[0]["nfe"] == "5" and rows[0]["sampler"] == "dpm_solver++"
    from guided_diffusion.data.datasets import list_pairs, load_image
    pairs = {p.id: p for p in list_pairs("SYNTHETIC", trained / "data", "test", split_file=out / "split.json")}
    for row in rows:
        mask = read(out / f"{row['id']}.png")
        w, h = load_image(pairs[row["id"]].image).size
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        for sub in ("prob", "uncertainty", "overlays"):
            assert (out / sub / f"{row['id']}.png").is_file()
    # test images are exactly the training run's test split
    import json
    split = json.load(open(trained / "run" / "split.json"))
    assert {r["id"] for r in rows} <= set(split["test"])
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    r = script("segmentation_sample.py", *common, "--sampler", "dpm_solver++", "--steps", 4,
               "--save_overlays", "True", "--fusion", "staple")
    assert r.returncode == 0 and "3 of 3 images already" in r.stdout
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    # other settings into the same folder: one line, exit 2, nothing touched
    r = script("segmentation_sample.py", *common, "--sampler", "dpm_solver++", "--steps", 4, "--save_overlays", "True")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "with --fusion staple; this run: --fusion mean; use --overwrite True" in r.stderr
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    # the evaluation script accepts the folder as it is
    r = script("segmentation_env.py", "--inp_pth", out, "--data_name", "SYNTHETIC", "--data_dir", trained / "data",
               "--allow_missing")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_sample_script_is_reproducible_with_seed(trained, script):
    outs = []
    for k in range(2):
        out = trained / f"rep{k}"
        r = script("segmentation_sample.py", "--model_path", trained / "run", "--out_dir", out, "--sampler", "ddpm",
                   "--steps", 5, "--num_ensemble", 2, "--max_images", 2, "--batch_size", 2 - k, "--seed", 7,
                   "--num_workers", 0, "--device", "cpu")
        assert r.returncode == 0, r.stderr
        outs.append({p.name: read(p) for p in sorted((out / "prob").glob("*.png"))})
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) == 2
    for name in outs[0]:  # batch size 2 vs 1: same pixels
        assert np.abs(outs[0][name].astype(int) - outs[1][name]).max() <= 1


@pytest.mark.slow
def test_channels_last_sampling_with_warmup_gives_the_same_masks(trained, script):
    common = ["--model_path", trained / "run", "--sampler", "sde-dpm_solver++", "--steps", 3, "--num_ensemble", 2,
              "--max_images", 3, "--batch_size", 2, "--num_workers", 0, "--device", "cpu", "--seed", 3]
    r = script("segmentation_sample.py", *common, "--out_dir", trained / "eager")
    assert r.returncode == 0, r.stderr
    r = script("segmentation_sample.py", *common, "--out_dir", trained / "fast", "--channels_last", "True",
               "--warmup", 1)
    assert r.returncode == 0, r.stderr
    for sub in ("prob", "uncertainty"):
        eager = {p.name: read(p).astype(int) for p in sorted((trained / "eager" / sub).glob("*.png"))}
        fast = {p.name: read(p).astype(int) for p in sorted((trained / "fast" / sub).glob("*.png"))}
        assert eager.keys() == fast.keys() and len(eager) == 3
        for name in eager:  # the warm-up draws from fresh per-image generators: the timed noise is unchanged
            assert np.abs(eager[name] - fast[name]).max() <= 1, (sub, name)


@pytest.mark.slow
def test_compile_wraps_the_denoising_forward(trained, eager_compile):
    """--compile hands the network's forward to torch.compile and the compiled model samples what the eager one
    does, with no graph breaks in the denoising step."""
    calls, counters = eager_compile
    ckpt = next((trained / "run").glob("model_*.pt"))
    eager = pipeline.load_model(str(ckpt), torch.device("cpu"))
    compiled = pipeline.load_model(str(ckpt), torch.device("cpu"), compile=True, channels_last=True)
    assert len(calls) == 1 and calls[0].__name__ == "forward"
    images = torch.rand(2, 3, 16, 16)
    spec = SamplerSpec("dpm_solver++", 3)
    a = sample_ensemble(eager.model, eager.diffusion, images, 2, spec, seeds=[1, 2]).members
    b = sample_ensemble(compiled.model, compiled.diffusion, images, 2, spec, seeds=[1, 2]).members
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow
def test_sample_script_bad_inputs_are_one_line_errors(trained, tmp_path, script):
    r = script("segmentation_sample.py", "--model_path", tmp_path / "missing.pt", "--out_dir", tmp_path / "o")
    assert r.returncode == 2 and "missing.pt" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = script("segmentation_sample.py", "--model_path", bad, "--out_dir", tmp_path / "o")
    assert r.returncode == 2 and "bad.pt" in r.stderr
    r = script("segmentation_sample.py", "--model_path", trained / "run", "--out_dir", tmp_path / "o",
               "--num_channels", 64, "--device", "cpu")
    assert r.returncode == 2 and "--num_channels 64 contradicts" in r.stderr
    r = script("segmentation_sample.py", "--model_path", trained / "run", "--out_dir", tmp_path / "o",
               "--fusion", "max", "--device", "cpu")
    assert r.returncode == 2 and "--fusion" in r.stderr


# ----- the prediction folder: one set of settings, resume, --overwrite, lock, clean-up (issue #14) -------------
# In-process runs on conftest's `runs` (a 16 px, 40-step diffusion model trained a few steps): 2 DDIM steps.
def sample(model, out, **kw):
    """pipeline.run_sampling with tiny settings (kw overrides them)."""
    flags = dict(model_path=str(model), out_dir=str(out), sampler="ddim", steps=2, num_ensemble=1, batch_size=2,
                 max_images=2, num_workers=0, device="cpu")
    return pipeline.run_sampling(pipeline.SampleConfig(**{**flags, **kw}), {}, torch.device("cpu"))


def snapshot(folder):
    """Every file under a folder with its bytes and modification time (but the lock, which each run takes)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def manifest_ids(out):
    import csv
    with open(out / "manifest.csv", newline="") as fh:
        return [row["id"] for row in csv.DictReader(fh)]


def other_checkpoint(model_dir, folder, step=3):
    """A copy of the run's checkpoint under another step, with other weights (another model to the folder)."""
    from guided_diffusion.checkpoint import find_latest
    from guided_diffusion.layout import checkpoint_name
    ckpt = torch.load(find_latest(model_dir), map_location="cpu", weights_only=True)
    key = next(iter(ckpt["ema"]))
    ckpt["ema"][key] = ckpt["ema"][key] + 0.5
    ckpt["step"] = step
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, folder / checkpoint_name(step))
    return folder / checkpoint_name(step)


def test_a_rerun_with_other_settings_stops_before_writing_and_overwrite_starts_afresh(runs, tmp_path, capsys):
    out = tmp_path / "pred"
    assert sample(runs / "diff", out).images == 2
    err = capsys.readouterr()
    assert "model: " in err.out and "model_0000002.pt (step 2, EMA weights)" in err.out  # the checkpoint, said first
    assert "sample ddim-2: 2/2 img" in err.err  # plain progress lines off a terminal
    assert (out / "sampling.json").is_file()
    before = snapshot(out)
    cases = [({"steps": 3}, "holds masks of model_0000002.pt with --steps 2; this run: --steps 3; use --overwrite "
                            "True to replace them, or another --out_dir"),
             ({"seed": 1}, "with --seed 0; this run: --seed 1;"),
             ({"num_ensemble": 2}, "with --num_ensemble 1; this run: --num_ensemble 2;"),
             ({"views": 2}, "with --views 1; this run: --views 2;"),
             ({"sampler": "dpm_solver++"}, "with --sampler ddim; this run: --sampler dpm_solver++"),
             ({"model_path": other_checkpoint(runs / "diff", tmp_path / "other")},
              "holds masks of model_0000002.pt; this run: model_0000003.pt; use --overwrite True")]
    for change, message in cases:
        with pytest.raises(ValueError) as exc:
            sample(runs / "diff", out, **change)
        assert message in str(exc.value) and "\n" not in str(exc.value), (change, str(exc.value))
        assert snapshot(out) == before, change  # nothing written, nothing removed
    # the same settings continue (a copy of the same checkpoint elsewhere is the same model); other --max_images,
    # --batch_size or --num_workers do not change a mask
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(runs / "diff", copy)
    summary = sample(copy, out, max_images=3, batch_size=1)
    assert (summary.images, summary.skipped) == (1, 2)
    assert "2 of 3 images already in" in capsys.readouterr().out
    # --overwrite True: the old masks, maps, manifest, settings and reports go; the new run's settings are recorded
    (out / "eval").mkdir()
    (out / "eval" / "evaluation.csv").write_text("old")
    (out / "evaluation.json").write_text("{}")
    summary = sample(runs / "diff", out, steps=3, max_images=2, overwrite=True)
    assert (summary.images, summary.skipped) == (2, 0)
    assert not (out / "eval").exists() and not (out / "evaluation.json").exists()
    assert len(list(out.glob("*.png"))) == 2 and sorted(manifest_ids(out)) == sorted(p.stem for p in out.glob("*.png"))
    import json
    assert json.loads((out / "sampling.json").read_text())["settings"]["steps"] == 3
    assert sample(runs / "diff", out, steps=3).skipped == 2


def test_views_are_recorded_and_their_disagreement_is_the_uncertainty_map(runs, tmp_path):
    import csv
    import json
    one, two = tmp_path / "one", tmp_path / "two"
    sample(runs / "diff", one)  # one deterministic member: nothing to disagree
    sample(runs / "diff", two, views=2)
    assert json.loads((two / "sampling.json").read_text())["settings"]["views"] == 2
    assert "views" not in json.loads((one / "sampling.json").read_text())["settings"]  # as before --views existed
    rows = list(csv.DictReader(open(two / "manifest.csv")))
    assert [r["views"] for r in rows] == ["2", "2"] and rows[0]["num_ensemble"] == "1"
    ids = [r["id"] for r in rows]
    assert all(read(one / "uncertainty" / f"{i}.png").max() == 0 for i in ids)
    assert any(read(two / "uncertainty" / f"{i}.png").max() > 0 for i in ids)  # the mirrored copy disagrees
    with pytest.raises(ValueError, match=r"^--views must be one of 1, 2, 4, got 3$"):
        sample(runs / "diff", tmp_path / "three", views=3)
    assert not (tmp_path / "three").exists()  # refused before anything was written


def test_masks_without_recorded_settings_are_not_mixed_or_deleted(runs, tmp_path):
    out = tmp_path / "photos"  # not a prediction folder: the user's own images
    out.mkdir()
    (out / "synth_0000.png").write_bytes(b"a user's file")
    with pytest.raises(ValueError, match="holds 1 image files but no sampling.json"):
        sample(runs / "diff", out)
    with pytest.raises(ValueError, match="is not a prediction folder .* --overwrite True removes only"):
        sample(runs / "diff", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["synth_0000.png"]


def test_a_killed_run_resumes_with_one_manifest_row_per_mask(runs, tmp_path):
    out = tmp_path / "pred"
    sample(runs / "diff", out, max_images=3)
    rows = (out / "manifest.csv").read_text().splitlines()
    assert len(rows) == 4
    # killed: the last mask's row never reached the disk, and another row was cut short mid-write
    (out / "manifest.csv").write_text("\n".join(rows[:2]) + "\n" + rows[2][:5])
    lost = {rows[2].split(",")[0], rows[3].split(",")[0]}
    summary = sample(runs / "diff", out, max_images=3)
    assert (summary.images, summary.skipped) == (2, 1)  # the masks whose rows were lost are sampled again
    ids = manifest_ids(out)
    assert sorted(ids) == sorted(p.stem for p in out.glob("*.png")) and len(ids) == len(set(ids)) == 3
    assert lost <= set(ids)


def test_a_second_run_into_a_folder_being_written_stops(runs, tmp_path):
    from guided_diffusion import fileio
    out = tmp_path / "pred"
    with fileio.OutDirLock(out, "--out_dir"):
        with pytest.raises(ValueError, match=r"--out_dir .*pred is being written by another run \(pid \d+\)"):
            sample(runs / "diff", out)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the running one's lock only
    # temporary files a killed writer left are removed once the folder is ours
    stale = [out / ".tmp-abcdefghijklmnop.part", out / "prob" / ".tmp-ponmlkjihgfedcba.part"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a png")
    sample(runs / "diff", out)
    assert not any(path.exists() for path in stale)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_failure_before_any_mask_leaves_no_files_and_names_the_bad_image(runs, tmp_path, num_workers):
    import shutil
    from guided_diffusion.data import datasets
    data = tmp_path / "data"
    shutil.copytree(runs / "data", data)
    split = datasets.load_split(runs / "diff" / "split.json")
    first = sorted(datasets.list_pairs("SYNTHETIC", data, "test", split_file=runs / "diff" / "split.json"),
                   key=lambda p: split["test"].index(p.id))[0]
    first.image.write_bytes(b"\x89PNG cut short")  # the first image to sample is unreadable
    new = tmp_path / "new" / "pred"
    with pytest.raises(ValueError) as exc:
        sample(runs / "diff", new, data_dir=str(data), num_workers=num_workers)
    # the error names the file (from a loader worker, on the message's last line, which run_cli shows)
    assert str(first.image) in str(exc.value).strip().splitlines()[-1]
    assert not new.exists() and (tmp_path / "new").is_dir()  # the folder the run made is gone, its parent stays
    mine = tmp_path / "mine"  # a folder of the user's: their file stays, the run's files go
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ValueError):
        sample(runs / "diff", mine, data_dir=str(data), num_workers=num_workers)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_max_images_below_zero_is_an_error():
    with pytest.raises(ValueError, match=r"^--max_images must be >= 0 \(0: all\), got -1$"):
        pipeline._validate(pipeline.SampleConfig(model_path="m.pt", max_images=-1))


def test_help_shows_each_default_once(load_script):
    parser = load_script("segmentation_sample.py").build_parser()
    text = parser.format_help()
    assert "(default: )" not in text
    for action in parser._actions:
        if action.help and action.dest in pipeline.SampleConfig.__dataclass_fields__:
            assert action.help.count("default") <= 1 and "(default: )" not in action.help, action.help
    assert "--overwrite True|False" in text and "(default: runs/samples)" in text

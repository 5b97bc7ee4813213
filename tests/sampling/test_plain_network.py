"""The pipeline on a pre-segmentation checkpoint: the plain-UNet baseline's masks in the prediction layout."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion.sampling import pipeline


def test_a_preseg_checkpoint_samples_its_one_pass_masks(runs, tmp_path):
    out = tmp_path / "unet"
    cfg = pipeline.SampleConfig(model_path=str(runs / "preseg"), out_dir=str(out), num_ensemble=3, max_images=3,
                                num_workers=0, device="cpu")
    summary = pipeline.run_sampling(cfg, {}, torch.device("cpu"))
    assert (summary.sampler, summary.steps, summary.nfe, summary.images) == ("preseg", 1, 1, 3)
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert [r["sampler"] for r in rows] == ["preseg"] * 3 and all(r["nfe"] == "1" for r in rows)
    lm = pipeline.load_model(str(runs / "preseg"), torch.device("cpu"))
    for r in rows:  # the mask is the network's own sigmoid > 0.5, and the members agree (no uncertainty)
        unc = np.asarray(Image.open(out / "uncertainty" / f"{r['id']}.png"))
        assert unc.max() == 0
        mask = np.asarray(Image.open(out / f"{r['id']}.png"))
        prob = np.asarray(Image.open(out / "prob" / f"{r['id']}.png"))
        assert set(np.unique(mask)) <= {0, 255} and np.array_equal(mask == 255, prob > 127)
    assert lm.diffusion is None and lm.model_cfg.image_size == 16


@pytest.mark.parametrize("flags,needle", [({"sampler": "ddim"}, "--sampler: --model_path"),
                                          ({"dpm_solver": True}, "--dpm_solver: --model_path"),
                                          ({"pre_t": 3}, "--pre_t belong to --sampler addpm")])
def test_sampler_flags_on_a_preseg_checkpoint_are_one_line_errors(runs, tmp_path, flags, needle):
    cfg = pipeline.SampleConfig(model_path=str(runs / "preseg"), out_dir=str(tmp_path / "o"), num_workers=0,
                                device="cpu", **flags)
    with pytest.raises(ValueError, match=needle):
        pipeline.run_sampling(cfg, {}, torch.device("cpu"))

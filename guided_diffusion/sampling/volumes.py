"""Sampling BRATS/NIFTI volumes slice by slice: the prediction folder holds one NIfTI file per case.

Layout under out_dir (the 2-D folder's, with volumes for images):
    <case>.nii.gz              binary mask, uint8 0/1, with the source image's affine, header and voxel sizes
    prob/<case>.nii.gz         fused foreground probability, float32 in [0, 1]
    uncertainty/<case>.nii.gz  the ensemble's uncertainty, float32 in [0, 1]
    manifest.csv               one row per case: id, sampler, steps, nfe, seconds, slices, sampled_slices, ...
    sampling.json, split.json  as for images (split.json lists case ids)

Each case is read and normalised as in training (data/volumes.py), cut into its slices along the checkpoint's
slice axis, and its slices sampled in batches of --batch_size (each slice with all its ensemble members), every
slice with its own seed from (--seed, case, slice), so results do not depend on batching or sharding. Slices whose
channels are all zero (outside the head) are not sampled: their probability is 0. The slices' probability and
uncertainty are resized back to the slice's own size (bilinearly, as the 2-D images) and stacked into the volume;
the mask is probability > 0.5. Under torchrun the cases are sharded (pipeline.prepare), never the slices of a case.
"""
from __future__ import annotations

import numpy as np
import torch

from guided_diffusion import distributed
from guided_diffusion.data import volumes
from guided_diffusion.fileio import atomic_write
from guided_diffusion.layout import OVERLAY_DIR, PROB_DIR, UNCERTAINTY_DIR
from guided_diffusion.progress import progress
from guided_diffusion.sampling.outputs import PredictionWriter, _check_id, resize_probs
from guided_diffusion.sampling.samplers import image_seed

SUFFIX = ".nii.gz"


class VolumeWriter(PredictionWriter):
    """PredictionWriter for volumes: the same manifest, resume and locking, with NIfTI files instead of PNGs."""

    def _paths(self, id: str) -> dict:
        name = f"{_check_id(id)}{SUFFIX}"
        return {"mask": self.out_dir / name, "prob": self.out_dir / PROB_DIR / name,
                "uncertainty": self.out_dir / UNCERTAINTY_DIR / name, "overlay": self.out_dir / OVERLAY_DIR / name}

    def write_volume(self, id: str, prob: np.ndarray, unc: np.ndarray, source, record: dict | None = None) -> None:
        """Write prob and uncertainty (float32), then the mask (uint8, prob > 0.5) last; record the row."""
        paths = self._paths(id)
        row = self._make_row(id, record)
        prob = np.clip(np.nan_to_num(np.asarray(prob, dtype=np.float32)), 0.0, 1.0)
        unc = np.clip(np.nan_to_num(np.asarray(unc, dtype=np.float32)), 0.0, 1.0)
        atomic_write(paths["prob"], volumes.nifti_bytes(prob, source, paths["prob"]))
        atomic_write(paths["uncertainty"], volumes.nifti_bytes(unc, source, paths["uncertainty"]))
        atomic_write(paths["mask"], volumes.nifti_bytes((prob > 0.5).astype(np.uint8), source, paths["mask"]))
        self.written += 1
        self._rows[id] = row
        self._append(row)


def run(job):
    """pipeline.run for BRATS/NIFTI checkpoints: sample every case of this rank's share still to do."""
    from guided_diffusion.sampling.pipeline import SamplingSummary, sample_batch

    cfg, lm, strategy, device, spec = job.cfg, job.lm, job.strategy, job.device, job.volume
    size = lm.model_cfg.image_size
    record_base, warmup = job.record_base(), job.warmup_runs()
    total_s, nfe, nfe_parts, slices_done = 0.0, 0, {}, 0
    main = job.rank == 0
    if main and len(job.todo) < len(job.pairs):
        print(f"{len(job.pairs) - len(job.todo)} of {len(job.pairs)} cases already in {cfg.out_dir} with these "
              f"settings: skipped (--overwrite True to sample afresh)", flush=True)
    bar = progress(total=len(job.todo), desc=f"sample {strategy.label}-{strategy.steps}", unit="case", disable=not main)
    failed = True
    try:
        for index in job.todo:
            case = job.pairs[index]
            volume = volumes.load_case(case, spec, with_mask=False)
            images, _ = volumes.slice_tensors(volume, spec.slice_axis, size)
            if images.shape[1] != lm.model.image_channels:
                raise ValueError(f"{case.id}: {images.shape[1]} channels but the checkpoint's model expects "
                                 f"{lm.model.image_channels}")
            inside = torch.nonzero(images.flatten(1).abs().amax(1) > 0).flatten().tolist()
            prob = torch.zeros(images.shape[0], size, size)
            unc = torch.zeros(images.shape[0], size, size)
            seconds = 0.0
            for start in range(0, len(inside), cfg.batch_size):
                chosen = inside[start:start + cfg.batch_size]
                batch = images[chosen].to(device)
                seeds = [image_seed(cfg.seed, f"{case.id}@{s}") for s in chosen]
                result, fused, spread, took = sample_batch(job, batch, seeds, warmup)
                warmup = 0
                seconds += took
                nfe, nfe_parts = result.nfe, result.nfe_parts
                prob[chosen], unc[chosen] = fused.float().cpu(), spread.float().cpu()
            orig = tuple(volumes.to_slices(volume.image[0], spec.slice_axis).shape[1:])
            prob_vol = volumes.from_slices(resize_probs(prob, orig).numpy(), spec.slice_axis)
            unc_vol = volumes.from_slices(resize_probs(unc, orig).numpy(), spec.slice_axis)
            job.writer.write_volume(case.id, prob_vol, unc_vol, volume.source,
                                    record={**record_base, "id": case.id, "nfe": nfe,
                                            **{f"nfe_{part}": n for part, n in nfe_parts.items()},
                                            "seconds": round(seconds, 4), "slices": int(images.shape[0]),
                                            "sampled_slices": len(inside),
                                            "seconds_per_slice": round(seconds / max(len(inside), 1), 4)})
            total_s += seconds
            slices_done += len(inside)
            bar.update(1)
        failed = False
    finally:
        bar.close()
        job.finish(failed)
    done, skipped, total_s, slices_done = distributed.all_reduce_sum(
        [len(job.todo), len(job.pairs) - len(job.todo), total_s, slices_done], device)
    return SamplingSummary(strategy.label, strategy.steps, cfg.num_ensemble, int(done), int(skipped), total_s,
                           nfe, nfe_parts, strategy.record(), str(cfg.out_dir), unit="cases",
                           slices=int(slices_done))

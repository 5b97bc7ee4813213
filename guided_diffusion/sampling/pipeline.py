"""The sampling pipeline: sample the masks of a data split with a trained checkpoint, fuse each ensemble, write
the prediction folder. Three stages: `prepare` (flags, model, strategy, split, the images still to do), `run`
(sample, fuse, write; a typed SamplingSummary), and `run_sampling`, both in one call.

The checkpoint is the single source of the model, the diffusion schedule, the data set and its split;
sampling flags that contradict it are an error. A strategy (samplers.Strategy) turns images into ensemble
members: a plain sampler from pure noise (samplers.FromNoise) or ADDPM's truncated process (addpm.AddpmSampler).
The folder's layout is the README's "Sample" section (layout.py, outputs.PredictionWriter).

One folder holds the masks of one set of settings (sampling.json: the model's weights, the sampler and every flag
that changes a mask): a rerun with the same settings continues where the last one stopped, a run with other
settings stops before writing anything, and `--overwrite True` clears the folder first. Rank 0 holds the folder's
lock (fileio.OutDirLock) for the whole run, and a run that fails before writing any mask removes what it created.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from guided_diffusion.sampling import addpm
from guided_diffusion.data import datasets, volumes
from guided_diffusion import distributed, fileio
from guided_diffusion.progress import progress
from guided_diffusion.checkpoint import (DESCRIBE, DIFFUSION, TRAIN_SCRIPT, CheckpointError, check_flags,
                                         checkpoint_kind, load_checkpoint)
from guided_diffusion.network.aux_nets import PRESEG, AuxNetConfig, aux_from_checkpoint
from guided_diffusion.layout import SAMPLING_SETTINGS, SPLIT_FILE
from guided_diffusion.sampling.ensemble import FUSIONS, UNCERTAINTIES, fuse, uncertainty
from guided_diffusion.diffusion.gaussian_diffusion import GaussianDiffusion
from guided_diffusion.sampling import outputs
from guided_diffusion.sampling.outputs import PredictionWriter
from guided_diffusion.sampling import volumes as sample_volumes
from guided_diffusion.sampling.volumes import VolumeWriter
from guided_diffusion.sampling.samplers import (SAMPLERS, SOLVER_ALGORITHMS, FromNoise, OnePass, SamplerSpec, Strategy,
                                                check_views, image_seed, sample_views)
from guided_diffusion.config import (DataConfig, DiffusionConfig, ModelConfig, create_gaussian_diffusion, create_model,
                                     from_dict)

VOLUME_SETTINGS = ("modalities", "labels", "slice_axis", "norm_percentiles")  # a volume model's data settings


@dataclass
class SampleConfig:
    """Flags of segmentation_sample.py that are not model or diffusion settings."""
    model_path: str = field(default="", metadata={"help": "checkpoint file, or a run folder (its latest); required"})
    out_dir: str = field(default="runs/samples", metadata={"help": "prediction folder"})
    data_name: str = field(default="", metadata={"help": "data set (default: the checkpoint's)"})
    data_dir: str = field(default="", metadata={"help": "data root (default: the checkpoint's)"})
    split: str = field(default="test", metadata={"help": "train, val, test or all (the training run's split)"})
    sampler: str = field(default="", metadata={"help": "ddpm, ddim, dpm_solver, dpm_solver++, sde-dpm_solver++ "
                                                       "(stochastic DPM-Solver++) or addpm (default: ddpm, or "
                                                       "dpm_solver++ with --dpm_solver True)"})
    steps: int = field(default=0, metadata={"help": "sampling steps (default: all T for ddpm, 50 for ddim, "
                                                    "20 for the solvers; for addpm, of its chain, at most "
                                                    "pre_t - stop_t)"})
    dpm_solver: bool = field(default=False, metadata={"help": "seed flag: DPM-Solver++ (multistep, order 2); "
                                                              "--diffusion_steps then gives the step count"})
    order: int = field(default=2, metadata={"help": "DPM-Solver order (1, 2, 3; sde-dpm_solver++: 1, 2)"})
    skip_type: str = field(default="time_uniform", metadata={"help": "time_uniform, logSNR or time_quadratic"})
    method: str = field(default="multistep", metadata={"help": "multistep, singlestep or singlestep_fixed"})
    eta: float = field(default=0.0, metadata={"help": "DDIM noise (default 0: deterministic)"})
    td: float = field(default=0.0, metadata={"help": "DDIM's asymmetric time difference in steps (Pix2Seq-D's td; "
                                                     "default 0: off)"})
    pre_t: int = field(default=0, metadata={"help": "addpm: the chain starts at x_{pre_t}, the pre-segmentation "
                                                    "noised to level pre_t (DDPM's 1-based t in 1..T; "
                                                    "default 0: 3T/10, the seed's 300 of 1000)"})
    stop_t: int = field(default=-1, metadata={"help": "addpm: the chain stops at x_{stop_t}, 0 <= stop_t < pre_t, "
                                                      "and the denoiser finishes (0: down to x_0, no denoiser; "
                                                      "default -1: T/4, the seed's 250 of 1000)"})
    addpm_inner: str = field(default="", metadata={"help": "addpm: the chain's sampler, ddpm, ddim, dpm_solver, "
                                                           "dpm_solver++ or sde-dpm_solver++ (default: ddpm, or "
                                                           "dpm_solver++ with --dpm_solver True)"})
    preseg: str = field(default="", metadata={"help": "addpm: head (the diffusion model's image-encoder head) or "
                                                      "a train_preseg_network.py checkpoint"})
    preseg_path: str = field(default="", metadata={"help": "addpm: pre-segmentation network checkpoint (file or run "
                                                           "folder); the same as --preseg PATH"})
    preseg_soft: bool = field(default=False, metadata={"help": "addpm: start from 2p - 1 of the pre-segmentation "
                                                               "probability instead of its thresholded mask"})
    denoiser_path: str = field(default="", metadata={"help": "addpm: denoising network checkpoint "
                                                             "(train_denoising_network.py); needed when --stop_t > 0"})
    num_ensemble: int = field(default=5, metadata={"help": "masks sampled per image (per view with --views)"})
    views: int = field(default=1, metadata={"help": "mirrored copies of each image sampled, each with all "
                                                    "--num_ensemble members, fused together (test-time mirroring): "
                                                    "1 the image only, 2 also left-right, 4 also up-down and both"})
    batch_size: int = field(default=4, metadata={"help": "images per batch (each with all its members)"})
    fusion: str = field(default="mean", metadata={"help": "mean, vote or staple"})
    uncertainty: str = field(default="std", metadata={"help": "std or entropy"})
    save_overlays: bool = field(default=False, metadata={"help": "also write overlays/<id>.png"})
    overwrite: bool = field(default=False, metadata={"help": "remove the earlier outputs in --out_dir (masks, prob/, "
                                                           "uncertainty/, overlays/, manifest, settings, eval/) and "
                                                           "sample afresh; without it a rerun with the same settings "
                                                           "continues where the last one stopped, and one with other "
                                                           "settings stops"})
    max_images: int = field(default=0, metadata={"help": "sample only the first N images of the split "
                                                         "(default 0: all)"})
    seed: int = field(default=0, metadata={"help": "random seed (per image, so results do not depend on batching)"})
    use_ema: bool = field(default=True, metadata={"help": "sample with the EMA weights"})
    amp: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA), none or bf16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the network (the first batch compiles)"})
    channels_last: bool = field(default=False, metadata={"help": "NHWC memory layout for the convolutions"})
    warmup: int = field(default=-1, metadata={"help": "batches sampled once untimed before the first timed one "
                                                      "(default -1: 1 on CUDA, 0 elsewhere); masks are unchanged"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    num_workers: int = field(default=2, metadata={"help": "data-loading workers"})


@dataclass
class LoadedModel:
    """A model ready to sample, with the diffusion and data settings it was trained with (a pre-segmentation
    network, the plain-UNet baseline, has no diffusion)."""
    model: torch.nn.Module
    diffusion: GaussianDiffusion | None
    model_cfg: ModelConfig | AuxNetConfig
    diffusion_cfg: DiffusionConfig | None
    ckpt: dict


def load_model(model_path: str, device: torch.device, use_ema: bool = True, compile: bool = False,
               channels_last: bool = False) -> LoadedModel:
    """Build the network from the checkpoint's config and load its (EMA) weights; optionally NHWC and compiled
    (the compiled forward is the denoising step; the image encoder runs once per image and stays eager).
    A diffusion model, or a pre-segmentation network (train_preseg_network.py: the plain-UNet baseline, whose
    masks the pipeline writes in the same layout)."""
    ckpt = load_checkpoint(model_path, "--model_path")
    kind = checkpoint_kind(ckpt)
    if kind == PRESEG:
        aux = aux_from_checkpoint(ckpt, device, use_ema)
        lm = LoadedModel(aux.net, None, aux.cfg, None, ckpt)
    elif kind == DIFFUSION:
        mc = from_dict(ModelConfig, ckpt["config"]["model"])
        dc = from_dict(DiffusionConfig, ckpt["config"]["diffusion"])
        model = create_model(mc, dc)
        model.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
        lm = LoadedModel(model.to(device).eval(), create_gaussian_diffusion(dc), mc, dc, ckpt)
    else:
        raise CheckpointError(f"--model_path {ckpt['path']} is a {DESCRIBE[kind]} checkpoint, not a diffusion model or "
                              f"pre-segmentation network one (train that with {TRAIN_SCRIPT[DIFFUSION]})")
    if channels_last:
        lm.model.to(memory_format=torch.channels_last)
    if compile:
        lm.model.forward = torch.compile(lm.model.forward)
    return lm


def check_flags_against_checkpoint(given: dict, ckpt: dict, dpm_solver: bool) -> None:
    """Model/diffusion flags the user gave must equal the checkpoint's (the seed passes them all)."""
    # the seed's `--dpm_solver True --diffusion_steps 50` means 50 solver steps on the trained schedule
    config = ckpt["config"]
    saved = {**config["model"], **config["diffusion"]} if "diffusion" in config else config["net"]
    check_flags(given, saved, f"the checkpoint {ckpt['path']}",
                hint=lambda key: "the number of sampling steps is --steps" if key == "diffusion_steps" else "",
                skip=("diffusion_steps",) if dpm_solver else ())


def resolve_spec(cfg: SampleConfig, diffusion_steps_flag: int | None, num_timesteps: int) -> SamplerSpec:
    """The sampler to run, from --sampler/--steps and the seed's --dpm_solver/--diffusion_steps; for addpm, the
    chain from x_{pre_t} down to x_{stop_t}."""
    _check_sampler_flags(cfg)
    truncated = cfg.sampler == addpm.ADDPM
    default = "dpm_solver++" if cfg.dpm_solver else "ddpm"
    sampler = (cfg.addpm_inner or default) if truncated else (cfg.sampler or default)
    start, end = addpm_levels(cfg, num_timesteps) if truncated else (num_timesteps, 0)
    steps = cfg.steps
    if not steps:
        if cfg.dpm_solver and diffusion_steps_flag:
            steps = diffusion_steps_flag
        else:
            span = start - end
            steps = {"ddpm": span, "ddim": min(50, span)}.get(sampler, min(20, span))
    spec = SamplerSpec(sampler=sampler, steps=steps, order=cfg.order, skip_type=cfg.skip_type,
                       method=cfg.method, eta=cfg.eta, td=cfg.td, t_start=start if truncated else None, t_end=end)
    spec.validate(num_timesteps)
    return spec


def addpm_levels(cfg: SampleConfig, num_timesteps: int) -> tuple[int, int]:
    """(pre_t, stop_t), defaults 3T/10 and T/4 (the seed's 300 and 250 of T = 1000)."""
    pre_t = cfg.pre_t or max(1, round(0.3 * num_timesteps))
    stop_t = cfg.stop_t if cfg.stop_t >= 0 else round(0.25 * num_timesteps)
    return pre_t, stop_t


def _check_sampler_flags(cfg: SampleConfig) -> None:
    """--sampler is known; ADDPM's flags go with --sampler addpm only."""
    choices = (*SAMPLERS, addpm.ADDPM)
    if cfg.sampler and cfg.sampler not in choices:
        raise ValueError(f"--sampler must be one of {', '.join(choices)}, got {cfg.sampler!r}")
    if cfg.sampler == addpm.ADDPM:
        if cfg.addpm_inner and cfg.addpm_inner not in SAMPLERS:
            raise ValueError(f"--addpm_inner must be one of {', '.join(SAMPLERS)}, got {cfg.addpm_inner!r}")
        return
    given = [f"--{k}" for k, unset in (("pre_t", 0), ("stop_t", -1), ("addpm_inner", ""), ("preseg", ""),
                                       ("preseg_path", ""), ("denoiser_path", ""), ("preseg_soft", False))
             if getattr(cfg, k) != unset]
    if given:
        raise ValueError(f"{', '.join(given)} belong to --sampler addpm")


def preseg_source(cfg: SampleConfig) -> str:
    """ADDPM's pre-segmentation: 'head' or a checkpoint path, from --preseg / --preseg_path (which must agree)."""
    if cfg.preseg and cfg.preseg_path and cfg.preseg != cfg.preseg_path:
        raise ValueError(f"--preseg {cfg.preseg} and --preseg_path {cfg.preseg_path} disagree; give one of them")
    return cfg.preseg or cfg.preseg_path


def build_strategy(cfg: SampleConfig, lm: LoadedModel, model_flags: dict, device: torch.device) -> Strategy:
    """The sampling strategy the flags ask for: a plain sampler from pure noise, or ADDPM's truncated process; for a
    pre-segmentation network, its one pass."""
    _check_sampler_flags(cfg)
    if lm.diffusion is None:
        given = [f"--{k}" for k in ("sampler", "steps", "dpm_solver") if getattr(cfg, k)]
        if given:
            raise ValueError(f"{', '.join(given)}: --model_path {lm.ckpt['path']} is a pre-segmentation network, "
                             f"whose masks come from one pass; sampler flags need a diffusion model")
        return OnePass()
    spec = resolve_spec(cfg, model_flags.get("diffusion_steps"), lm.diffusion.num_timesteps)
    if cfg.sampler == addpm.ADDPM:
        return addpm.load_addpm(spec, lm.diffusion_cfg, lm.model_cfg.image_size, preseg_source(cfg),
                                cfg.denoiser_path, device, cfg.use_ema, cfg.preseg_soft)
    return FromNoise(spec)


def _validate(cfg: SampleConfig) -> None:
    if not cfg.model_path:
        raise ValueError("--model_path is required (a checkpoint file or a training run folder)")
    if cfg.num_ensemble < 1 or cfg.batch_size < 1:
        raise ValueError("--num_ensemble and --batch_size must be >= 1")
    if cfg.fusion not in FUSIONS:
        raise ValueError(f"--fusion must be one of {', '.join(FUSIONS)}, got {cfg.fusion!r}")
    if cfg.uncertainty not in UNCERTAINTIES:
        raise ValueError(f"--uncertainty must be one of {', '.join(UNCERTAINTIES)}, got {cfg.uncertainty!r}")
    if cfg.split not in ("train", "val", "test", "all"):
        raise ValueError(f"--split must be train, val, test or all, got {cfg.split!r}")
    if cfg.max_images < 0:
        raise ValueError(f"--max_images must be >= 0 (0: all), got {cfg.max_images}")
    check_views(cfg.views)
    for name in ("eta", "td"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(cfg, name)}")


def amp_mode(flag: str, device: torch.device) -> str:
    """What --amp means on this device: 'bf16' (auto on CUDA with bf16, or asked for) or 'fp32'."""
    if flag not in ("auto", "none", "bf16"):
        raise ValueError(f"--amp must be auto, none or bf16, got {flag!r}")
    if flag == "bf16" or (flag == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return "bf16"
    return "fp32"


def sampling_autocast(flag: str, device: torch.device):
    """bf16 autocast on CUDA (auto/bf16); fp32 on CPU unless bf16 is asked for."""
    if amp_mode(flag, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


# ----- what the prediction folder records (sampling.json) ----------------------------------------------------
def weights_digest(ckpt: dict) -> str:
    """A short fingerprint of a checkpoint's weights (raw and EMA): the same checkpoint moved or copied gives the
    same one, another step or another run a different one."""
    h = hashlib.blake2b(digest_size=12)
    for part in ("model", "ema"):
        for name, tensor in sorted((ckpt.get(part) or {}).items()):
            h.update(f"{part}.{name}".encode())
            h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def network_record(ckpt: dict) -> dict:
    """A checkpoint as sampling.json names it: file, path, step, and its weights' fingerprint."""
    path = Path(ckpt["path"])
    return {"file": path.name, "path": str(path.resolve()), "step": ckpt.get("step"), "weights": weights_digest(ckpt)}


def folder_settings(cfg: SampleConfig, lm: LoadedModel, strategy: Strategy, data_name: str, data_dir: str,
                    device: torch.device) -> dict:
    """Everything that makes a folder's masks what they are: the model (by its weights), ADDPM's networks, and
    every flag that changes a mask (batching, workers, speed flags and --max_images do not)."""
    settings: dict = {}
    spec = strategy.spec if isinstance(strategy, FromNoise) else getattr(strategy, "chain", None)
    if isinstance(strategy, addpm.AddpmSampler):
        settings.update(sampler=addpm.ADDPM, addpm_inner=spec.sampler, pre_t=spec.t_start, stop_t=spec.t_end,
                        preseg=strategy.preseg.label if strategy.preseg.label == addpm.HEAD else "network",
                        preseg_soft=strategy.soft_preseg)
    elif spec is not None:
        settings["sampler"] = spec.sampler
    if spec is not None:
        settings["steps"] = spec.steps
        if spec.sampler in SOLVER_ALGORITHMS:
            settings.update(order=spec.order, skip_type=spec.skip_type, method=spec.method)
        if spec.sampler == "ddim":
            settings.update(eta=spec.eta, td=spec.td)
    settings.update(num_ensemble=cfg.num_ensemble, fusion=cfg.fusion, uncertainty=cfg.uncertainty, seed=cfg.seed,
                    use_ema=cfg.use_ema, amp=amp_mode(cfg.amp, device), data_name=data_name,
                    data_dir=str(Path(data_dir).resolve()))
    if cfg.views > 1:  # recorded only when used (outputs.IMPLIED_SETTINGS): older folders stay valid
        settings["views"] = cfg.views
    if volumes.is_volume_data(data_name):  # the model's, recorded for segmentation_env.py (its --labels default)
        data = lm.ckpt["config"]["data"]
        settings.update({k: data.get(k, getattr(DataConfig, k)) for k in VOLUME_SETTINGS})
    networks = {}
    for aux in getattr(strategy, "aux", []):
        flag = "preseg_path" if checkpoint_kind(aux.ckpt) == PRESEG else "denoiser_path"
        networks[flag] = network_record(aux.ckpt)
    return {"model": network_record(lm.ckpt), "networks": networks, "settings": settings}


def prepare_folder(out_dir: Path, settings: dict, overwrite: bool) -> None:
    """Make out_dir ready for masks of `settings` (rank 0, holding the folder's lock): with --overwrite True clear
    the earlier outputs; else masks made with other settings (or with none recorded) are an error, raised before
    anything is written. Then record the settings."""
    if overwrite:
        removed = outputs.clear_prediction_folder(out_dir)
        if removed:
            print(f"--overwrite True: removed the earlier outputs in {out_dir} ({len(removed)} files and folders)",
                  flush=True)
    else:
        masks = outputs.top_level_images(out_dir)
        old = outputs.read_settings(out_dir)
        if masks and old is None:
            raise ValueError(f"--out_dir {out_dir} holds {len(masks)} image files but no {SAMPLING_SETTINGS} saying "
                             f"how they were made (an older run's masks, or not a prediction folder); use --overwrite "
                             f"True to replace them, or another --out_dir")
        conflict = outputs.settings_conflict(out_dir, old, settings) if masks else None
        if conflict:
            raise ValueError(conflict)
    outputs.write_settings(out_dir, settings)


class BatchTimer:
    """Seconds spent on one batch: on a GPU, between two CUDA events recorded on its stream (what the device
    took, without the host-side launch of the first kernels); elsewhere the wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "BatchTimer":
        if self.cuda:
            self._start, self._end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self._t0


@dataclass
class SamplingSummary:
    """What one sampling run did, over every rank's shard."""
    sampler: str          # the manifest's sampler label (e.g. dpm_solver++, addpm-ddpm)
    steps: int
    num_ensemble: int
    images: int           # sampled now
    skipped: int          # already in --out_dir from an earlier run
    seconds: float        # sampling time of the images sampled now
    nfe: int              # network evaluations per member
    nfe_parts: dict       # ADDPM: pre-segmentation, chain and denoiser parts of nfe
    settings: dict        # the strategy's own manifest columns (ADDPM: pre_t, stop_t, preseg)
    out_dir: str
    unit: str = "images"  # what `images` counts: images, or (BRATS/NIFTI) cases
    slices: int = 0       # BRATS/NIFTI: the slices sampled

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(self.images, 1)


@dataclass
class SamplingJob:
    """A prepared run: the model, the strategy, this rank's images still to do, and where they go; rank 0 also
    holds the folder's lock and knows what this run created in it."""
    cfg: SampleConfig
    lm: LoadedModel
    strategy: Strategy
    pairs: list            # this rank's share of the split (datasets.Pair)
    todo: list[int]        # indices into pairs not yet in out_dir
    writer: PredictionWriter
    device: torch.device
    rank: int = 0
    lock: fileio.OutDirLock | None = None
    created: outputs.NewFiles | None = None
    volume: object | None = None  # BRATS/NIFTI: the checkpoint's data/volumes.VolumeSpec (pairs are its cases)

    def record_base(self) -> dict:
        """The manifest columns every image (or case) of this job shares."""
        cfg, strategy = self.cfg, self.strategy
        return {"sampler": strategy.label, "steps": strategy.steps, "num_ensemble": cfg.num_ensemble,
                "fusion": cfg.fusion, "split": cfg.split, **({"views": cfg.views} if cfg.views > 1 else {}),
                **strategy.record()}

    def warmup_runs(self) -> int:
        """Untimed runs of the first batch: --warmup, or by default one on CUDA and none elsewhere."""
        return self.cfg.warmup if self.cfg.warmup >= 0 else int(self.device.type == "cuda")

    def finish(self, failed: bool) -> None:
        """Write the manifest and release the folder; after a failure before any mask was written, remove the
        files this run created (a new folder goes again)."""
        try:
            self.writer.close()
        finally:
            _release(self.lock, self.created if failed and not self.writer.written else None)


def _release(lock: fileio.OutDirLock | None, undo: outputs.NewFiles | None) -> None:
    """Undo what a failed run created (while still holding the lock), then release the lock."""
    try:
        if undo is not None:
            undo.undo()
    finally:
        if lock is not None:
            lock.release()


def prepare(cfg: SampleConfig, model_flags: dict, device: torch.device, rank: int = 0,
            world_size: int = 1) -> SamplingJob:
    """Check the flags, lock the folder, load the model and the strategy, check the folder's settings (or clear it
    with --overwrite), write the split, list this rank's images to do."""
    _validate(cfg)
    out_dir = Path(cfg.out_dir)
    lock = created = None
    if rank == 0:
        created = outputs.NewFiles(out_dir)
        lock = fileio.OutDirLock(out_dir, "--out_dir").acquire()  # a second run into out_dir stops here
    try:
        if rank == 0:
            fileio.remove_stale_tmp(out_dir, recursive=True)  # what a killed writer left; no live one can own it
        lm = load_model(cfg.model_path, device, cfg.use_ema, cfg.compile, cfg.channels_last)
        if rank == 0:
            step = lm.ckpt.get("step")
            print(f"model: {lm.ckpt['path']} (step {'?' if step is None else step}, "
                  f"{'EMA' if cfg.use_ema else 'raw'} weights)", flush=True)
        check_flags_against_checkpoint(model_flags, lm.ckpt, cfg.dpm_solver)
        strategy = build_strategy(cfg, lm, model_flags, device)
        data = lm.ckpt["config"]["data"]
        data_name, data_dir = cfg.data_name or data["data_name"], cfg.data_dir or data["data_dir"]
        volume = volumes.is_volume_data(data_name)
        if volume and cfg.save_overlays:
            raise ValueError(f"--save_overlays True draws on 2-D images; --data_name {data_name} writes volumes")
        split_path = out_dir / SPLIT_FILE
        if rank == 0:
            prepare_folder(out_dir, folder_settings(cfg, lm, strategy, data_name, data_dir, device), cfg.overwrite)
            split = lm.ckpt.get("split")
            if data_name == data["data_name"] and split:
                datasets.save_split(split, split_path)  # the training run's split: no test image was trained on
            else:
                datasets.save_split(datasets.resolve_split(data_name, data_dir, seed=data.get("split_seed", 0),
                                                           folds=data.get("folds", 0), fold=data.get("fold", 0)),
                                    split_path)
        distributed.barrier()
        pairs = datasets.list_pairs(data_name, data_dir, cfg.split, split_file=split_path)
        if cfg.max_images:
            pairs = pairs[:cfg.max_images]
        if rank == 0:
            strategy.warn_if_trained_on([p.id for p in pairs])
        spec = None
        if volume:  # normalised and sliced as in training: the checkpoint's modalities, labels, axis, percentiles
            saved = {k: v for k, v in data.items() if k in DataConfig.__dataclass_fields__}
            spec = volumes.volume_spec(DataConfig(**{**saved, "data_name": data_name, "data_dir": data_dir}),
                                       datasets.find_pairs(data_name, data_dir)[0])
        pairs = pairs[rank::world_size]  # volumes: whole cases per rank, never the slices of one case
        writer = (VolumeWriter if volume else PredictionWriter)(out_dir, save_overlays=cfg.save_overlays,
                                                                overwrite=cfg.overwrite)
        todo = [i for i, p in enumerate(pairs) if not writer.done(p.id)]
    except BaseException:
        _release(lock, created)
        raise
    return SamplingJob(cfg, lm, strategy, pairs, todo, writer, device, rank, lock, created, spec)


def sample_batch(job: SamplingJob, images: torch.Tensor, seeds: list[int], warmup: int = 0):
    """The ensemble of one batch, fused, with its uncertainty map and the seconds it took; `warmup` untimed runs
    first (cuDNN autotuning and torch.compile happen there)."""
    cfg, lm, strategy, device = job.cfg, job.lm, job.strategy, job.device
    for _ in range(warmup):
        with sampling_autocast(cfg.amp, device):
            fuse(sample_views(strategy, lm.model, lm.diffusion, images, cfg.num_ensemble, seeds, cfg.views).members,
                 cfg.fusion)
    with BatchTimer(device) as timer:
        with sampling_autocast(cfg.amp, device):
            result = sample_views(strategy, lm.model, lm.diffusion, images, cfg.num_ensemble, seeds, cfg.views)
        fused = fuse(result.members, cfg.fusion)
        spread = uncertainty(result.members, cfg.uncertainty)
    return result, fused, spread, timer.seconds


def run(job: SamplingJob) -> SamplingSummary:
    """Sample, fuse and write every image still to do; the summary over every rank's shard."""
    if job.volume is not None:
        return sample_volumes.run(job)
    cfg, lm, strategy, device = job.cfg, job.lm, job.strategy, job.device
    main = job.rank == 0
    dataset = datasets.SegmentationDataset(job.pairs, lm.model_cfg.image_size, augment=False)
    loader = DataLoader(Subset(dataset, job.todo), batch_size=cfg.batch_size,
                        num_workers=distributed.loader_workers(cfg.num_workers, log=print if main else lambda _: None),
                        pin_memory=device.type == "cuda")
    by_id = {p.id: p for p in job.pairs}
    record_base, warmup = job.record_base(), job.warmup_runs()
    total_s, nfe, nfe_parts = 0.0, 0, {}
    if main and len(job.todo) < len(job.pairs):
        print(f"{len(job.pairs) - len(job.todo)} of {len(job.pairs)} images already in {cfg.out_dir} with these "
              f"settings: skipped (--overwrite True to sample afresh)", flush=True)
    bar = progress(total=len(job.todo), desc=f"sample {strategy.label}-{strategy.steps}", unit="img",
                   disable=not main)
    failed = True
    try:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            if images.shape[1] != lm.model.image_channels:
                raise ValueError(f"images have {images.shape[1]} channels but the checkpoint's model expects "
                                 f"{lm.model.image_channels}")
            ids = list(batch["id"])
            seeds = [image_seed(cfg.seed, i) for i in ids]
            result, fused, unc, seconds = sample_batch(job, images, seeds, warmup)
            warmup = 0
            per_image = seconds / len(ids)
            total_s += per_image * len(ids)
            nfe, nfe_parts = result.nfe, result.nfe_parts
            for k, image_id in enumerate(ids):
                size = tuple(int(v) for v in batch["orig_size"][k])
                image = np.asarray(datasets.load_image(by_id[image_id].image)) if cfg.save_overlays else None
                job.writer.write(image_id, fused[k].cpu(), unc[k].cpu(), size, image=image,
                                 record={**record_base, "id": image_id, "nfe": result.nfe,
                                         **{f"nfe_{part}": n for part, n in nfe_parts.items()},
                                         "seconds": round(per_image, 4)})
            bar.update(len(ids))
        failed = False
    finally:
        bar.close()
        job.finish(failed)
    # under torchrun: the totals over every rank's shard (each rank timed its own images)
    done, skipped, total_s = distributed.all_reduce_sum([len(job.todo), len(job.pairs) - len(job.todo), total_s],
                                                        device)
    return SamplingSummary(strategy.label, strategy.steps, cfg.num_ensemble, int(done), int(skipped), total_s,
                           nfe, nfe_parts, strategy.record(), str(cfg.out_dir))


def run_sampling(cfg: SampleConfig, model_flags: dict, device: torch.device, rank: int = 0,
                 world_size: int = 1) -> SamplingSummary:
    """Sample every image of the split not already done (prepare, then run)."""
    return run(prepare(cfg, model_flags, device, rank, world_size))

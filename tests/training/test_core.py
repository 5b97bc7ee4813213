"""Tests for guided_diffusion.training.core: sampler, noise, EMA, param groups, resume, NaN stop, preload, compile."""
import pytest
import torch
from tiny_runs import CPU, load, read_log, tiny, train_args

from guided_diffusion.checkpoint import find_latest
from guided_diffusion.config import DataConfig, DiffusionConfig, ModelConfig
from guided_diffusion.diffusion import gaussian_diffusion
from guided_diffusion.training import core
from guided_diffusion.training import diffusion as diffusion_training
from guided_diffusion.training.diffusion import DiffusionTrainer


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_ends_with_same_weights_as_uninterrupted_run(tmp_path, syn_dir):
    straight = DiffusionTrainer(*tiny(tmp_path / "a", syn_dir, max_steps=6), CPU)
    straight.run()
    cfg = tiny(tmp_path / "b", syn_dir, max_steps=3)
    DiffusionTrainer(*cfg, CPU).run()
    cfg[3].max_steps = 6
    resumed = DiffusionTrainer(*cfg, CPU)
    assert resumed.step == 3
    resumed.run()
    assert states_equal(straight.model.state_dict(), resumed.model.state_dict())
    assert states_equal(straight.ema.state, resumed.ema.state)
    sa, sb = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(states_equal(sa[k], sb[k]) for k in sa)
    # and training actually moved the weights
    fresh = DiffusionTrainer(*tiny(tmp_path / "c", syn_dir, max_steps=6), CPU)
    assert not states_equal(fresh.model.state_dict(), straight.model.state_dict())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, syn_dir, monkeypatch):
    trainer = DiffusionTrainer(*tiny(tmp_path, syn_dir, max_steps=6), CPU)
    real = gaussian_diffusion.dice_bce_loss

    def poisoned(logits, target):
        out = real(logits, target)
        return out * float("nan") if trainer.step >= 3 else out

    monkeypatch.setattr(diffusion_training, "dice_bce_loss", poisoned)
    with pytest.raises(core.TrainingDiverged, match="model_0000002.pt"):
        trainer.run()
    assert find_latest(tmp_path).name == "model_0000002.pt"
    assert torch.isfinite(torch.cat([p.flatten() for p in trainer.model.parameters()])).all()


@pytest.mark.slow  # its preloading run forks 2 DataLoader worker processes
def test_preloaded_training_equals_decoding_every_step(tmp_path):
    """--preload True with forked workers trains bit-identically to decoding each file in the main process
    (images below 2 x image_size are kept as they are, so the copies hold exactly the decoded pixels)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(8):
        for sub in ("images", "masks"):
            (tmp_path / "data" / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "data/images" / f"{k}.jpg")
        mask = np.zeros((20, 24), dtype=np.uint8)
        mask[3 + k:12, 4:10 + k] = 255
        Image.fromarray(mask).save(tmp_path / "data/masks" / f"{k}.png")
    runs = []
    for name, preload, workers in (("decode", "False", 0), ("preload", "True", 2)):
        mc, dc, data, tc = tiny(tmp_path / name, tmp_path / "data", max_steps=3, preload=preload,
                                num_workers=workers)
        data = DataConfig(data_name="FOLDER", data_dir=str(tmp_path / "data"))
        runs.append(DiffusionTrainer(mc, dc, data, tc, CPU))
        assert (runs[-1].loader.dataset.base._cache is not None) == (preload == "True")
        runs[-1].run()
    assert states_equal(runs[0].model.state_dict(), runs[1].model.state_dict())


def test_compile_traces_the_training_step_whole_and_trains_the_same(tmp_path, syn_dir, eager_compile):
    """--compile hands the (DDP-)wrapped network and its image encoding to torch.compile; dynamo must capture each
    as one graph with no graph breaks (a break splits the kernels the GPU would fuse)."""
    asked, counters = eager_compile
    eager = DiffusionTrainer(*tiny(tmp_path / "eager", syn_dir, max_steps=3), CPU)
    eager.run()
    compiled = DiffusionTrainer(*tiny(tmp_path / "compiled", syn_dir, max_steps=3, compile=True), CPU)
    compiled.run()
    assert asked == [compiled.model, compiled.model.encode_condition] and compiled.wrapped is not compiled.model
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert states_equal(eager.model.state_dict(), compiled.model.state_dict())


def test_channels_last_trains_like_the_default_layout(syn_dir, single_run, tmp_path, run_script):
    run_script("segmentation_train.py", *train_args(syn_dir, tmp_path, 4, 4), "--channels_last", "True")
    a, b = read_log(single_run), read_log(tmp_path)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    wa, wb = load(single_run)["model"], load(tmp_path)["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=1e-3)
    assert 0.0 <= b[-1]["data_wait"] < 1.0


def test_step_sampler_shards_the_global_batch():
    one = core.StepSampler(10, 6, seed=3)
    it = iter(one)
    single = [next(it) for _ in range(6 * 5)]
    ranks = []
    for r in range(2):
        it = iter(core.StepSampler(10, 3, seed=3, rank=r, world_size=2))
        ranks.append([next(it) for _ in range(3 * 5)])
    merged = [x for s in range(5) for r in range(2) for x in ranks[r][3 * s:3 * s + 3]]
    assert merged == single
    # each epoch is a permutation of the items
    assert sorted(i for i, _ in single[:10]) == list(range(10))
    it = iter(core.StepSampler(10, 6, seed=3, start_step=2))
    assert [next(it) for _ in range(6)] == single[12:18]


def test_seeded_items_draw_from_their_seed_and_leave_the_global_stream_alone():
    """Item (i, s) is what the base dataset draws right after torch.manual_seed(s), whatever the RNG state before,
    and the caller's CPU stream goes on as if the item had not been drawn."""
    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.rand(4) + i

    items = core.SeededItems(Draws())
    torch.manual_seed(5)
    expected = Draws()[2]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    assert torch.equal(items[(2, 5)], expected)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(items[(2, 6)], expected)


def test_ff_parser_filters_are_not_decayed():
    from guided_diffusion.config import create_model
    model = create_model(ModelConfig(image_size=16, num_channels=8, num_res_blocks=1), DiffusionConfig())
    groups = core.param_groups(model, 0.1)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    ff = {id(p) for m in model.ff_parsers for p in m.parameters()}
    assert ff and {id(p) for p in groups[1]["params"]} == ff
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_step_noise_slices_are_the_global_batch_and_drawn_per_sample():
    """Rank r of N draws exactly rows r*b..(r+1)*b-1 of what one process with the global batch draws, and only
    those; noise is standard normal, t uniform over the levels, and both change with the step."""
    cpu = torch.device("cpu")
    t_all, n_all = core.step_noise(3, 5, 8, (1, 16, 16), 100, cpu)
    for world in (2, 4):
        b = 8 // world
        parts = [core.step_noise(3, 5, b, (1, 16, 16), 100, cpu, rank, world) for rank in range(world)]
        assert torch.equal(torch.cat([p[0] for p in parts]), t_all)
        assert torch.equal(torch.cat([p[1] for p in parts]), n_all)
    t_next, n_next = core.step_noise(3, 6, 8, (1, 16, 16), 100, cpu)
    assert not torch.equal(n_next, n_all)
    # samples are independent N(0, 1): statistics of many draws
    big = torch.cat([core.step_noise(0, s, 16, (1, 32, 32), 1000, cpu)[1] for s in range(8)])
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01
    rows = big.flatten(1)
    corr = torch.corrcoef(rows[:32])
    assert (corr - torch.eye(32)).abs().max() < 0.2  # 1/sqrt(1024) = 0.03 per pair; shared noise would be 1
    ts = torch.cat([core.step_noise(0, s, 16, (1, 2, 2), 10, cpu)[0] for s in range(200)])
    assert ts.min() == 0 and ts.max() == 9 and (torch.bincount(ts, minlength=10) > 240).all()


def test_ema_is_the_closed_form_moving_average():
    """After updates with weights w_1..w_n from ema_0 = w_0: ema_n = r^n w_0 + (1 - r) sum_k r^(n-k) w_k."""
    net = torch.nn.Linear(3, 2)
    net.register_buffer("count", torch.tensor(0))
    rate = 0.8
    ema = core.EMA(net, rate)
    history = [net.weight.detach().clone()]
    for k in range(1, 6):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
            net.count += 1
        history.append(net.weight.detach().clone())
        ema.update(net)
    n = len(history) - 1
    expect = rate ** n * history[0] + sum((1 - rate) * rate ** (n - k) * history[k] for k in range(1, n + 1))
    torch.testing.assert_close(ema.state["weight"], expect, atol=1e-6, rtol=1e-6)
    assert ema.state["count"].item() == 5  # integer buffers are copied, not averaged

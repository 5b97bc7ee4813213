"""Tests of the diffusion trainer's formulation options (training/diffusion.py) and of the time budget (core.py)."""
import math
import types

import pytest
import torch
from networks import randomised
from tiny_runs import CPU, tiny

from guided_diffusion.checkpoint import load_checkpoint
from guided_diffusion.config import DiffusionConfig
from guided_diffusion.diffusion.gaussian_diffusion import dice_bce_loss, training_target
from guided_diffusion.training import core
from guided_diffusion.training.diffusion import DiffusionTrainer


def formulation(tmp_path, syn_dir, diffusion=None, **train):
    mc, dc, data, tc = tiny(tmp_path, syn_dir, learn_sigma=False, **train)
    dc = DiffusionConfig(diffusion_steps=50, learn_sigma=False, **(diffusion or {}))
    return DiffusionTrainer(mc, dc, data, tc, CPU)


def one_batch(trainer):
    batch = next(iter(trainer.loader))
    return batch["image"], batch["mask"]


class Recorder:
    """Wraps the network: records pick(keyword arguments) of every call with gradients (by default the
    self-conditioning input)."""

    def __init__(self, net, pick=lambda kw: kw.get("self_cond")):
        self.net, self.pick, self.fed = net, pick, []

    def __call__(self, *args, **kw):
        if torch.is_grad_enabled():
            self.fed.append(self.pick(kw))
        return self.net(*args, **kw)


def head_calib(kw):
    """The calibration logits the mask head is given (Recorder's pick)."""
    return kw["cond"].calib_logits.detach().clone()


@pytest.mark.parametrize("rate,fed_back", [(1.0, True), (0.0, False)])
def test_self_conditioning_trains_on_the_first_pass_estimate(tmp_path, syn_dir, rate, fed_back):
    trainer = formulation(tmp_path, syn_dir, {"prediction": "x0", "mask_scale": 0.5, "self_condition": True},
                          self_condition_rate=rate)
    with torch.no_grad():  # off the zero-initialised output layer, so the first pass estimates something
        for prm in trainer.model.out.parameters():
            prm.normal_(std=0.5)
    trainer.wrapped = recorder = Recorder(trainer.model)
    image, mask = one_batch(trainer)
    first = []
    real = trainer.first_pass
    trainer.first_pass = lambda *a: first.append(real(*a)) or first[-1]
    trainer.compute_loss(image, mask)
    (fed,) = recorder.fed
    if fed_back:  # the trained pass sees the no-grad pass's clipped estimate, divided by the mask scale
        assert len(first) == 1 and torch.equal(fed, first[0] / 0.5)
        assert fed.abs().max() <= 1 and fed.abs().sum() > 0
    else:
        assert first == [] and fed is None  # the network's input is then zeros (self_condition_input)


@pytest.mark.parametrize("network", ["decoupled", "medsegdiff"])
def test_a_step_encodes_the_image_once_and_the_first_passes_reuse_it_without_gradients(tmp_path, syn_dir, network):
    """Self-conditioning and recycling both run a first pass; with the decoupled network that is a head pass only."""
    mc, _, data, tc = tiny(tmp_path, syn_dir, learn_sigma=False, self_condition_rate=1.0, recycle=True)
    mc.network = network
    dc = DiffusionConfig(diffusion_steps=50, learn_sigma=False, prediction="x0", x0_tanh=True, mask_scale=0.1,
                         self_condition=True)
    trainer = DiffusionTrainer(mc, dc, data, tc, CPU)
    encodings, passes = [], []
    real_encode = trainer.model.encode_condition
    trainer.model.encode_condition = lambda image: encodings.append(torch.is_grad_enabled()) or real_encode(image)
    trainer.wrapped = lambda *a, **kw: passes.append((torch.is_grad_enabled(), kw["cond"])) or trainer.model(*a, **kw)
    loss, _ = trainer.compute_loss(*one_batch(trainer))
    assert encodings == [True]  # once, with gradients
    assert [grad for grad, _ in passes] == [False, False, True]  # recycling's and self-conditioning's, the trained
    assert passes[0][1] is passes[1][1] is passes[2][1]  # one Condition for all three
    loss.backward()
    encoder = trainer.model.backbone if network == "decoupled" else trainer.model.cond_encoder
    grads = [p.grad for p in encoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0  # the encoding is trained


def test_self_condition_coin_is_seeded_per_step_at_the_asked_rate(tmp_path, syn_dir):
    trainer = formulation(tmp_path, syn_dir, {"prediction": "x0", "self_condition": True})
    flips = []
    for step in range(400):
        trainer.step = step
        flips.append(trainer.coin(0.5, stream=1))
    assert 0.4 < sum(flips) / len(flips) < 0.6
    trainer.step = 7
    assert trainer.coin(0.5, stream=1) == flips[7] and not trainer.coin(0.0, stream=1)


def test_recycling_noises_the_models_own_estimate_and_keeps_the_ground_truth_targets(tmp_path, syn_dir, monkeypatch):
    trainer = formulation(tmp_path, syn_dir, {"prediction": "eps", "mask_scale": 0.3}, recycle=True)
    d = trainer.diffusion
    image, mask = one_batch(trainer)
    estimate = torch.full_like(mask, 0.05)
    trainer.first_pass = lambda x_t, t, img: estimate if bool((t == d.num_timesteps - 1).all()) else None
    seen = {}
    real = d.training_losses

    def recording(out, x_start, x_t, t, eps):
        seen.update(x_start=x_start, x_t=x_t, t=t, eps=eps)
        return real(out, x_start, x_t, t, eps)

    monkeypatch.setattr(d, "training_losses", recording)
    trainer.compute_loss(image, mask)
    t, noise = trainer.noise_and_t(mask.shape[0], tuple(mask.shape[1:]), d.num_timesteps)
    torch.testing.assert_close(seen["x_t"], d.q_sample(estimate, t, noise))  # x_t comes from the estimate
    torch.testing.assert_close(seen["x_start"], d.mask_to_x0(mask))  # the target is the ground truth's
    a, s = d.alpha_sigma(t, 4)
    torch.testing.assert_close(seen["x_t"], a.float() * seen["x_start"] + s.float() * seen["eps"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("p", [0.5, 2.0, 1.0])
def test_t_power_draws_timesteps_with_density_p_u_to_the_p_minus_1(p):
    T = 1000
    t = torch.cat([core.step_noise(0, s, 64, (1, 2, 2), T, torch.device("cpu"), t_power=p)[0] for s in range(100)])
    assert t.min() >= 0 and t.max() <= T - 1
    u = (t.double() + 0.5) / T
    assert abs(u.mean().item() - p / (p + 1)) < 0.02  # E[U^(1/p)] = p / (p + 1)
    assert abs((u < 0.5).double().mean().item() - 0.5 ** p) < 0.03  # P(t/T < 1/2) = (1/2)^p


def test_mask_loss_is_dice_bce_of_the_x0_estimate(tmp_path, syn_dir):
    trainer = formulation(tmp_path, syn_dir, {"prediction": "x0", "mask_scale": 0.1}, mask_loss_weight=2.0,
                          cal_weight=0.0)
    d = trainer.diffusion
    image, mask = one_batch(trainer)

    class Exact(torch.nn.Module):  # predicts the clean mask exactly
        def forward(self, x_t, t, cond=None, self_cond=None):
            return d.mask_to_x0(mask)

    trainer.wrapped = Exact()
    loss, terms = trainer.compute_loss(image, mask)
    p = d.x0_to_probability(d.mask_to_x0(mask)).clamp(1e-4, 1 - 1e-4)
    bce = -(mask * p.log() + (1 - mask) * (1 - p).log()).mean(dim=(1, 2, 3))
    dice = (2 * (p * mask).sum(dim=(1, 2, 3)) + 1) / (p.sum(dim=(1, 2, 3)) + mask.sum(dim=(1, 2, 3)) + 1)
    torch.testing.assert_close(terms["mask"], (bce + 1 - dice).mean(), atol=1e-5, rtol=1e-4)
    assert terms["mse"] < 1e-10
    torch.testing.assert_close(loss, 2.0 * terms["mask"], atol=1e-6, rtol=1e-6)


def test_every_target_trains_and_its_checkpoint_records_the_formulation(tmp_path, syn_dir):
    for kind in ("eps", "x0", "v"):
        trainer = formulation(tmp_path / kind, syn_dir, {"prediction": kind, "mask_scale": 0.1,
                                                         "self_condition": True}, max_steps=2, t_power=2.0,
                              mask_loss_weight=1.0)
        trainer.run()
        cfg = load_checkpoint(tmp_path / kind)["config"]["diffusion"]
        assert (cfg["prediction"], cfg["mask_scale"], cfg["self_condition"]) == (kind, 0.1, True)
        assert cfg["predict_xstart"] == (kind == "x0")


def test_max_minutes_stops_with_a_final_checkpoint_and_adds_up_over_resumes(tmp_path, syn_dir, monkeypatch):
    clock = [1000.0]

    def tick():  # every reading of the clock advances it by 6 s
        clock[0] += 6.0
        return clock[0]

    monkeypatch.setattr(core, "time", types.SimpleNamespace(perf_counter=tick))  # the trainer's clock only
    first = formulation(tmp_path, syn_dir, max_steps=1000, max_minutes=0.5, save_interval=1000)
    path = first.run()
    assert 1 < first.step < 1000 and first.train_seconds >= 30
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == first.step and math.isclose(ckpt["train_seconds"], first.train_seconds)
    again = formulation(tmp_path, syn_dir, max_steps=1000, max_minutes=0.5, save_interval=1000)
    assert again.run() == path and again.step == first.step  # the budget is spent: nothing to do
    more = formulation(tmp_path, syn_dir, max_steps=1000, max_minutes=1.0, save_interval=1000)
    more.run()
    assert more.step > first.step and more.train_seconds >= 60


@pytest.mark.parametrize("field,value,needle", [("max_minutes", -1.0, "--max_minutes must be >= 0"),
                                                ("save_interval", 0, "--save_interval must be >= 1"),
                                                ("log_interval", 0, "--log_interval must be >= 1")])
def test_bad_run_settings_are_one_line_errors_before_anything_is_written(tmp_path, syn_dir, field, value, needle):
    with pytest.raises(ValueError, match=needle):
        formulation(tmp_path / "run", syn_dir, **{field: value})
    assert not (tmp_path / "run").exists()


def test_self_condition_input_is_used_by_the_network():
    from guided_diffusion.network.unet import MedSegDiffUNet

    net = MedSegDiffUNet(image_size=16, model_channels=8, num_res_blocks=1, channel_mult=(1, 2), self_condition=True,
                         image_concat=True).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, image = torch.randn(2, 1, 16, 16), torch.tensor([3.0, 3.0]), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        zero = net(x, t, image=image)
        assert torch.equal(zero, net(x, t, image=image, self_cond=torch.zeros_like(x)))
        assert not torch.allclose(zero, net(x, t, image=image, self_cond=torch.ones_like(x)))
        cond = net.encode_condition(image)  # the cached condition carries the image for the concatenation
        torch.testing.assert_close(net(x, t, cond=cond), zero)
        other = net.encode_condition(torch.rand(2, 3, 16, 16))._replace(features=cond.features,
                                                                         calib_logits=cond.calib_logits)
        assert not torch.allclose(net(x, t, cond=other), zero)  # the concatenated pixels matter
    plain = MedSegDiffUNet(image_size=16, model_channels=8, num_res_blocks=1, channel_mult=(1, 2))
    with pytest.raises(ValueError, match="not self-conditioned"):
        plain(x, t, image=image, self_cond=x)
    assert training_target("x0", x, x, 1.0, 0.0) is x


@pytest.mark.parametrize("network,tanh", [("decoupled", True), ("medsegdiff", False)])
def test_diffusion_batch_trains_the_diffusion_losses_on_the_first_images_and_the_calibration_on_all(
        tmp_path, syn_dir, network, tanh):
    mc, _, data, tc = tiny(tmp_path, syn_dir, learn_sigma=False, diffusion_batch=2, mask_loss_weight=1.0)
    mc.network, mc.attention_resolutions = network, ""
    dc = DiffusionConfig(diffusion_steps=50, learn_sigma=False, prediction="x0", x0_tanh=tanh, mask_scale=0.1)
    trainer = DiffusionTrainer(mc, dc, data, tc, CPU)
    d, model = trainer.diffusion, trainer.model
    image, mask = one_batch(trainer)
    assert mask.shape[0] == 4
    seen = []
    trainer.wrapped = lambda x_t, t, cond=None, self_cond=None: seen.append((x_t, t, cond)) or model(
        x_t, t, cond=cond, self_cond=self_cond)
    loss, terms = trainer.compute_loss(image, mask)
    ((x_t, t, cond),) = seen
    assert x_t.shape[0] == 2 and cond.batch_size == 2
    with torch.no_grad():  # independently: the calibration loss over all four images, the MSE over the first two
        full = model.encode_condition(image)
        t_all, noise_all = trainer.noise_and_t(4, tuple(mask.shape[1:]), d.num_timesteps)
        x0 = d.mask_to_x0(mask[:2])
        x_t2 = d.q_sample(x0, t_all[:2], noise_all[:2])
        pred = model(x_t2, d.scale_timesteps(t_all[:2]), cond=full.first(2))
    torch.testing.assert_close(x_t, x_t2)
    torch.testing.assert_close(terms["cal"], dice_bce_loss(full.calib_logits, mask).mean())
    torch.testing.assert_close(terms["mse"], ((pred - x0) ** 2).mean(), atol=1e-7, rtol=1e-5)
    p = d.x0_to_probability(pred).clamp(1e-4, 1 - 1e-4)
    torch.testing.assert_close(terms["mask"], dice_bce_loss(torch.logit(p), mask[:2]).mean(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, terms["mse"] + terms["cal"] + terms["mask"])


@pytest.mark.parametrize("flag,value,message", [("diffusion_batch", 5, "--diffusion_batch must be in 0..--batch_size (4)"),
                                                 ("diffusion_batch", -1, "--diffusion_batch"),
                                                 ("t_power", 0.0, "--t_power must be > 0"),
                                                 ("self_condition_rate", 1.5, "--self_condition_rate must be in")])
def test_bad_loss_flags_are_one_line_errors(tmp_path, syn_dir, flag, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        formulation(tmp_path, syn_dir, **{flag: value})


@pytest.mark.parametrize("network", ["decoupled", "medsegdiff"])
def test_detach_condition_leaves_the_image_encoder_to_the_calibration_loss(tmp_path, syn_dir, network):
    mc, _, data, tc = tiny(tmp_path, syn_dir, learn_sigma=False, detach_condition=True, mask_loss_weight=1.0)
    mc.network, mc.attention_resolutions = network, ""
    dc = DiffusionConfig(diffusion_steps=50, learn_sigma=False, prediction="x0", x0_tanh=network == "decoupled",
                         mask_scale=0.1, self_condition=True)
    trainer = DiffusionTrainer(mc, dc, data, tc, CPU)
    model = randomised(trainer.model, std=0.1).train()  # no zero-initialised output layer stops the gradients
    encoder = model.backbone if network == "decoupled" else model.cond_encoder
    image, mask = one_batch(trainer)
    loss, _ = trainer.compute_loss(image, mask)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    dice_bce_loss(model.encode_condition(image).calib_logits, mask).mean().backward()  # the calibration loss alone
    for name, prm in encoder.named_parameters():
        prefix = "backbone." if network == "decoupled" else "cond_encoder."
        torch.testing.assert_close(got.get(prefix + name, torch.zeros_like(prm)),
                                   torch.zeros_like(prm) if prm.grad is None else prm.grad, atol=1e-7, rtol=1e-5)
    others = [g for n, g in got.items() if not n.startswith(("backbone.", "cond_encoder."))]
    assert others and sum(g.abs().sum() for g in others) > 0  # the denoiser itself still trains


def test_detach_condition_needs_an_image_encoder(tmp_path, syn_dir):
    mc, _, data, tc = tiny(tmp_path, syn_dir, learn_sigma=False, detach_condition=True)
    mc.network, mc.attention_resolutions = "unet", ""
    with pytest.raises(ValueError, match="--detach_condition True needs an image encoder"):
        DiffusionTrainer(mc, DiffusionConfig(diffusion_steps=50, learn_sigma=False), data, tc, CPU)


def decoupled_trainer(tmp_path, syn_dir, **train):
    mc, _, data, tc = tiny(tmp_path, syn_dir, learn_sigma=False, mask_loss_weight=1.0, **train)
    mc.network, mc.attention_resolutions = "decoupled", ""
    dc = DiffusionConfig(diffusion_steps=50, learn_sigma=False, prediction="x0", x0_tanh=True, mask_scale=0.1)
    return DiffusionTrainer(mc, dc, data, tc, CPU)


def test_calib_noise_gives_the_head_a_smooth_perturbed_logit_and_the_calibration_loss_the_logit(tmp_path, syn_dir):
    trainer = decoupled_trainer(tmp_path, syn_dir, calib_noise=5.0)
    model = randomised(trainer.model, std=0.1).train()
    trainer.wrapped = recorder = Recorder(model, head_calib)
    image, mask = one_batch(trainer)
    trainer.step = 3
    _, terms = trainer.compute_loss(image, mask)
    calib = model.encode_condition(image).calib_logits.detach()
    # independently: this step's stream-3 draw, white noise averaged over 8 x 8 cells of 2 x 2 pixels (16 px),
    # times 2 for unit variance, bilinearly upsampled, times 5 u with u the stream's draw in [0, 1)
    b, _, h, w = calib.shape
    u, white = core.step_noise(core.seed_mix(trainer.tc.seed, 17, 3), 3, b, (1, h, w), 1 << 20, CPU.device)
    cells = white.view(b, 1, 8, 2, 8, 2).mean(dim=(3, 5)) * 2
    z = torch.nn.functional.interpolate(cells, size=(h, w), mode="bilinear", align_corners=False)
    (seen,) = recorder.fed
    torch.testing.assert_close(seen - calib, 5.0 * (u.float() / (1 << 20)).view(-1, 1, 1, 1) * z,
                               atol=1e-5, rtol=1e-5)
    assert (seen - calib).abs().max() > 0.1
    torch.testing.assert_close(terms["cal"], dice_bce_loss(calib, mask).mean())  # the logit itself, unperturbed
    trainer.wrapped = again = Recorder(model, head_calib)
    trainer.compute_loss(image, mask)
    assert torch.equal(again.fed[0], seen)  # seeded by the step: a resumed run draws the same field
    trainer.step = 4
    trainer.compute_loss(image, mask)
    assert not torch.allclose(again.fed[1], seen)


def test_calib_noise_zero_leaves_the_logit_alone(tmp_path, syn_dir):
    trainer = decoupled_trainer(tmp_path, syn_dir)
    model = randomised(trainer.model, std=0.1).train()
    trainer.wrapped = recorder = Recorder(model, head_calib)
    image, mask = one_batch(trainer)
    trainer.compute_loss(image, mask)
    torch.testing.assert_close(recorder.fed[0], model.encode_condition(image).calib_logits.detach())


def test_bad_calib_noise_is_a_one_line_error(tmp_path, syn_dir):
    with pytest.raises(ValueError, match="--calib_noise must be >= 0"):
        decoupled_trainer(tmp_path, syn_dir, calib_noise=-1.0)
    with pytest.raises(ValueError, match="--network medsegdiff has no such input"):
        formulation(tmp_path, syn_dir, calib_noise=2.0)

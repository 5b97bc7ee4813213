"""Tests for network.decoupled.DecoupledUNet (--network decoupled): the inputs it looks at, the backbone that is the
plain-UNet baseline's network, the head's correction of the calibration logit, one backbone pass per chain."""
import pytest
import torch

from guided_diffusion.config import DiffusionConfig, ModelConfig, create_gaussian_diffusion, create_model
from guided_diffusion.network.aux_nets import AuxNetConfig, PresegNet
from guided_diffusion.network.decoupled import DecoupledUNet
from guided_diffusion.network.unet import self_condition_input
from guided_diffusion.sampling.samplers import SamplerSpec, sample_ensemble
from networks import assert_sees_its_inputs, randomised


def net_of(**kw) -> DecoupledUNet:
    args = dict(image_size=16, model_channels=8, channel_mult=(1, 2), self_condition=True, x0_tanh_scale=0.1)
    return DecoupledUNet(**{**args, **kw})


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 1, 16, 16, generator=g) * 0.3, torch.tensor([5.0, 40.0]),
            torch.rand(2, 3, 16, 16, generator=g))


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_outputs_and_the_inputs_it_looks_at(learn_sigma):
    net = randomised(net_of(learn_sigma=learn_sigma, x0_tanh_scale=None))
    x, t, image = batch()
    out = assert_sees_its_inputs(net, x, t, image, torch.tensor([400.0, 400.0]))
    assert out.shape[1] == (2 if learn_sigma else 1)
    with torch.no_grad():
        assert not torch.allclose(out, net(x, t, image=image, self_cond=torch.ones_like(x)))  # the x0 estimate
        assert torch.equal(out, net(x, t, image=image, self_cond=torch.zeros_like(x)))  # none given: zeros
        two = net.encode_condition(image).repeat_interleave(2)  # ensembles: member k of image i is row 2 i + k
        torch.testing.assert_close(net(x.repeat_interleave(2, 0), t.repeat_interleave(2), cond=two)[::2], out)
    with pytest.raises(ValueError, match="does not match x"):
        net(x, t, cond=two)
    with pytest.raises(ValueError, match="not self-conditioned"):
        net_of(self_condition=False)(x, t, image=image, self_cond=x)


def test_the_backbone_is_the_plain_unet_baseline_and_its_output_the_calibration_logits():
    """Same modules as train_preseg_network.py's network, so the baseline's weights load into the backbone and give
    its logits as the calibration head's."""
    baseline = randomised(PresegNet(AuxNetConfig(image_size=16, num_channels=8, channel_mult="1,2")))
    net = net_of()
    net.backbone.load_state_dict(baseline.state_dict())  # strict: the same parameter names and shapes
    net.eval()
    x, t, image = batch()
    with torch.no_grad():
        _, calib = net(x, t, image=image, return_calib=True)
        torch.testing.assert_close(calib, baseline(image))
        torch.testing.assert_close(net.encode_condition(image).calib_logits, baseline(image))


def test_a_new_head_returns_the_calibration_mask_and_a_trained_one_corrects_its_logit():
    """x0 = b tanh(calib / 2 + head): zero-initialised, the head adds nothing, so x0's foreground probability
    (x0 / b + 1) / 2 is sigmoid(calib); with weights, the correction is the unbounded network's output."""
    b = 0.1
    fresh = net_of()
    randomised(fresh.backbone)
    fresh.eval()
    x, t, image = batch()
    with torch.no_grad():
        x0, calib = fresh(x, t, image=image, return_calib=True)
        torch.testing.assert_close((x0 / b + 1) / 2, torch.sigmoid(calib))
        assert calib.std() > 0.1  # not a trivially constant logit
    bounded, raw = randomised(net_of()), net_of(x0_tanh_scale=None)
    raw.load_state_dict(bounded.state_dict())
    raw.eval()
    with torch.no_grad():
        head, calib = raw(x, t, image=image, return_calib=True)
        torch.testing.assert_close(bounded(x, t, image=image), b * torch.tanh(calib / 2 + head))
        assert head.abs().max() > 0.1


@pytest.mark.parametrize("stride", [1, 2])
def test_a_chain_runs_the_backbone_once_per_batch_and_the_head_at_every_step(stride):
    net = randomised(net_of(x0_tanh_scale=0.1, head_stride=stride))
    diffusion = create_gaussian_diffusion(DiffusionConfig(diffusion_steps=50, learn_sigma=False, prediction="x0",
                                                          mask_scale=0.1, self_condition=True, x0_tanh=True))
    calls = {"backbone": 0, "head": 0}
    net.backbone.conv_in.register_forward_hook(lambda *a: calls.__setitem__("backbone", calls["backbone"] + 1))
    net.head_out.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    _, _, image = batch()
    result = sample_ensemble(net, diffusion, image, 3, SamplerSpec("dpm_solver++", steps=5), seeds=[1, 2])
    assert result.members.shape == (2, 3, 16, 16) and result.nfe == 6
    assert calls == {"backbone": 1, "head": 6}  # 2 images x 3 members in one batch: one image encoding
    assert result.members.min() >= 0 and result.members.max() <= 1


def test_self_condition_input_cases():
    x = torch.ones(1, 1, 2, 2)
    assert self_condition_input(x, False, None) is None
    assert torch.equal(self_condition_input(x, True, None), torch.zeros_like(x))  # a chain's first step
    fed = self_condition_input(x, True, torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64))
    assert fed.dtype == x.dtype and torch.equal(fed, x / 2)
    with pytest.raises(ValueError, match="not self-conditioned"):
        self_condition_input(x, False, x)


def test_factory_builds_it_and_checks_its_flags():
    net = create_model(ModelConfig(image_size=16, num_channels=8, network="decoupled", head_blocks=3),
                       DiffusionConfig(learn_sigma=False, prediction="x0", x0_tanh=True, mask_scale=0.1))
    assert isinstance(net, DecoupledUNet) and len(net.head) == 3 and net.x0_tanh_scale == 0.1
    with pytest.raises(ValueError, match="--network must be medsegdiff, unet or decoupled"):
        create_model(ModelConfig(image_size=16, network="transformer"), DiffusionConfig())
    with pytest.raises(ValueError, match="--image_concat is for --network medsegdiff"):
        create_model(ModelConfig(image_size=16, network="decoupled", image_concat=True), DiffusionConfig())
    with pytest.raises(ValueError, match="--head_blocks must be >= 1"):
        create_model(ModelConfig(image_size=16, network="decoupled", head_blocks=0), DiffusionConfig())
    with pytest.raises(ValueError, match="--head_channels must be >= 1"):
        create_model(ModelConfig(image_size=16, network="decoupled", head_channels=-1), DiffusionConfig())


def test_head_channels_sets_the_head_width_and_not_the_backbone():
    """--head_channels 0 is the backbone's first width (the layout of the models trained before the flag); another
    value changes only the head's layers, which still read the backbone's full feature map."""
    diffusion = DiffusionConfig(learn_sigma=False, prediction="x0", self_condition=True)
    default = create_model(ModelConfig(image_size=16, num_channels=8, network="decoupled"), diffusion)
    narrow = create_model(ModelConfig(image_size=16, num_channels=8, network="decoupled", head_channels=4,
                                      head_blocks=1), diffusion)
    assert tuple(default.head_in.weight.shape) == (8, 3 + 8, 3, 3)
    assert tuple(narrow.head_in.weight.shape) == (4, 3 + 8, 3, 3)
    assert narrow.head_out[-1].in_channels == 4 and len(narrow.head) == 1
    assert default.backbone.state_dict().keys() == narrow.backbone.state_dict().keys()
    assert [a.shape for a in default.backbone.state_dict().values()] == \
        [b.shape for b in narrow.backbone.state_dict().values()]
    x, image = torch.randn(2, 1, 16, 16), torch.rand(2, 3, 16, 16)
    assert narrow(x, torch.tensor([3, 900]), image=image, self_cond=x).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("stride", [2, 4])
def test_head_stride_runs_the_head_at_a_lower_resolution_and_loses_no_input_pixel(stride):
    """--head_stride s: the mask-sized inputs enter as s x s blocks of pixels stacked into channels (so moving a value
    inside a block changes the output), the features average-pooled, and the output returns at full size; a new
    head still returns the calibration head's mask."""
    net = randomised(net_of(head_stride=stride, x0_tanh_scale=None))
    assert tuple(net.head_in.weight.shape) == (8, 3 * stride ** 2 + 8, 3, 3)
    assert net.head_out[-1].out_channels == stride ** 2
    x, t, image = batch()
    out = assert_sees_its_inputs(net, x, t, image, torch.tensor([400.0, 400.0]))
    assert out.shape == x.shape
    moved = x.clone()
    moved[:, :, 0, 0], moved[:, :, 0, 1] = x[:, :, 0, 1], x[:, :, 0, 0]  # the same block, the same mean
    with torch.no_grad():
        assert not torch.allclose(net(moved, t, image=image), out)
    fresh = net_of(head_stride=stride)
    randomised(fresh.backbone)
    fresh.eval()
    with torch.no_grad():
        x0, calib = fresh(x, t, image=image, return_calib=True)
    torch.testing.assert_close((x0 / 0.1 + 1) / 2, torch.sigmoid(calib))


def test_head_stride_output_layout_is_one_channel_per_pixel_of_a_block():
    """The head's s^2 output channels at low-resolution position (i, j) are the full-size pixels (s i + a, s j + b),
    channel a s + b (the sub-pixel layout): with an output layer that writes k on channel k, every s x s block of
    the correction reads 0 .. s^2 - 1 row by row."""
    s = 4
    net = net_of(head_stride=s, x0_tanh_scale=None, self_condition=False)
    conv = net.head_out[-1]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.arange(s * s, dtype=torch.float32))
        x, t, image = batch()
        out = net(x, t, image=image)
    expected = torch.arange(s * s, dtype=torch.float32).reshape(s, s).repeat(16 // s, 16 // s)
    torch.testing.assert_close(out[0, 0], expected)
    torch.testing.assert_close(out[1, 0], expected)


def test_head_stride_checks():
    with pytest.raises(ValueError, match="--head_stride must be >= 1 and divide --image_size 16, got 3"):
        create_model(ModelConfig(image_size=16, network="decoupled", head_stride=3), DiffusionConfig())
    with pytest.raises(ValueError, match="--head_stride must be >= 1"):
        create_model(ModelConfig(image_size=16, network="decoupled", head_stride=0), DiffusionConfig())
    net = net_of(head_stride=4)
    with pytest.raises(ValueError, match="divisible by the head's stride 4"):
        net(torch.randn(1, 1, 8, 6), torch.tensor([3]), image=torch.rand(1, 3, 8, 6))


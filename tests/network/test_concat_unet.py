"""Tests for network.unet.ConcatUNet (--network unet): inputs, outputs, the cached condition, the factory."""
import pytest
import torch

from guided_diffusion.config import DiffusionConfig, ModelConfig, create_model
from guided_diffusion.network.unet import ConcatUNet
from guided_diffusion.sampling import addpm
from networks import assert_sees_its_inputs, randomised


@pytest.mark.parametrize("learn_sigma,self_condition", [(False, False), (True, True)])
def test_outputs_and_the_inputs_it_looks_at(learn_sigma, self_condition):
    net = randomised(ConcatUNet(image_size=16, model_channels=8, channel_mult=(1, 2), learn_sigma=learn_sigma,
                                self_condition=self_condition))
    x, t, image = torch.randn(2, 1, 16, 16), torch.tensor([5.0, 5.0]), torch.rand(2, 3, 16, 16)
    out = assert_sees_its_inputs(net, x, t, image, torch.tensor([40.0, 40.0]))
    assert out.shape[1] == (2 if learn_sigma else 1)
    with torch.no_grad():
        assert net(x, t, image=image, return_calib=True)[1] is None  # no calibration head
        if self_condition:
            assert not torch.allclose(out, net(x, t, image=image, self_cond=torch.ones_like(x)))
        else:
            with pytest.raises(ValueError, match="not self-conditioned"):
                net(x, t, image=image, self_cond=x)


def test_factory_builds_it_and_checks_its_flags():
    net = create_model(ModelConfig(image_size=16, num_channels=8, network="unet"), DiffusionConfig(learn_sigma=False))
    assert isinstance(net, ConcatUNet) and net.out_channels == 1
    with pytest.raises(ValueError, match="--network must be medsegdiff, unet or decoupled"):
        create_model(ModelConfig(image_size=16, network="transformer"), DiffusionConfig())
    with pytest.raises(ValueError, match="--image_concat is for --network medsegdiff"):
        create_model(ModelConfig(image_size=16, network="unet", image_concat=True), DiffusionConfig())


def test_head_preseg_needs_a_calibration_head():
    net = ConcatUNet(image_size=16, model_channels=8, channel_mult=(1, 2))
    with pytest.raises(ValueError, match="--preseg head needs the diffusion model's calibration head"):
        addpm.HeadPreseg()(torch.rand(1, 3, 16, 16), net.encode_condition(torch.rand(1, 3, 16, 16)))


@pytest.mark.parametrize("network", ["unet", "medsegdiff"])
def test_x0_tanh_bounds_the_x0_channel_to_the_mask_range_and_keeps_the_variance_channel(network):
    from guided_diffusion.network.unet import bounded_output

    plain = create_model(ModelConfig(image_size=16, num_channels=8, network=network),
                         DiffusionConfig(prediction="x0", learn_sigma=True, mask_scale=0.2))
    bounded = create_model(ModelConfig(image_size=16, num_channels=8, network=network),
                           DiffusionConfig(prediction="x0", learn_sigma=True, mask_scale=0.2, x0_tanh=True))
    torch.manual_seed(0)
    for prm in plain.parameters():
        torch.nn.init.normal_(prm, std=0.5)
    plain.eval()
    bounded.load_state_dict(plain.state_dict())
    bounded.eval()
    x, t, image = torch.randn(2, 1, 16, 16), torch.tensor([5.0, 5.0]), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        raw, out = plain(x, t, image=image), bounded(x, t, image=image)
    torch.testing.assert_close(out[:, :1], 0.2 * torch.tanh(raw[:, :1]))
    torch.testing.assert_close(out[:, 1:], raw[:, 1:])
    assert out[:, :1].abs().max() <= 0.2 and raw[:, :1].abs().max() > 0.2  # (tanh may round to 1 in float32)
    assert bounded_output(raw, 1, None) is raw
    with pytest.raises(ValueError, match="--x0_tanh True bounds an x0 prediction"):
        create_model(ModelConfig(image_size=16), DiffusionConfig(prediction="v", x0_tanh=True))

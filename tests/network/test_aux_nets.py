"""Tests for guided_diffusion.network.aux_nets: the denoising network's time conditioning."""
import torch

from guided_diffusion.network.aux_nets import AuxNetConfig, DenoiserNet


def test_denoiser_net_is_time_conditioned():
    net = DenoiserNet(AuxNetConfig(image_size=16, num_channels=8)).eval()
    for p in net.parameters():  # move off the zero-initialised residual branches
        torch.nn.init.normal_(p, std=0.1)
    x, image = torch.randn(2, 1, 16, 16), torch.rand(2, 3, 16, 16)
    assert not torch.allclose(net(x, torch.tensor([1.0, 1.0]), image), net(x, torch.tensor([9.0, 9.0]), image))
    assert not torch.allclose(net(x, torch.tensor([1.0, 1.0]), image), net(x, torch.tensor([1.0, 1.0]), 1 - image))

"""Shared checks of the conditional denoisers (tests/network)."""
import torch


def randomised(net, std: float = 0.2, seed: int = 0):
    """The network in eval mode with seeded random weights, so no zero-initialised output hides an input."""
    torch.manual_seed(seed)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=std)
    return net.eval()


def assert_sees_its_inputs(net, x, t, image, other_t):
    """The output (of the right shape) changes with the image, x_t and t, and the cached condition gives the same
    output as the image; returns the output."""
    with torch.no_grad():
        out = net(x, t, image=image)
        assert out.shape == (x.shape[0], net.out_channels, *x.shape[-2:])
        assert not torch.allclose(out, net(x, t, image=torch.rand_like(image)))  # the image
        assert not torch.allclose(out, net(torch.randn_like(x), t, image=image))  # x_t
        assert not torch.allclose(out, net(x, other_t, image=image))  # t
        torch.testing.assert_close(net(x, t, cond=net.encode_condition(image)), out)  # the cached condition
    return out

"""Tests for the MedSegDiff-style UNet (network/unet.py): shapes, caching, continuity in t, gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from guided_diffusion.network.nn import timestep_embedding
from guided_diffusion.network.unet import (Condition, FFParser, MedSegDiffUNet, default_channel_mult,
                                           parse_attention_resolutions)

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny(image_size: int = 32, **kw) -> MedSegDiffUNet:
    """A small model; eval() so dropout cannot make two calls differ."""
    torch.manual_seed(0)
    args = dict(image_size=image_size, model_channels=16, num_res_blocks=1)
    args.update(kw)
    return MedSegDiffUNet(**args).eval()


def randomize_zero_inits(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Perturb every parameter so zero-initialised output layers no longer hide the rest of the network."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def inputs(model: MedSegDiffUNet, batch: int = 2, seed: int = 0):
    """(x_t, t, image) with the model's image size."""
    g = torch.Generator().manual_seed(seed)
    s = model.image_size
    x = torch.randn(batch, model.mask_channels, s, s, generator=g)
    img = torch.rand(batch, model.image_channels, s, s, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    return x, t, img


@pytest.mark.parametrize(
    "image_size,width,learn_sigma,attn,scale_shift",
    [
        (16, 16, False, "8", False),
        (32, 24, True, "16,8", True),
        (48, 32, False, "", True),
        (64, 16, True, "16", False),
        (64, 24, False, "32,16,8", True),
    ],
)
def test_output_shapes(image_size, width, learn_sigma, attn, scale_shift):
    model = MedSegDiffUNet(
        image_size=image_size,
        model_channels=width,
        num_res_blocks=1,
        attention_ds=parse_attention_resolutions(attn, image_size),
        use_scale_shift_norm=scale_shift,
        learn_sigma=learn_sigma,
        num_head_channels=8 if attn else -1,
    ).eval()
    x, t, img = inputs(model)
    with torch.no_grad():
        out, calib = model(x, t, image=img, return_calib=True)
    assert model.out_channels == (2 if learn_sigma else 1)
    assert out.shape == (2, model.out_channels, image_size, image_size)
    assert calib.shape == (2, 1, image_size, image_size)
    cond = model.encode_condition(img)
    assert len(cond.features) == len(model.channel_mult)
    for k, f in enumerate(cond.features):
        assert f.shape == (2, width * model.channel_mult[k], image_size >> k, image_size >> k)


def test_two_res_blocks_class_cond_and_checkpointing():
    model = tiny(32, num_res_blocks=2, num_classes=3, use_checkpoint=True, dropout=0.1,
                 attention_ds=(2,), channel_mult=(1, 2, 2))
    model.train()
    x, t, img = inputs(model)
    y = torch.tensor([0, 2])
    out = model(x, t, image=img, y=y)
    out.square().mean().backward()
    assert out.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="pass y"):
        model(x, t, image=img)
    with pytest.raises(ValueError, match="num_classes=None"):
        tiny(32)(x, t, image=img, y=y)


def test_condition_is_reusable_and_matches_image_path():
    model = tiny(32, attention_ds=(4,))
    randomize_zero_inits(model)
    x, t, img = inputs(model)
    with torch.no_grad():
        cond = model.encode_condition(img)
        again = model.encode_condition(img)
        out_img, calib_img = model(x, t, image=img, return_calib=True)
        out_cond, calib_cond = model(x, t, cond=cond, return_calib=True)
        # cached condition also serves other x_t / t: equals the image path there too
        x2 = torch.randn_like(x)
        out_other = model(x2, t + 37.5, cond=cond)
        out_other_img = model(x2, t + 37.5, image=img)
    for a, b in zip(cond.features, again.features):
        assert torch.equal(a, b)
    torch.testing.assert_close(out_img, out_cond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(calib_img, calib_cond)
    torch.testing.assert_close(calib_img, cond.calib_logits)
    torch.testing.assert_close(out_other, out_other_img, rtol=1e-5, atol=1e-6)


def test_condition_repeat_interleave_matches_repeated_images():
    model = tiny(32)
    randomize_zero_inits(model)
    _, _, img = inputs(model, batch=2)
    n = 3
    x = torch.randn(2 * n, 1, 32, 32)
    t = torch.linspace(0, 999, 2 * n)
    with torch.no_grad():
        cond = model.encode_condition(img).repeat_interleave(n)
        out_rep = model(x, t, cond=cond)
        out_img = model(x, t, image=img.repeat_interleave(n, dim=0))
    assert isinstance(cond, Condition) and cond.batch_size == 2 * n
    torch.testing.assert_close(out_rep, out_img, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="repeat_interleave"):
        model(x, t, cond=model.encode_condition(img))


def test_non_integer_t_is_continuous():
    model = tiny(32)
    randomize_zero_inits(model)
    x, _, img = inputs(model, batch=1)
    cond = model.encode_condition(img)

    def run(t: float) -> torch.Tensor:
        with torch.no_grad():
            return model(x, torch.tensor([t]), cond=cond)

    near = (run(10.0) - run(10.001)).abs().max()
    far = (run(10.0) - run(500.0)).abs().max()
    assert near < 1e-3 * far
    assert far > 1e-3
    emb = timestep_embedding(torch.tensor([3.25, 3.25]), 17)
    assert emb.shape == (2, 17) and torch.equal(emb[0], emb[1])
    # int timesteps and a scalar t are accepted too
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor([10]), cond=cond), run(10.0))
        torch.testing.assert_close(model(x, torch.tensor(10.0), cond=cond), run(10.0))


def test_output_depends_on_image_and_x():
    model = tiny(32)
    randomize_zero_inits(model)
    x, t, img = inputs(model)
    with torch.no_grad():
        base = model(x, t, image=img)
        other_img = model(x, t, image=torch.rand_like(img))
        other_x = model(torch.randn_like(x), t, image=img)
    assert (base - other_img).abs().max() > 1e-4
    assert (base - other_x).abs().max() > 1e-4


def test_gradients_reach_every_parameter():
    model = tiny(32, attention_ds=(2,), use_scale_shift_norm=True, learn_sigma=True)
    randomize_zero_inits(model)
    model.train()
    x, t, img = inputs(model)
    out, calib = model(x, t, image=img, return_calib=True)
    target = (torch.rand(2, 1, 32, 32) > 0.5).float()
    loss = out.square().mean() + F.binary_cross_entropy_with_logits(calib, target)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"
    assert any(n.startswith("ff_parsers") for n, _ in model.named_parameters())
    assert any(n.startswith("cond_encoder.calib_out") for n, _ in model.named_parameters())


def test_ff_parser_identity_at_init_and_resizes():
    ffp = FFParser(4, 8, 8)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(ffp(x), x, rtol=1e-5, atol=1e-5)
    y = torch.randn(2, 4, 16, 12)  # another size: the weight map is interpolated, ones stay ones
    torch.testing.assert_close(ffp(y), y, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ffp.weight[..., 0].mul_(0.5)  # halving every frequency halves the map
    torch.testing.assert_close(ffp(x), 0.5 * x, rtol=1e-5, atol=1e-5)


def test_model_runs_at_other_sizes():
    model = tiny(32)
    x = torch.randn(1, 1, 48, 40)
    img = torch.rand(1, 3, 48, 40)
    with torch.no_grad():
        assert model(x, torch.tensor([3.0]), image=img).shape == (1, 1, 48, 40)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 1, 30, 30), torch.tensor([3.0]), image=torch.rand(1, 3, 30, 30))


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="image_size=100 is not divisible by 8"):
        MedSegDiffUNet(image_size=100, model_channels=16, num_res_blocks=1)
    with pytest.raises(ValueError, match="not divisible by 32"):
        MedSegDiffUNet(image_size=48, model_channels=16, num_res_blocks=1, channel_mult=(1, 2, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="model_channels"):
        MedSegDiffUNet(image_size=32, model_channels=0, num_res_blocks=1)
    with pytest.raises(ValueError, match="num_res_blocks"):
        MedSegDiffUNet(image_size=32, model_channels=16, num_res_blocks=0)
    with pytest.raises(ValueError, match="num_heads"):
        MedSegDiffUNet(image_size=32, model_channels=16, num_res_blocks=1, num_heads=3)
    with pytest.raises(ValueError, match="num_head_channels"):
        MedSegDiffUNet(image_size=32, model_channels=24, num_res_blocks=1, num_head_channels=7)
    with pytest.raises(ValueError, match="dropout"):
        MedSegDiffUNet(image_size=32, model_channels=16, num_res_blocks=1, dropout=1.5)
    with pytest.raises(ValueError, match="channel_mult"):
        MedSegDiffUNet(image_size=32, model_channels=16, num_res_blocks=1, channel_mult=())
    model = tiny(16)
    x, t, img = inputs(model)
    with pytest.raises(ValueError, match="exactly one"):
        model(x, t)
    with pytest.raises(ValueError, match="exactly one"):
        model(x, t, image=img, cond=model.encode_condition(img))
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.zeros(3), image=img)
    with pytest.raises(ValueError, match="image must be"):
        model.encode_condition(img[:, :1])
    with pytest.raises(ValueError, match="attention_resolutions"):
        parse_attention_resolutions("16,eight", 64)


def test_default_channel_mult_and_attention_parsing():
    assert default_channel_mult(256) == (1, 1, 2, 2, 4, 4)
    assert default_channel_mult(128) == (1, 1, 2, 3, 4)
    assert default_channel_mult(64) == (1, 2, 3, 4)
    assert default_channel_mult(32) == (1, 2, 2)
    assert default_channel_mult(16) == (1, 2)
    assert parse_attention_resolutions("16,8", 64) == (4, 8)
    assert parse_attention_resolutions("16", 256) == (16,)
    assert parse_attention_resolutions("", 64) == ()
    assert parse_attention_resolutions("24,16", 64) == (4,)  # 24 is no level of a 64 UNet: ignored
    assert parse_attention_resolutions([32, 16], 64) == (2, 4)

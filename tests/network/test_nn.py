"""Tests for guided_diffusion.network.nn: the group-norm width rule."""
from guided_diffusion.network.nn import norm_groups


def test_group_norm_widths():
    for width in (8, 16, 17, 24, 32, 48, 64, 96, 128, 192, 256):
        g = norm_groups(width)
        assert width % g == 0 and 1 <= g <= 32
    assert norm_groups(128) == 32 and norm_groups(16) == 8

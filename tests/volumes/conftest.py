"""Tiny generated NIfTI data sets (24 x 20 x 12 voxels, 1.0 x 1.2 x 2.5 mm, a rotated and flipped affine), made once
per session and copied when a test changes them."""
import shutil

import pytest

from tiny_volumes import SHAPE, SPACING

from guided_diffusion.data.synthetic_volumes import write_volumes


@pytest.fixture(scope="session")
def volume_sets(tmp_path_factory):
    """{'brats', 'nifti' (4-D images), 'split' (nifti, one file per channel)}: folders of 6 tiny cases."""
    root = tmp_path_factory.mktemp("volumes")
    return {"brats": write_volumes(root / "brats", "brats", 6, shape=SHAPE, spacing=SPACING),
            "nifti": write_volumes(root / "nifti", "nifti", 6, shape=SHAPE, spacing=SPACING),
            "split": write_volumes(root / "split", "nifti", 6, shape=SHAPE, spacing=SPACING, channels_layout="split")}


@pytest.fixture
def copy_set(volume_sets, tmp_path):
    """copy_set(name): a private copy of one of the sets, to damage."""
    def make(name):
        return shutil.copytree(volume_sets[name], tmp_path / name)
    return make

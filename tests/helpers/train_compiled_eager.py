"""segmentation_train.py with torch.compile's backend forced to dynamo's 'eager' (graph capture without
inductor's C++ build, which takes minutes on a CPU); launched by tests/test_distributed.py under torchrun."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
_real = torch.compile
torch.compile = lambda fn, **kw: _real(fn, backend="eager")

import segmentation_train  # noqa: E402

if __name__ == "__main__":
    segmentation_train.main(sys.argv[1:])

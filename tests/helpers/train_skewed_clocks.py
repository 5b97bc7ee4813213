"""segmentation_train.py under torchrun with a fake clock per rank (rank r advances 1 + r seconds a reading), recording
the rate each step trains at into <first argument>/rank<r>.txt; launched by tests/training/test_lr_schedule.py."""
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import segmentation_train  # noqa: E402
from guided_diffusion.training import core  # noqa: E402

if __name__ == "__main__":
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ["RANK"])
    clock = [1000.0]

    def tick():
        clock[0] += 1.0 + rank
        return clock[0]

    core.time = types.SimpleNamespace(perf_counter=tick)
    rates, real = [], core.Trainer._set_lr

    def recording(self):
        real(self)
        rates.append(self.opt.param_groups[0]["lr"])

    core.Trainer._set_lr = recording
    try:
        segmentation_train.main(argv)
    finally:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.txt").write_text("\n".join(repr(r) for r in rates) + "\n")

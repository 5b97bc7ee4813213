import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with dynamo's 'eager' backend: the same graph capture (and graph breaks) as a real compile,
    without inductor's C++ build, which takes minutes on a CI CPU. Yields (what was compiled, dynamo's counters)."""
    import torch
    from torch._dynamo.utils import counters

    real, compiled = torch.compile, []

    def recording(fn, **kw):
        compiled.append(fn)
        return real(fn, backend="eager")

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", recording)
    yield compiled, counters
    torch._dynamo.reset()

"""Tests for guided_diffusion.cli: a user error is one line on stderr and exit code 2; a bug keeps its traceback."""
import pytest

from guided_diffusion.checkpoint import CheckpointError
from guided_diffusion.cli import run_cli


@pytest.mark.parametrize("error", [ValueError("--lr must be > 0, got -1\nsecond line"),
                                   CheckpointError("--model_path x.pt: no such file"),
                                   FileNotFoundError("data/missing")])
def test_user_errors_print_their_first_line_and_exit_2(capsys, monkeypatch, error):
    monkeypatch.delenv("SEG_DEBUG", raising=False)

    def main():
        raise error

    with pytest.raises(SystemExit) as exc:
        run_cli(main)
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"error: {str(error).splitlines()[0]}\n"


def test_a_bug_is_not_hidden_and_seg_debug_shows_user_errors_in_full(monkeypatch):
    def bug():
        raise KeyError("internal")

    with pytest.raises(KeyError):
        run_cli(bug)
    monkeypatch.setenv("SEG_DEBUG", "1")

    def user():
        raise ValueError("bad flag")

    with pytest.raises(ValueError, match="bad flag"):
        run_cli(user)

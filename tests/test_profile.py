"""`omnimoe train --profile-steps A:B` with a bad range: one line, exit 2, nothing written. The
trace itself is checked in tests/test_cli.py's end-to-end run (steps 5..6 of a resumed run)."""
import pytest

from omnimoe.train.cli import main
from test_cli import SMALL


@pytest.mark.parametrize("steps,message", [
    ("3", "--profile-steps must be A:B (two step numbers), got '3'"),
    ("a:b", "--profile-steps must be A:B (two step numbers), got 'a:b'"),
    ("3:2", "--profile-steps must satisfy 1 <= A <= B <= train.steps=4, got '3:2'"),
    ("2:5", "--profile-steps must satisfy 1 <= A <= B <= train.steps=4, got '2:5'")])
def test_bad_profile_steps_is_one_line_exit_2(tmp_path, capsys, steps, message):
  assert main(["train", *SMALL, "train.steps=4", "--profile-steps", steps,
               "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert err.strip().splitlines() == [f"omnimoe: error: {message}"]
  assert not (tmp_path / "run" / "checkpoints").exists()

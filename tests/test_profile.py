"""`omnimoe train --profile-steps A:B`: a jax.profiler trace of exactly those steps, and bad ranges."""
import gzip
import json
import pathlib

import pytest

from omnimoe.train.cli import main
from tests.test_cli import SMALL


def _trace_events(workdir: pathlib.Path) -> list[dict]:
  [trace] = (workdir / "profile").rglob("*.trace.json.gz")
  return json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]


def test_profile_steps_trace_the_steps_asked_for(tmp_path, capsys):
  wd = tmp_path / "run"
  assert main(["train", *SMALL, "train.steps=4", "eval.every_steps=0", "checkpoint.every_steps=100",
               "--profile-steps", "2:3", "--workdir", str(wd)]) == 0
  assert f"profile of steps 2..3 in {wd / 'profile'}" in capsys.readouterr().err
  assert [p.stat().st_size > 0 for p in (wd / "profile").rglob("*.xplane.pb")] == [True]
  # The train step's compiled program runs once per traced step: steps 2 and 3, not 1 or 4.
  names = [e.get("name", "") for e in _trace_events(wd)]
  assert names.count("CommonPjRtLoadedExecutable::Execute (jit_train_step)") == 2


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

"""Preemption set-up: several processes without jax's preemption service are refused in one line
(a SIGTERM could not stop every host at the same step). The stop itself, across two processes, is
tests/test_multihost.py; on one process, tests/test_cli.py."""
import jax
import pytest

from omnimoe.train import distributed, preemption


def test_one_process_needs_no_service_and_none_runs_here():
  assert jax.process_count() == 1
  assert preemption.sync_manager_running() is False     # jax.distributed was never initialised
  distributed.check_preemption_service()                 # one process: nothing to agree on
  with preemption.StopFlag() as stop:
    assert stop.at(1) is False


@pytest.mark.parametrize("running", [False, True])
def test_several_processes_without_the_service_are_refused_in_one_line(monkeypatch, running):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption, "sync_manager_running", lambda: running)
  if running:
    distributed.check_preemption_service()
    return
  for start in (distributed.check_preemption_service, preemption.StopFlag().__enter__):
    with pytest.raises(ValueError, match="needs jax's preemption service") as e:
      start()
    assert "\n" not in str(e.value)

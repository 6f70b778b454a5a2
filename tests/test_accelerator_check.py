"""bench/accelerator_check.py on CPU (its bookkeeping: the oracle comparisons through the CPU
paths), that a wrong path fails, and that `auto` picks a hardware path only where it has passed."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import accelerator_check as check
from omnimoe.model import attention, expert_parallel, grouped_matmul, hardware_paths
from omnimoe.model.expert_parallel import Platform


def test_every_cpu_path_passes_against_its_oracle_and_the_json_holds_the_rows(tmp_path, capsys):
  out = tmp_path / "rows.json"
  assert check.main(["--quick", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())
  assert [r["check"] for r in rows] == [
      "gmm:blocked", "gmm:ragged_dot", "attention:xla", "attention:blockwise",
      "dispatch:ragged_all_to_all", "dispatch:all_gather", "bfloat16_step"]
  for r in rows:
    assert r["passed"] and 0 <= r["max_error"] <= r["tolerance"], r
    assert r["platform"] == "cpu" and r["jax"] == jax.__version__ and r["seconds"] > 0
  assert rows[4]["emulated"] is True               # XLA:CPU runs ragged_all_to_all emulated
  printed = capsys.readouterr().out
  assert printed.count(" pass ") == len(rows) and "FAIL" not in printed


def test_a_path_that_is_off_by_a_tenth_of_a_percent_fails(monkeypatch):
  exact = expert_parallel.blocked_swiglu
  monkeypatch.setattr(expert_parallel, "blocked_swiglu", lambda *a: exact(*a) * 1.001)
  row = check.check_gmm("blocked", check.QUICK, jnp.float32)
  assert 5e-4 < row["max_error"] < 5e-3 and row["max_error"] > check.F32_TOL


def test_the_attention_oracle_is_causal_and_keeps_documents_apart():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 4, 2, 3)), jnp.float32) for _ in range(3))
  seg = jnp.asarray([[1, 1, 2, 0]])
  o = np.asarray(check.naive_attention(q, k, v, seg))
  np.testing.assert_allclose(o[0, 0], np.asarray(v)[0, 0], rtol=1e-6)   # sees only itself
  np.testing.assert_allclose(o[0, 2], np.asarray(v)[0, 2], rtol=1e-6)   # a new document
  assert (o[0, 3] == 0).all()                                            # padding


@pytest.fixture
def on_a_gpu(monkeypatch, tmp_path):
  """This process as if on an H200 (jax.default_backend and the record's machine), with an empty
  record of its own."""
  record = tmp_path / "paths.json"
  monkeypatch.setenv("OMNIMOE_HARDWARE_PATHS", str(record))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  machine = {"platform": "gpu", "device_kind": "NVIDIA H200", "jax": jax.__version__}
  monkeypatch.setattr(hardware_paths, "here", lambda: machine)
  hardware_paths._entries.cache_clear()
  yield record, machine
  hardware_paths._entries.cache_clear()


def test_auto_picks_a_hardware_path_only_once_it_passed_here(on_a_gpu):
  record, machine = on_a_gpu
  mesh = jax.make_mesh((1, 1, 8, 1, 1), ("data", "fsdp", "expert", "tensor", "context"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 5)
  resolve = lambda: (grouped_matmul.resolve_backend("auto"),
                     attention.resolve_implementation("auto", 64, jnp.bfloat16, 128),
                     expert_parallel.resolve_dispatch("auto", mesh, 8, Platform()))
  assert resolve() == ("blocked", "xla", "all_gather")        # nothing has passed yet
  # `omnimoe plan --platform gpu` plans the intended path whatever the record says.
  assert expert_parallel.resolve_dispatch("auto", mesh, 8, Platform("gpu")) == "ragged_all_to_all"
  # Passed on another device kind or another jax: still the tested paths.
  elsewhere = [{**machine, "device_kind": "NVIDIA H100", "path": "cudnn", "passed": True},
               {**machine, "jax": "0.0.1", "path": "ragged_dot", "passed": True},
               {**machine, "path": "ragged_all_to_all", "passed": False}]
  hardware_paths.add(elsewhere)
  assert resolve() == ("blocked", "xla", "all_gather")
  hardware_paths.add([{**machine, "path": p, "passed": True}
                      for p in ("ragged_dot", "cudnn", "ragged_all_to_all")])
  assert resolve() == ("ragged_dot", "cudnn", "ragged_all_to_all")
  saved = json.loads(record.read_text())["passed"]
  assert sorted(e["path"] for e in saved) == ["cudnn", "cudnn", "ragged_all_to_all", "ragged_dot",
                                              "ragged_dot"]           # failed rows are not saved
  if grouped_matmul._tokamax() is not None:
    hardware_paths.add([{**machine, "path": "tokamax", "passed": True}])
    assert grouped_matmul.resolve_backend("auto") == "tokamax"


def test_a_broken_record_is_named_in_one_line(on_a_gpu):
  record, _ = on_a_gpu
  record.write_text("not json")
  with pytest.raises(ValueError, match=r"paths.json is not a hardware-path record"):
    grouped_matmul.resolve_backend("auto")


def test_the_benchmarks_import_on_a_machine_without_the_data_pipeline():
  """The lent GPU machine has jax, torch and transformers but no grain, array-record or tokamax:
  the check and the peer's omnimoe side (the train config, state and step) must import there."""
  import subprocess
  import sys
  code = (
      "import importlib.abc, sys\n"
      "class Block(importlib.abc.MetaPathFinder):\n"
      "  def find_spec(self, name, path, target=None):\n"
      "    if name.split('.')[0] in ('grain', 'array_record', 'tokamax'):\n"
      "      raise ImportError('no ' + name + ' on this machine')\n"
      "sys.meta_path.insert(0, Block())\n"
      "import bench.accelerator_check, bench.peer\n"
      "from omnimoe.train import config, state, step\n"
      "config.load(None, ['model.dtype=bfloat16'])\n"
      "from omnimoe import data\n"
      "try:\n"
      "  data.train_iterator\n"
      "except ImportError as e:\n"
      "  print('pipeline needs grain:', e)\n")
  import pathlib
  root = pathlib.Path(check.__file__).resolve().parent.parent
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "pipeline needs grain: no grain on this machine" in done.stdout

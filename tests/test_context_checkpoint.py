"""A checkpoint written by a context-parallel run (data 2 x context 4, ring, balanced rows)
restores onto (data 8) and onto one device, and the next step there has the same loss as the
step the context-parallel run takes itself."""
import jax
import numpy as np
import pytest

from omnimoe import data
from omnimoe.train import config as config_lib
from omnimoe.train import context_batch
from omnimoe.train.checkpoint import Checkpoints
from omnimoe.train.mesh import batch_sharding, global_batch, make_mesh
from omnimoe.train.state import init_state, make_setup
from omnimoe.train.step import make_train_step

TINY = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1",
        "model.head_dim=16", "model.rope_sections=[4,2,2]", "model.moe.num_experts=4",
        "model.moe.expert_hidden=32", "data.seq_len=64", "train.batch_size=8",
        "model.context_parallel=ring", "model.attention=blockwise", "model.attention_block=8"]
CONTEXT = ["mesh.within_rack.data=2", "mesh.within_rack.context=4"]


class Run:
  """A config's mesh, setup and jitted train step; `step` places and balances a host batch."""

  def __init__(self, overrides, devices=None):
    self.cfg = config_lib.load(None, [*TINY, *overrides])
    self.mesh = make_mesh(self.cfg.mesh, devices)
    info = data.dataset_info(self.cfg.data, self.cfg.train.seed)
    self.setup = make_setup(self.cfg, self.mesh, info)
    self.train_step = make_train_step(self.cfg, self.setup,
                                      batch_sharding(self.mesh, self.cfg.data.seq_len))

  def step(self, state, host):
    host = context_batch.prepare(host, self.mesh.shape["context"], self.cfg.train.context_balance)
    return self.train_step(state, global_batch(host, self.mesh))


def test_context_parallel_checkpoint_restores_on_other_meshes(tmp_path):
  it = data.train_iterator(config_lib.load(None, TINY).data, batch_size=8, seed=0)
  batches = [next(it) for _ in range(3)]
  it.close()
  cp = Run(CONTEXT)
  assert dict(cp.mesh.shape)["context"] == 4
  state = init_state(cp.cfg, cp.setup)
  for host in batches[:2]:
    state, _ = cp.step(state, host)
  ckpts = Checkpoints(tmp_path, keep=2, async_save=False)
  ckpts.save(2, state, {"next_example": 0})
  ckpts.wait()
  state, metrics = cp.step(state, batches[2])
  want = float(metrics["loss"])
  for overrides, devices in ((["mesh.within_rack.data=8"], None), ([], jax.devices()[:1])):
    run = Run(overrides, devices)
    restored, data_state = ckpts.restore(2, run.setup)
    assert data_state == {"next_example": 0} and int(restored["step"]) == 2
    _, metrics = run.step(restored, batches[2])
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5), run.mesh.shape
  ckpts.close()

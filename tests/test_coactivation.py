"""Co-activation statistics (train/coactivation.py) against float64 recounts by loops
(tests/oracles.py: each MoE layer's inputs recorded, its routing redone in numpy, pairs counted)."""
import jax
import numpy as np
import pytest

from omnimoe import data
from omnimoe.train import coactivation
from omnimoe.train.checkpoint import Checkpoints
from omnimoe.train.evaluate import load_eval_data
from omnimoe.train.mesh import global_batch, make_mesh
from omnimoe.train.state import eval_params, init_state, make_setup
from oracles import moe_inputs, recount_coactivation, routed_expert_sets
from placement_run import STEPS, config, trained_workdir


def _setup(cfg):
  mesh = make_mesh(cfg.mesh)
  return mesh, make_setup(cfg, mesh, data.dataset_info(cfg.data, cfg.train.seed))


def _recount(cfg, setup, params, batch, router=None):
  """Per MoE layer: (oracle counts [4, E, E], oracle expert sets of every token)."""
  moe, E = cfg.model.moe, cfg.model.moe.num_experts
  counts, sets = [], []
  for m, (x, seg, mod, threshold) in enumerate(moe_inputs(setup.graphdef, params, batch, router)):
    block = params["blocks"][cfg.model.num_dense_layers + m]["moe"]
    kw = (dict(top_k=moe.top_k) if moe.router == "topk" else
          dict(threshold=float(threshold), k_min=moe.k_min, k_max=moe.k_max))
    layer_sets = routed_expert_sets(x.reshape(-1, x.shape[-1]), block["router_DxE"], **kw)
    counts.append(recount_coactivation(layer_sets, seg, mod, E))
    sets.append([s for s, g in zip(layer_sets, np.asarray(seg).reshape(-1)) if g > 0])
  return np.asarray(counts), sets


@pytest.mark.parametrize("router", ["topk", "dynamic"])
def test_counts_and_choices_equal_a_recount_from_the_routing(router):
  cfg = config(f"model.moe.router={router}", "model.moe.threshold_init=0.6")
  mesh, setup = _setup(cfg)
  params = init_state(cfg, setup)["params"]
  batch = global_batch(next(data.train_iterator(cfg.data, batch_size=cfg.train.batch_size,
                                                seed=cfg.train.seed)), mesh)
  step = coactivation.make_routing_step(setup)
  counts, choices = coactivation.heldout_statistics(step, params, [batch], None)
  want, want_sets = _recount(cfg, setup, params, batch)
  assert counts.shape == (2, 4, 8, 8) and want[:, :2].sum() > 0   # text and image tokens present
  np.testing.assert_array_equal(counts, want)
  for layer_choices, layer_sets in zip(choices, want_sets, strict=True):
    got = [set(int(e) for e in row if e >= 0) for row in layer_choices]
    assert got == layer_sets
  if router == "dynamic":        # tokens took 1..4 experts, not a fixed number
    assert len({len(s) for s in want_sets[0]}) > 1


def test_a_training_run_saves_train_and_heldout_counts_at_its_evaluation():
  cfg, workdir = config(), trained_workdir()
  stats = coactivation.load(workdir)
  assert int(stats["step"]) == STEPS and int(stats["train_steps"]) == STEPS
  np.testing.assert_array_equal(stats["moe_layers"], [0, 1])
  mesh, setup = _setup(cfg)
  # train: the steps' own counts, each recounted from the parameters that step started from
  states = [init_state(cfg, setup)]
  ckpts = Checkpoints(workdir / "checkpoints", keep=5, async_save=False)
  states += [ckpts.restore(s, setup)[0] for s in range(1, STEPS + 1)]
  ckpts.close()
  it = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  want = sum(_recount(cfg, setup, states[s]["params"], global_batch(next(it), mesh))[0]
             for s in range(STEPS))
  np.testing.assert_array_equal(stats["train"], want)
  # held-out: the eval batches at the weights evaluation uses after the last step (the moving
  # average, train.ema_decay)
  assert "ema" in states[-1]
  batches = load_eval_data(cfg).mixed
  recounts = [_recount(cfg, setup, eval_params(states[-1]), b) for b in batches]
  np.testing.assert_array_equal(stats["heldout"], sum(c for c, _ in recounts))
  want_sets = [sum((s[m] for _, s in recounts), []) for m in range(2)]
  got_sets = [[set(int(e) for e in row if e >= 0) for row in layer]
              for layer in stats["heldout_choices"]]
  assert got_sets == want_sets


def test_microbatches_sum_the_counts():
  from omnimoe.train.step import accumulated_grads
  import functools
  got = {}
  for M in (1, 2):
    cfg = config(f"train.microbatches={M}", "model.num_layers=1")
    mesh, setup = _setup(cfg)
    params = init_state(cfg, setup)["params"]
    batch = global_batch(next(data.train_iterator(cfg.data, batch_size=cfg.train.batch_size,
                                                  seed=cfg.train.seed)), mesh)
    fn = jax.jit(functools.partial(accumulated_grads, setup=setup, cfg=cfg))
    got[M] = np.asarray(fn(params, batch, None)[0][1]["coactivation_by_modality"])
  assert got[1].sum() > 0
  np.testing.assert_array_equal(got[2], got[1])


def test_a_workdir_without_statistics_is_refused_in_one_line(tmp_path):
  with pytest.raises(coactivation.StatisticsError) as e:
    coactivation.load(tmp_path)
  assert "\n" not in str(e.value) and "omnimoe train" in str(e.value)

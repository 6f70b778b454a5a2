"""Expert placement: the balanced partition against brute force, the scores against loops, the
permuted state against the original (same losses, same generations, training continues the same),
and `omnimoe placement` end to end with its bad inputs."""
import functools
import itertools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe import data
from omnimoe.train import coactivation, loop, media_spans, partition, permute
from omnimoe.train.checkpoint import Checkpoints
from omnimoe.train.cli import main
from omnimoe.train.evaluate import load_eval_data, make_greedy_decode
from omnimoe.train.mesh import make_mesh
from omnimoe.train.state import init_state, make_setup
from omnimoe.train.step import make_eval_step
from placement_run import STEPS, config, trained_workdir


def balanced_partitions(E: int, G: int):
  """Every split of range(E) into G unordered groups of E / G, as a group id per expert."""
  def split(rest):
    if not rest:
      yield []
      return
    first, others = rest[0], rest[1:]
    for mates in itertools.combinations(others, E // G - 1):
      left = [e for e in others if e not in mates]
      for tail in split(left):
        yield [(first, *mates), *tail]
  for groups in split(list(range(E))):
    g_E = np.empty(E, int)
    for g, members in enumerate(groups):
      g_E[list(members)] = g
    yield g_E


def pair_weight(W, g_E):
  return sum(W[i, j] + W[j, i] for i in range(len(g_E)) for j in range(i + 1, len(g_E))
             if g_E[i] == g_E[j])


@pytest.mark.parametrize("G", [2, 4])
def test_partition_is_balanced_and_finds_the_best_by_brute_force(G):
  rng = np.random.default_rng(G)
  for _ in range(5):
    W = rng.gamma(0.5, size=(8, 8))
    best = max(pair_weight(W, g) for g in balanced_partitions(8, G))
    got = partition.partition(W, G)
    assert sorted(np.bincount(got, minlength=G)) == [8 // G] * G
    assert pair_weight(W, got) == pytest.approx(best, rel=1e-12)


def test_partition_recovers_planted_groups_of_sixteen():
  rng = np.random.default_rng(0)
  planted = rng.permutation(np.arange(16) % 4)
  W = rng.uniform(0, 1, (16, 16)) + 20 * (planted[:, None] == planted[None, :])
  got = partition.partition(W, 4)
  assert len({(a, b) for a, b in zip(planted, got)}) == 4          # the same four groups


def test_scores_equal_a_count_token_by_token():
  rng = np.random.default_rng(1)
  choices = rng.integers(0, 8, (200, 3))
  choices[rng.uniform(size=choices.shape) < 0.3] = -1
  choices[:, 0] = rng.integers(0, 8, 200)
  g_E = rng.permutation(np.arange(8) % 4)
  n = [len({g_E[e] for e in row if e >= 0}) for row in choices]
  got = partition.score(choices, g_E, row_bytes=10)
  assert got["span_share"] == pytest.approx(np.mean([k > 1 for k in n]))
  assert got["groups_per_token"] == pytest.approx(np.mean(n))
  assert got["bytes_per_token"] == pytest.approx(2 * 10 * np.mean(n) * 3 / 4)
  order = partition.order(g_E)
  assert list(g_E[order]) == sorted(g_E)


@functools.cache
def _setup(*extra):
  cfg = config(*extra)
  mesh = make_mesh(cfg.mesh)
  info = data.dataset_info(cfg.data, cfg.train.seed)
  return cfg, make_setup(cfg, mesh, info), info


def _outputs(cfg, setup, info, state):
  """(eval loss over the held-out batches, greedy tokens for the image prompts)."""
  step = make_eval_step(cfg, setup, lambda ids: info.vocab.modality_of(ids, xp=jnp,
                                                                        specials_as_text=True))
  sums = [jax.device_get(step(state["params"], b, state.get("router")))
          for b in load_eval_data(cfg).mixed]
  loss = sum(float(s["ce_sum"]) for s in sums) / sum(float(s["weight_sum"]) for s in sums)
  prompts = data.prompt_set(cfg.data, modality="image", seed=0, max_new_tokens=3, limit=8)
  decode = make_greedy_decode(setup, media_spans.spans_for(info.vocab, cfg.data),
                              prompt_len=prompts.prompt_len, max_new_tokens=3)
  batch = {k: jnp.asarray(v) for k, v in prompts.batch.items()}
  return loss, np.asarray(decode(state["params"], batch, jnp.asarray(prompts.next_position),
                                 state.get("router")))


@pytest.mark.parametrize("extra", [(), ("model.scan_layers=true", "model.num_layers=3",
                                        "model.num_dense_layers=1", "model.moe.router=dynamic",
                                        "model.moe.bias_update_rate=0.01")])
def test_a_permuted_state_gives_the_same_loss_and_generations(extra):
  cfg, setup, info = _setup(*extra)
  state = init_state(cfg, setup)
  if "router" in state and "bias" in state["router"]:       # a bias that changes the routing
    bias = jax.random.normal(jax.random.PRNGKey(3), state["router"]["bias"].shape) * 0.05
    state = dict(state, router=dict(state["router"], bias=bias))
  rng = np.random.default_rng(0)
  perms = np.stack([rng.permutation(8) for _ in range(2)])
  placed = permute.permute_state(state, perms, num_dense_layers=cfg.model.num_dense_layers,
                                 optimizer=setup.optimizer)
  loss, tokens = _outputs(cfg, setup, info, state)
  placed_loss, placed_tokens = _outputs(cfg, setup, info, placed)
  assert placed_loss == pytest.approx(loss, rel=1e-6, abs=0)
  np.testing.assert_array_equal(placed_tokens, tokens)
  if "bias" in state.get("router", {}):      # the bias left unmoved changes the loss
    unmoved = dict(placed, router=state["router"])
    assert _outputs(cfg, setup, info, unmoved)[0] != pytest.approx(loss, rel=1e-6, abs=0)


@pytest.fixture(scope="module")
def placed(tmp_path_factory):
  out = tmp_path_factory.mktemp("placed") / "run-g4"
  assert main(["placement", "--workdir", str(trained_workdir()), "--groups", "4",
               "--out", str(out)]) == 0
  return out


def test_placement_writes_a_run_whose_experts_are_grouped_as_reported(placed, capsys):
  report = json.loads((placed / "placement.json").read_text())
  stats = coactivation.load(trained_workdir())
  perms = np.asarray(report["permutations"])
  assert report["step"] == STEPS and perms.shape == (2, 8)
  for m, perm in enumerate(perms):
    assert sorted(perm) == list(range(8))
    fit = partition.partition(stats["train"][m].sum(axis=0), 4)
    assert list(fit[perm]) == sorted(fit)                    # the fitted groups made consecutive
    learned = report["layers"][m]["learned"]
    assert learned == partition.score(stats["heldout_choices"][m], fit, row_bytes=32 * 4)
  moved = coactivation.load(placed)
  np.testing.assert_array_equal(moved["heldout"][0], stats["heldout"][0][:, perms[0]][:, :, perms[0]])
  assert (placed / "coactivation.png").stat().st_size > 0


def test_the_placed_checkpoint_evaluates_the_same_and_trains_on_identically(placed, tmp_path):
  cfg, setup, info = _setup()
  restore = lambda wd, step: Checkpoints(wd / "checkpoints", keep=5, async_save=False).restore(
      step, setup)[0]
  original, moved = restore(trained_workdir(), STEPS), restore(placed, STEPS)
  loss, tokens = _outputs(cfg, setup, info, original)
  moved_loss, moved_tokens = _outputs(cfg, setup, info, moved)
  assert moved_loss == pytest.approx(loss, rel=1e-6, abs=0)
  np.testing.assert_array_equal(moved_tokens, tokens)
  # one more step from each (the optimizer's moments were permuted too): the same step, renumbered
  copy = tmp_path / "original"
  shutil.copytree(trained_workdir(), copy)
  more = config(f"train.steps={STEPS + 1}", f"eval.every_steps={STEPS + 1}")
  for wd in (copy, placed):
    loop.train(more, wd, progress=False)
  perms = np.asarray(json.loads((placed / "placement.json").read_text())["permutations"])
  want = permute.permute_state(restore(copy, STEPS + 1), perms, num_dense_layers=0,
                               optimizer=setup.optimizer)
  got = restore(placed, STEPS + 1)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want["params"]),
                          jax.tree.leaves(got["params"])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("case", ["groups", "statistics", "checkpoint"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
  wd = tmp_path / "run"
  shutil.copytree(trained_workdir(), wd)
  groups = "3" if case == "groups" else "2"
  if case == "statistics":
    (wd / coactivation.FILENAME).unlink()
  if case == "checkpoint":
    shutil.rmtree(wd / "checkpoints")
  assert main(["placement", "--workdir", str(wd), "--groups", groups]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.startswith("omnimoe: error:")
  assert {"groups": "--groups 3 must divide", "statistics": "no co-activation statistics",
          "checkpoint": "no checkpoint"}[case] in err


def test_plan_shows_the_exchange_bytes_a_placement_implies(placed):
  """`omnimoe plan --platform gpu --placement`: the emulated (worst-case) all-to-all x the devices
  a held-out token reached under each placement / the 4 expert devices."""
  from omnimoe.train.config import ConfigError
  from omnimoe.train.plan import plan
  report = json.loads((placed / "placement.json").read_text())
  p = plan(config("mesh.within_rack.data=2", "mesh.within_rack.expert=4"), "gpu", report)
  a2a = p["collective_bytes_per_device_per_step"]["all-to-all"]
  assert a2a > 0 and set(p["placement_expected_bytes"]) == {"identity", "random", "learned"}
  for name, got in p["placement_expected_bytes"].items():
    assert got == int(a2a * report["mean"][name]["groups_per_token"] / 4), name
  with pytest.raises(ConfigError, match="mesh.within_rack.expert=4"):
    plan(config("mesh.within_rack.data=4", "mesh.within_rack.expert=2"), "gpu", report)

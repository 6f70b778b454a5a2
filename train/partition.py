"""Balanced partitions of one layer's experts into groups that are used together, and their scores
(numpy only).

`partition(W_ExE, G)`: E experts into G groups of exactly E / G, maximising the co-activation
weight inside groups (sum of W[i, j] over pairs i < j of the same group). Exact balance is the
constraint that matters: a group is one device's (or one rack's) experts, and every device holds the
same number. That rules out the clustering at hand: scikit-learn's spectral clustering and
agglomerative clustering give groups of any size, networkx's Kernighan-Lin only bisects, and METIS
(not a dependency) balances within a tolerance, not exactly. The search is small (E is at most a few
hundred), so it is done here:

  1. start points: a greedy fill (the expert most co-activated with the unplaced ones opens a group,
     then the unplaced expert most co-activated with the group joins it until it holds E / G), and
     `restarts` random balanced assignments;
  2. from each, pairwise swaps in the manner of Kernighan-Lin: the swap of two experts of different
     groups that gains the most within-group weight is made while it gains anything (a swap keeps
     the groups balanced); the best local optimum over all starts is returned.

Scores (`spans`, `score`) are counted token by token from the experts each token took: the share of
tokens whose experts lie in more than one group, and the all-to-all traffic of an expert-parallel
layer that sends a token once to each group holding one of its experts (omnimoe's all_to_all and
ragged_all_to_all rows: model/expert_parallel.py): with the token's own device uniformly one of the G,
(G - 1) / G of those rows leave it, there and back.
"""
import numpy as np


def within_weight(W_ExE: np.ndarray, group_E: np.ndarray) -> float:
  """Sum of W[i, j] over pairs i < j in the same group (W symmetric; its diagonal is ignored)."""
  same = group_E[:, None] == group_E[None, :]
  return float(np.sum(np.triu(np.where(same, W_ExE, 0.0), 1)))


def _greedy(W_ExE: np.ndarray, G: int) -> np.ndarray:
  E = len(W_ExE)
  size, group_E = E // G, np.full(E, -1)
  for g in range(G):
    free = np.flatnonzero(group_E < 0)
    first = free[np.argmax(W_ExE[np.ix_(free, free)].sum(axis=1))]
    group_E[first] = g
    for _ in range(size - 1):
      free = np.flatnonzero(group_E < 0)
      group_E[free[np.argmax(W_ExE[np.ix_(free, group_E == g)].sum(axis=1))]] = g
  return group_E


def _swaps(W_ExE: np.ndarray, group_E: np.ndarray, G: int) -> np.ndarray:
  """Best-gain pairwise swaps until none gains (the module docstring's step 2)."""
  group_E = group_E.copy()
  E = len(W_ExE)
  for _ in range(E * E):                                  # a bound; each swap gains > 0
    S_ExG = W_ExE @ np.eye(G)[group_E]                    # weight from each expert to each group
    own_E = S_ExG[np.arange(E), group_E]
    to_other_ExE = S_ExG[:, group_E]                      # [i, j]: weight from i to j's group
    gain_ExE = to_other_ExE - own_E[:, None] + to_other_ExE.T - own_E[None, :] - 2 * W_ExE
    gain_ExE = np.where(group_E[:, None] != group_E[None, :], gain_ExE, -np.inf)
    i, j = np.unravel_index(np.argmax(gain_ExE), gain_ExE.shape)
    if not gain_ExE[i, j] > 1e-9 * max(float(np.abs(W_ExE).max()), 1e-300):
      break
    group_E[i], group_E[j] = group_E[j], group_E[i]
  return group_E


def partition(W_ExE: np.ndarray, G: int, *, restarts: int = 16, seed: int = 0) -> np.ndarray:
  """The group (0..G-1) of each expert: G groups of E / G, within-group weight maximised by the
  search in the module docstring. W is made symmetric and its diagonal dropped first."""
  W_ExE = np.asarray(W_ExE, np.float64)
  E = len(W_ExE)
  if G < 1 or E % G:
    raise ValueError(f"{G} groups do not divide {E} experts")
  W_ExE = W_ExE + W_ExE.T
  np.fill_diagonal(W_ExE, 0.0)
  rng = np.random.default_rng(seed)
  starts = [_greedy(W_ExE, G)] + [rng.permutation(np.arange(E) % G) for _ in range(restarts)]
  found = [_swaps(W_ExE, s, G) for s in starts]
  return found[int(np.argmax([within_weight(W_ExE, f) for f in found]))]


def identity_groups(E: int, G: int) -> np.ndarray:
  """Groups of consecutive experts, as omnimoe lays experts out (expert e in group e // (E / G))."""
  return np.arange(E) // (E // G)


def order(group_E: np.ndarray) -> np.ndarray:
  """The permutation that makes groups consecutive: new expert j is old expert order[j] (group 0's
  experts first, each group's by old index)."""
  return np.argsort(group_E, kind="stable")


def spans(choices_NxK: np.ndarray, group_E: np.ndarray) -> np.ndarray:
  """How many groups each token's experts lie in, int [N] (choices: expert ids, -1 = unused)."""
  taken_NxK = choices_NxK >= 0
  g_NxK = np.where(taken_NxK, group_E[np.maximum(choices_NxK, 0)], -1)
  onehot_NxG = np.zeros((len(choices_NxK), group_E.max() + 1), bool)
  rows = np.repeat(np.arange(len(choices_NxK)), choices_NxK.shape[1])
  keep = g_NxK.reshape(-1) >= 0
  onehot_NxG[rows[keep], g_NxK.reshape(-1)[keep]] = True
  return onehot_NxG.sum(axis=1)


def score(choices_NxK: np.ndarray, group_E: np.ndarray, *, row_bytes: int) -> dict:
  """{"span_share": share of tokens in more than one group, "groups_per_token": mean groups a
  token's experts lie in, "bytes_per_token": expected all-to-all bytes per token, there and back,
  of rows of `row_bytes` (d_model x activation bytes)}."""
  n_N = spans(choices_NxK, group_E)
  G = int(group_E.max()) + 1
  return {"span_share": float(np.mean(n_N > 1)), "groups_per_token": float(np.mean(n_N)),
          "bytes_per_token": float(2 * row_bytes * np.mean(n_N) * (G - 1) / G)}


def random_groups(E: int, G: int, count: int, seed: int = 0) -> list[np.ndarray]:
  """`count` balanced placements drawn uniformly (random permutations of the identity's groups)."""
  rng = np.random.default_rng(seed)
  return [rng.permutation(identity_groups(E, G)) for _ in range(count)]

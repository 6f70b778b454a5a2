"""The ragged exchange of model/expert_parallel.py's ragged_all_to_all mode, over the `expert` axis
inside `jax.shard_map`.

Each device's rows for device d lie back to back; `ragged_layout` trades their sizes and offsets
(three small all_to_alls) into a `Ragged`, `ragged_exchange` moves the rows with
jax.lax.ragged_all_to_all and its gradient is the reverse exchange (`Ragged.reverse`, custom VJP).
XLA:CPU does not implement the collective: with `emulate` it runs as a padded all_to_all of the
same semantics (`cap` rows at most per pair), so the bookkeeping runs on CPU (the tests,
`omnimoe plan --platform gpu`).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Ragged(NamedTuple):
  """One ragged exchange over `expert`: my rows [offsets[d], + sizes[d]) go to device d, landing
  at its rows [there[d], + sizes[d]); device s sends me recv[s] rows, landing at my rows
  [landing[s], + recv[s]), from its rows [back[s], + recv[s])."""
  offsets_G: jax.Array
  sizes_G: jax.Array
  there_G: jax.Array
  recv_G: jax.Array
  landing_G: jax.Array
  back_G: jax.Array

  def reverse(self) -> "Ragged":
    """The exchange that sends every row back where it came from."""
    return Ragged(self.landing_G, self.recv_G, self.back_G, self.sizes_G, self.offsets_G,
                  self.there_G)


def ragged_layout(sizes_G) -> Ragged:
  """The exchange of my rows for device d, packed back to back: sizes and offsets traded by
  small all_to_alls."""
  a2a = lambda a: jax.lax.all_to_all(a, "expert", 0, 0, tiled=True)
  offsets_G = jnp.cumsum(sizes_G) - sizes_G           # my rows for device d start here
  recv_G = a2a(sizes_G)                               # rows each device sends me
  landing_G = jnp.cumsum(recv_G) - recv_G             # where device s's rows land in mine
  there_G = a2a(landing_G)                            # where my rows land on device d
  came_from_G = a2a(offsets_G)                        # where device s's rows to me start
  return Ragged(offsets_G, sizes_G, there_G, recv_G, landing_G, came_from_G)


def ragged_all_to_all(x_NxD, out_MxD, r: Ragged, cap: int, emulate: bool):
  """Rows [offsets[d], + sizes[d]) go to device d, written there at rows [there[d], + sizes[d])
  of `out` (the rest of `out` unchanged): jax.lax.ragged_all_to_all, or its emulation."""
  if not emulate:
    return jax.lax.ragged_all_to_all(x_NxD, out_MxD, r.offsets_G, r.sizes_G, r.there_G, r.recv_G,
                                     axis_name="expert")
  return _emulated(x_NxD, out_MxD, r, cap)


def _emulated(x_NxD, out_MxD, r: Ragged, cap: int):
  """The semantics of jax.lax.ragged_all_to_all over `expert` from a padded all_to_all (`cap`
  rows at most per pair), for XLA:CPU."""
  i_C = jnp.arange(cap)
  take_GxC = jnp.where(i_C < r.sizes_G[:, None], r.offsets_G[:, None] + i_C, x_NxD.shape[0])
  blocks = jnp.take(x_NxD, take_GxC.reshape(-1), axis=0, mode="fill", fill_value=0)
  got = jax.lax.all_to_all(blocks, "expert", 0, 0, tiled=True)        # [G * cap, ...] by sender
  at_G = jax.lax.all_to_all(r.there_G, "expert", 0, 0, tiled=True)   # where sender s writes
  put_GxC = jnp.where(i_C < r.recv_G[:, None], at_G[:, None] + i_C, out_MxD.shape[0])
  return out_MxD.at[put_GxC.reshape(-1)].set(got, mode="drop")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def ragged_exchange(x_NxD, r: Ragged, n_out: int, cap: int, emulate: bool):
  """A differentiable ragged exchange into `n_out` zero rows (see `ragged_all_to_all`); the
  gradient is the reverse exchange."""
  out = jnp.zeros((n_out,) + x_NxD.shape[1:], x_NxD.dtype)
  return ragged_all_to_all(x_NxD, out, r, cap, emulate)


def _ragged_exchange_fwd(x_NxD, r, n_out, cap, emulate):
  return ragged_exchange(x_NxD, r, n_out, cap, emulate), (x_NxD.shape[0], r)


def _ragged_exchange_bwd(n_out, cap, emulate, res, dy_MxD):
  """What device s wrote into my rows [landing[s], + recv[s]) goes back to its rows
  [back[s], + recv[s])."""
  n, r = res
  out = jnp.zeros((n,) + dy_MxD.shape[1:], dy_MxD.dtype)
  dx = ragged_all_to_all(dy_MxD, out, r.reverse(), cap, emulate)
  return dx, jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), r)


ragged_exchange.defvjp(_ragged_exchange_fwd, _ragged_exchange_bwd)

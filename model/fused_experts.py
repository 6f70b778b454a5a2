"""The blocked backend's whole SwiGLU expert in one tile loop: gate, up, SiLU, product and down
projection of a tile of rows stay in cache, and the backward recomputes them per tile.

`blocked_swiglu(x_RxD, w_gate, w_up, w_down, tiles)` equals
`matmul(silu(matmul(x, w_gate)) * matmul(x, w_up), w_down)` with the blocked matmul of
model/grouped_matmul.py (the same tile table and row layout), but where that runs three tile loops
and makes the elementwise passes over whole [R, H] arrays, this makes one pass per tile (measured on
XLA:CPU: those passes are memory-bound, and they were most of a dense SwiGLU's backward). Its
backward is one more tile loop that recomputes the tile's gate and up (no [R, H] activations are
kept for it) and adds x^T da, x^T db and h^T dy into the expert's slices of the weight gradients in
place, in the weights' dtype with float32 products (as the blocked matmul does).
"""
import jax
import jax.numpy as jnp

from omnimoe.model.grouped_matmul import Tiles, _expert, _tile, _update_rows, _zeros


def _tile_rows(x_RxD, s, br, m=None):
  rows = jax.lax.dynamic_slice_in_dim(x_RxD, s, br)
  return rows if m is None else jnp.where(m, rows, 0)


@jax.custom_vjp
def blocked_swiglu(x_RxD, w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD, tiles: Tiles):
  """Row r -> SwiGLU of its expert (rows covered by the tiles in use; 0 elsewhere), x's dtype."""
  R, br = x_RxD.shape[0], tiles.block_rows
  cast = lambda w, e: _expert(w, e).astype(x_RxD.dtype)

  def body(t, y_RxD):
    e, s, m = _tile(tiles, t, R)
    x_BxD = _tile_rows(x_RxD, s, br)
    h_BxH = jax.nn.silu(x_BxD @ cast(w_gate_ExDxH, e)) * (x_BxD @ cast(w_up_ExDxH, e))
    return _update_rows(y_RxD, s, m, h_BxH @ cast(w_down_ExHxD, e))

  y0 = _zeros(x_RxD.shape, x_RxD.dtype, w_down_ExHxD)
  return jax.lax.fori_loop(0, tiles.used, body, y0)


def _fwd(x_RxD, w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD, tiles):
  y = blocked_swiglu(x_RxD, w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD, tiles)
  return y, (x_RxD, w_gate_ExDxH, w_up_ExDxH, w_down_ExHxD, tiles)


def _bwd(res, dy_RxD):
  x_RxD, w_gate, w_up, w_down, tiles = res
  R, br = x_RxD.shape[0], tiles.block_rows
  dt = dy_RxD.dtype
  f32 = dict(preferred_element_type=jnp.float32)
  tn = (((0,), (0,)), ((), ()))      # a^T b over the tile's rows

  def add(dw, e, g):
    return jax.lax.dynamic_update_index_in_dim(dw, _expert(dw, e) + g.astype(dw.dtype), e, 0)

  def body(t, carry):
    dx_RxD, dwg, dwu, dwd = carry
    e, s, m = _tile(tiles, t, R)
    wg, wu, wd = (_expert(w, e).astype(dt) for w in (w_gate, w_up, w_down))
    # Rows outside the tile's group are zeroed in both inputs: they add nothing to the expert's
    # gradients (and a non-finite value in another group's row cannot leak in as 0 * inf).
    x_BxD = _tile_rows(x_RxD, s, br, m).astype(dt)
    dy_BxD = _tile_rows(dy_RxD, s, br, m)
    a_BxH, b_BxH = x_BxD @ wg, x_BxD @ wu
    sig = jax.nn.sigmoid(a_BxH)
    silu = a_BxH * sig
    dh_BxH = jax.lax.dot_general(dy_BxD, wd, (((1,), (1,)), ((), ())))
    db_BxH = dh_BxH * silu
    da_BxH = dh_BxH * b_BxH * (sig * (1 + a_BxH * (1 - sig)))
    dx_BxD = (jax.lax.dot_general(da_BxH, wg, (((1,), (1,)), ((), ())))
              + jax.lax.dot_general(db_BxH, wu, (((1,), (1,)), ((), ()))))
    dwg = add(dwg, e, jax.lax.dot_general(x_BxD, da_BxH, tn, **f32))
    dwu = add(dwu, e, jax.lax.dot_general(x_BxD, db_BxH, tn, **f32))
    dwd = add(dwd, e, jax.lax.dot_general(silu * b_BxH, dy_BxD, tn, **f32))
    return _update_rows(dx_RxD, s, m, dx_BxD.astype(x_RxD.dtype)), dwg, dwu, dwd

  zeros = (_zeros(x_RxD.shape, x_RxD.dtype, dy_RxD),
           *(_zeros(w.shape, w.dtype, w) for w in (w_gate, w_up, w_down)))
  dx, dwg, dwu, dwd = jax.lax.fori_loop(0, tiles.used, body, zeros)
  return dx, dwg, dwu, dwd, None


blocked_swiglu.defvjp(_fwd, _bwd)

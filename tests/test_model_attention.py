"""attend: blockwise and xla == float64 oracles (a per-query loop; dense numpy gradients), with packed
segments, padding, GQA and ragged lengths; blockwise skips the block pairs the mask hides."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracles import attention_oracle
from omnimoe.model.attention import attend, resolve_implementation
from omnimoe.model.blockwise_attention import blocks_computed

B, L, H, KV, D = 2, 50, 4, 2, 8


def _inputs():
  kq, kk, kv, kr = jax.random.split(jax.random.key(0), 4)
  seg = np.zeros((B, L), np.int32)
  seg[0, :20], seg[0, 20:45] = 1, 2           # two documents, 5 padding positions
  seg[1, :30], seg[1, 30:33], seg[1, 33:40] = 1, 2, 3
  return (jax.random.normal(kq, (B, L, H, D)), jax.random.normal(kk, (B, L, KV, D)),
          jax.random.normal(kv, (B, L, KV, D)), jnp.asarray(seg),
          jax.random.normal(kr, (B, L, H, D)))


def _naive(q, k, v, seg):
  q, k, v, seg = (np.asarray(a, np.float64) for a in (q, k, v, seg))
  out = np.zeros(q.shape)
  for b in range(B):
    for i in range(L):
      if seg[b, i] == 0:
        continue
      keys = [j for j in range(i + 1) if seg[b, j] == seg[b, i]]
      for h in range(H):
        kh = h // (H // KV)
        s = np.array([q[b, i, h] @ k[b, j, kh] for j in keys]) / np.sqrt(D)
        p = np.exp(s - s.max())
        out[b, i, h] = (p / p.sum()) @ v[b, keys, kh]
  return out


def _run(impl, block):
  q, k, v, seg, r = _inputs()

  def loss(q, k, v):
    o = attend(q, k, v, seg, implementation=impl, block=block)
    return jnp.sum(o * r), o
  return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)


def test_xla_matches_naive_reference():
  q, k, v, seg, _ = _inputs()
  np.testing.assert_allclose(attend(q, k, v, seg, implementation="xla"), _naive(q, k, v, seg),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_padding_rows_are_zero_and_finite(impl):
  (_, o), grads = _run(impl, 16)
  _, _, _, seg, _ = _inputs()
  assert np.all(np.isfinite(o)) and all(np.all(np.isfinite(g)) for g in grads)
  pad = np.asarray(seg) == 0
  assert np.all(np.asarray(o)[pad] == 0)
  # Padding keys/values get no gradient: nothing valid attends to them.
  assert np.all(np.asarray(grads[1])[pad] == 0) and np.all(np.asarray(grads[2])[pad] == 0)


def _segments(kind, b, n):
  """Segment ids of one row of length n: packed documents with padding, one document, interleaved."""
  if kind == "packed":
    cuts = [(0, 1), (n // 3, 2), (n // 3 + 3, 3), (n - n // 6, 0)] if b else [(0, 1), (2 * n // 5, 2),
                                                                            (n - 5, 0)]
    seg = np.zeros(n, np.int32)
    for (start, sid), (end, _) in zip(cuts, cuts[1:] + [(n, 0)]):
      seg[start:end] = sid
    return seg
  if kind == "one":
    return np.ones(n, np.int32)
  return np.where(np.arange(n) % 5 == 4, 0, 1 + np.arange(n) % 2).astype(np.int32)  # interleaved


def _case(n, h, kv, kind, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(n * 100 + h * 10 + kv), 4)
  seg = np.stack([_segments(kind, b, n) for b in range(2)])
  return (jax.random.normal(keys[0], (2, n, h, D), dtype), jax.random.normal(keys[1], (2, n, kv, D), dtype),
          jax.random.normal(keys[2], (2, n, kv, D), dtype), jnp.asarray(seg),
          jax.random.normal(keys[3], (2, n, h, D), dtype))


def _check(impl, block, q, k, v, seg, r, tol=1e-5):
  def loss(q, k, v):
    o = attend(q, k, v, seg, implementation=impl, block=block)
    return jnp.sum(o * r), o
  (_, o), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  order = np.broadcast_to(np.arange(q.shape[1]), np.shape(seg))   # array order
  want_o, want_g = attention_oracle(q, k, v, seg, order, r)
  np.testing.assert_allclose(o, want_o, rtol=tol, atol=tol)
  for got, want, name in zip(grads, want_g, "qkv"):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_matches_float64_oracle(impl):
  _check(impl, 16, *_case(50, 4, 2, "packed"))


@pytest.mark.parametrize("block,n,h,kv,kind", [
    (16, 50, 4, 2, "packed"), (7, 50, 4, 2, "packed"), (64, 50, 4, 2, "packed"),
    (5, 37, 4, 1, "packed"), (8, 64, 2, 2, "one"), (9, 64, 4, 2, "one"), (6, 40, 4, 2, "interleaved"),
    (1, 12, 2, 1, "packed")])
def test_blockwise_matches_float64_oracle(block, n, h, kv, kind):
  _check("blockwise", block, *_case(n, h, kv, kind))


def _visible_pairs(seg, block):
  """Plain loop: (query block, key block) pairs with at least one visible (query, key) pair."""
  n = seg.shape[1]
  nb = -(-n // block)
  count = 0
  for i in range(nb):
    for j in range(i + 1):
      count += any(seg[b, x] > 0 and seg[b, x] == seg[b, y] and y <= x
                   for b in range(seg.shape[0]) for x in range(i * block, min(n, (i + 1) * block))
                   for y in range(j * block, min(n, (j + 1) * block)))
  return count


@pytest.mark.parametrize("kind,want", [("one", 36), ("halves", 20), ("padded", 11)])
def test_blockwise_skips_hidden_block_pairs(kind, want):
  """8 blocks of 8: causal computes 36 of 64 pairs; segments that split the row compute fewer."""
  seg = np.ones((1, 64), np.int32)
  if kind == "halves":
    seg[0, 32:] = 2               # two documents of 4 blocks: 10 + 10 pairs
  if kind == "padded":
    seg[0, 20:40] = 2             # documents on blocks 0-2 and 2-4 (6 + 6 - 1 shared), then padding
    seg[0, 40:] = 0
  q = jax.random.normal(jax.random.key(1), (1, 64, 2, D))
  kv = jax.random.normal(jax.random.key(2), (1, 64, 1, D))
  fwd, bwd = jax.jit(blocks_computed, static_argnums=4)(q, kv, kv, jnp.asarray(seg), 8)
  assert fwd.tolist() == bwd.tolist() == [36, want]    # loops stop at the diagonal; cond skips
  assert want == _visible_pairs(seg, 8)


def test_auto_and_errors():
  assert resolve_implementation("auto", 128, jnp.float32, 128) == "xla"
  assert resolve_implementation("auto", 256, jnp.float32, 128) == "blockwise"
  q, k, v, seg, _ = _inputs()
  with pytest.raises(ValueError, match="cudnn"):
    attend(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), seg,
           implementation="cudnn")
  with pytest.raises(ValueError, match="unknown attention"):
    attend(q, k, v, seg, implementation="flash")

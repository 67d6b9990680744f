"""The Pallas TPU kernels (siglip_fast.kernels.tpu): TPU interpret-mode numerics against the
float64 oracle and the XLA reference, and real Mosaic compiles on compile-only TPU topologies.

Tolerances (docs/DESIGN.md section 5): interpret-mode matmuls are exact float32 on CPU, so float32
inputs are held to 1e-5 relative. With bf16 inputs the products are exact in the float32
accumulator, so the loss and the two scalar gradients (computed in float32 from those) stay
near float32 accuracy (1e-4), while dx and dy come back in bf16 and the gradient matmul takes
G in bf16: 1e-2, as for any bf16 result.

dlog_t = t * sum G * S and dbias = sum G are sums of terms of both signs; with random
(unaligned) pairs they can cancel to a small total, where float32 summation (the XLA
reference's too) loses digits in proportion to sum |terms| / |total|. Their error is
therefore measured against sum |terms|, the scale float32 summation error lives on.
"""

from __future__ import annotations

import dataclasses
import functools
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only libtpu, any process

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import siglip_fast  # noqa: E402
from siglip_fast.kernels import mosaic_common as mc, tpu, tpu_ring  # noqa: E402
from siglip_fast import target as target_lib  # noqa: E402
from siglip_fast.reference import dense  # noqa: E402

from tests.helpers import (  # noqa: E402
  all_eqns,
  numpy_loss_and_grads,
  random_inputs,
  rel_err,
  scratch_shapes,
)

LOG10 = float(np.log(10.0))
TOL = {jnp.float32: dict(value=1e-5, grad=1e-5), jnp.bfloat16: dict(value=1e-4, grad=1e-2)}


def oracle(x, y, x_ids, y_ids, log_t, bias, norm=1.0):
  """Block loss sum / norm and its (dx, dy, dlog_t, dbias) in float64, rectangular blocks
  allowed; plus the scales (sum of |terms|) of the two scalar gradients."""
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  t = np.exp(np.float64(log_t))
  s = x @ y.T
  logits = t * s + np.float64(bias)
  pos = np.asarray(x_ids)[:, None] == np.asarray(y_ids)[None, :]
  u = np.where(pos, -logits, logits)
  loss = np.sum(np.maximum(u, 0) + np.log1p(np.exp(-np.abs(u))))
  g = 1.0 / (1.0 + np.exp(-logits)) - pos
  scales = {"dlog_t": np.sum(np.abs(g * t * s)) / norm, "dbias": np.sum(np.abs(g)) / norm}
  return (
    (loss / norm, tuple(v / norm for v in (t * g @ y, t * g.T @ x, np.sum(g * t * s), np.sum(g)))),
    scales,
  )


def inputs(seed, n, m, dim, dtype):
  x, _ = random_inputs(seed, n, dim, dtype)
  _, y = random_inputs(seed + 1000, m, dim, dtype)
  return x, y


def check(got, want, dtype, what="", scales=None):
  """Assert every output is within the dtype's tolerance; returns the errors."""
  tol = TOL[dtype]
  loss, (dx, dy, dlt, db) = got
  wl, (wdx, wdy, wdlt, wdb) = want
  errs = {
    "loss": rel_err(loss, wl),
    "dx": rel_err(dx, wdx),
    "dy": rel_err(dy, wdy),
    "dlog_t": rel_err(dlt, wdlt),
    "dbias": rel_err(db, wdb),
  }
  for k, (v, w) in {"dlog_t": (dlt, wdlt), "dbias": (db, wdb)}.items():
    if scales is not None:
      errs[k] = abs(float(v) - float(w)) / scales[k]
  for k, e in errs.items():
    limit = tol["grad"] if k in ("dx", "dy") else tol["value"]
    assert e < limit, f"{what} {k}: rel err {e:.3g} >= {limit} (all: {errs})"
  return errs


@pytest.mark.parametrize(
  "dtype,n,m,dim,block_sizes",
  [
    # square, one tile each way in the dY kernel, several in the dX kernel
    (jnp.float32, 256, 256, 128, tpu.BlockSizes(128, 128, 256, 256)),
    # rectangular and ragged in both directions (masking), tiles clamped to the input
    (jnp.float32, 200, 328, 96, tpu.BlockSizes(128, 256)),
    (jnp.bfloat16, 256, 384, 128, tpu.BlockSizes(256, 128, 128, 256)),
    (jnp.bfloat16, 136, 72, 256, None),
    # the fused kernel (resident dY, 6 n m D): one super-block; two, one per TensorCore
    # (v5p); three calls of 2, 2 and 1 ragged column tiles
    (jnp.bfloat16, 256, 200, 128, tpu.BlockSizes(128, 128, fuse_dy=True)),
    (jnp.float32, 300, 200, 64, tpu.BlockSizes(128, 128, fuse_dy=True, generation="v5p")),
    pytest.param(
      jnp.bfloat16,
      256,
      600,
      128,
      tpu.BlockSizes(128, 128, fuse_dy=True, dy_splits=3),
      marks=pytest.mark.slow,
    ),
    # row strips (v6e's default form): the fused kernel with ragged rows (the last row
    # tile's second strip is all padding) and positives across strips; the two kernels
    (jnp.bfloat16, 300, 200, 128, tpu.BlockSizes(256, 128, fuse_dy=True, strip_rows=128)),
    (jnp.float32, 200, 328, 96, tpu.BlockSizes(256, 256, 128, 128, strip_rows=128)),
    # two calls chained through the partial dX, each split over two TensorCores (4 and 2
    # column tiles, the last all padding)
    (
      jnp.float32,
      300,
      520,
      64,
      tpu.BlockSizes(128, 128, fuse_dy=True, generation="v5p", dy_splits=4),
    ),
  ],
)
def test_value_and_grads_match_oracle(dtype, n, m, dim, block_sizes):
  seed = 11 + n + m + dim
  x, y = inputs(seed, n, m, dim, dtype)
  x_ids = jnp.arange(n, dtype=jnp.int32)
  y_ids = jnp.arange(m, dtype=jnp.int32) + 7  # the positives are off the diagonal
  log_t, bias = jnp.float32(LOG10), jnp.float32(-10.0)
  kw = dict(block_sizes=block_sizes, interpret=True)

  want, scales = oracle(x, y, x_ids, y_ids, LOG10, -10.0)
  got = tpu.loss_sum_and_grads(x, y, x_ids, y_ids, log_t, bias, **kw)
  assert got[1][0].dtype == dtype and got[1][1].dtype == dtype
  assert got[1][0].shape == x.shape and got[1][1].shape == y.shape
  check(got, want, dtype, f"{jnp.dtype(dtype).name} {n}x{m}x{dim}", scales)

  fwd = tpu.loss_sum(x, y, x_ids, y_ids, log_t, bias, **kw)
  assert rel_err(fwd, want[0]) < TOL[dtype]["value"]
  # Same kernel, same order of sums: forward-only and fused losses agree to rounding.
  assert rel_err(fwd, got[0]) < 1e-6


@pytest.mark.parametrize("gen", ["v4", "v5e"])
def test_forward_default_tiles_match_oracle(gen):
  # The forward's own tiles (512 x 1024 on v4, 1024 x 1024 on v5e), in interpret mode: more
  # rows and columns than one tile, padded on both axes, positives off the diagonal.
  bs = tpu.forward_block_sizes(gen, dim=768)
  n, m, dim = bs.block_rows + 200, bs.block_cols + 100, 64
  x, y = inputs(5 + n, n, m, dim, jnp.float32)
  x_ids = jnp.arange(n, dtype=jnp.int32)
  y_ids = jnp.arange(m, dtype=jnp.int32) + 3
  want, _ = oracle(x, y, x_ids, y_ids, LOG10, -10.0)
  got = tpu.loss_sum(
    x, y, x_ids, y_ids, jnp.float32(LOG10), jnp.float32(-10.0), block_sizes=bs, interpret=True
  )
  assert rel_err(got, want[0]) < TOL[jnp.float32]["value"], (bs, got, want[0])


def test_square_batch_matches_helpers_oracle_and_reference():
  n, dim = 256, 64
  x, y = random_inputs(2024, n, dim, jnp.float32)
  ids = jnp.arange(n, dtype=jnp.int32)
  lt, b = jnp.float32(LOG10), jnp.float32(-10.0)
  got = tpu.loss_sum_and_grads(
    x, y, ids, ids, lt, b, interpret=True, block_sizes=tpu.BlockSizes(128, 256)
  )
  mean, grads = numpy_loss_and_grads(x, y, LOG10, -10.0)
  _, scales = oracle(x, y, ids, ids, LOG10, -10.0)
  # helpers' oracle is the mean loss: the block sum is n times it.
  check(got, (mean * n, tuple(g * n for g in grads)), jnp.float32, "vs helpers", scales)
  check(got, dense.block_loss_sum_and_grads(x, y, ids, ids, lt, b), jnp.float32, "vs dense", scales)


def test_duplicate_pair_ids_ragged():
  # Several images share a caption id; positives are every equal-id pair, in any tile.
  n, m, dim = 200, 200, 64
  x, y = inputs(77, n, m, dim, jnp.float32)
  rng = np.random.default_rng(77)
  ids = jnp.asarray(rng.integers(0, 60, size=n), jnp.int32)
  assert len(np.unique(np.asarray(ids))) < n
  lt, b = jnp.float32(LOG10), jnp.float32(-10.0)
  got = tpu.loss_sum_and_grads(
    x, y, ids, ids, lt, b, interpret=True, block_sizes=tpu.BlockSizes(128, 128)
  )
  mean, grads = numpy_loss_and_grads(x, y, LOG10, -10.0, ids=np.asarray(ids))
  _, scales = oracle(x, y, ids, ids, LOG10, -10.0)
  check(got, (mean * n, tuple(g * n for g in grads)), jnp.float32, "duplicate ids", scales)


@pytest.mark.parametrize("bias", [20.0, -20.0])
def test_extreme_temperature_and_bias_stay_finite(bias):
  # t = 100 and |b| = 20: |logits| up to 120, where a naive log(sigmoid) overflows.
  n, dim = 256, 128
  x, y = random_inputs(31 + int(bias), n, dim, jnp.float32)
  y = y.at[:8].set(-x[:8])  # some positives far on the wrong side too
  ids = jnp.arange(n, dtype=jnp.int32)
  log_t = float(np.log(100.0))
  got = tpu.loss_sum_and_grads(
    x,
    y,
    ids,
    ids,
    jnp.float32(log_t),
    jnp.float32(bias),
    interpret=True,
    block_sizes=tpu.BlockSizes(128, 256),
  )
  leaves = jax.tree.leaves(got)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in leaves)
  want, scales = oracle(x, y, ids, ids, log_t, bias)
  check(got, want, jnp.float32, f"bias={bias}", scales)


@pytest.mark.parametrize("bias", [-8.0, -20.0])
@pytest.mark.parametrize("kernel", ["block", "ring"])
def test_confident_negatives_keep_float32_accuracy(kernel, bias):
  # No positive pair (x and y ids differ) and a large negative bias: every loss term is
  # softplus(l) ~ e^l, about 2^-12 (bias -8) or 2^-29 (bias -20, below 2^-24, where 1 + e^l
  # rounds to 1). The rounding of 1 + e^l, added back by the kernels, is then a systematic
  # part of the loss (at bias -20 all of it): a plain log2(1 + e) misses it.
  n, dim = 256, 128
  x, y = random_inputs(5, n, dim, jnp.float32)
  x_ids = jnp.arange(n, dtype=jnp.int32)
  y_ids = x_ids + n
  want, _ = oracle(x, y, x_ids, y_ids, 0.0, bias)
  args = (x, y, x_ids, y_ids, jnp.float32(0.0), jnp.float32(bias))
  if kernel == "block":
    got = tpu.loss_sum(*args, interpret=True, block_sizes=tpu.BlockSizes(128, 128))
  else:
    got = n * tpu_ring.ring_loss(*args, interpret=True, block_sizes=tpu_ring.BlockSizes(64, 128))
  assert rel_err(got, want[0]) < 1e-5, (kernel, bias, float(got), want[0])


@pytest.mark.parametrize(
  "regime, rows",
  [
    ("near_one", 1024),  # e ~ 1 (logits near 0): the product nears 2^chunk, never overflows
    ("mixed", 512),  # e from 2^-40 to 1 in one column: large and tiny terms together
    ("tiny", 256),  # every e below 2^-24, where 1 + e rounds to 1
    ("short", 16),  # fewer row groups than a chunk
  ],
)
def test_ln1p_sum_is_float32_accurate(regime, rows):
  # The kernels' sum of ln(1 + e) over a tile, a product per chunk of row groups and one
  # logarithm each, against float64, column by column.
  cols = 256
  rng = np.random.default_rng(7)
  if regime == "near_one":
    e = rng.uniform(0.98, 1.0, (rows, cols))
  elif regime == "tiny":
    e = 2.0 ** rng.uniform(-40, -25, (rows, cols))
  else:
    e = 2.0 ** rng.uniform(-40, 0, (rows, cols))
  e = jnp.asarray(e.astype(np.float32))
  one = jnp.float32(1.0)
  # The rounded 1 + e that tile_terms hands over (G's denominator).
  got = jax.jit(mc.ln1p_sum)(e, one + e, one)
  assert got.shape == (8, cols)
  got = np.asarray(got, np.float64).sum(axis=0)
  want = np.log1p(np.asarray(e, np.float64)).sum(axis=0)
  assert np.max(np.abs(got - want) / want) < 1e-6, regime


def test_public_api_jit_and_grad():
  n, dim = 192, 128
  x, y = random_inputs(5150, n, dim, jnp.float32)
  lt, b = jnp.float32(LOG10), jnp.float32(-10.0)

  def loss(impl, interpret):
    return lambda x, y, lt, b: siglip_fast.sigmoid_loss(
      x, y, lt, b, implementation=impl, interpret=interpret
    )

  vg = jax.jit(jax.value_and_grad(loss("pallas_tpu", True), argnums=(0, 1, 2, 3)))
  got_loss, got_grads = vg(x, y, lt, b)
  mean, grads = numpy_loss_and_grads(x, y, LOG10, -10.0)
  ids = np.arange(n)
  _, scales = oracle(x, y, ids, ids, LOG10, -10.0, norm=n)
  check((got_loss, got_grads), (mean, grads), jnp.float32, "sigmoid_loss grad", scales)
  # Forward only (no grad): the loss-only path.
  fwd = jax.jit(loss("pallas_tpu", True))(x, y, lt, b)
  assert rel_err(fwd, mean) < 1e-5
  ref = loss("xla", False)(x, y, lt, b)
  assert rel_err(fwd, ref) < 1e-5


def test_standalone_custom_vjp_scales_by_cotangent():
  n, m, dim = 160, 136, 64
  x, y = inputs(99, n, m, dim, jnp.bfloat16)
  x_ids, y_ids = jnp.arange(n, dtype=jnp.int32), jnp.arange(m, dtype=jnp.int32)
  lt, b = jnp.float32(LOG10), jnp.float32(-10.0)
  f = lambda x, y, lt, b: -2.5 * tpu.block_loss_sum(x, y, x_ids, y_ids, lt, b, interpret=True)
  val, grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3))(x, y, lt, b)
  assert grads[0].dtype == jnp.bfloat16 and grads[2].shape == ()
  (wl, wg), scales = oracle(x, y, x_ids, y_ids, LOG10, -10.0)
  check(
    (val, grads),
    (-2.5 * wl, tuple(-2.5 * g for g in wg)),
    jnp.bfloat16,
    "custom_vjp",
    {k: 2.5 * v for k, v in scales.items()},
  )


def test_block_ops_contract():
  ops = siglip_fast.block_ops("pallas_tpu", interpret=True, block_sizes=tpu.BlockSizes(128, 128))
  assert ops.name == "pallas_tpu"
  with pytest.raises(TypeError, match="block_sizes"):
    tpu.block_ops(block_sizes=(128, 128))


@pytest.mark.parametrize(
  "dtype,block_sizes,layout",
  [
    # one call, one TensorCore: dX's float32 partial (1, rows, D), dY padded to the tile
    (jnp.float32, tpu.BlockSizes(128, 128, fuse_dy=True), ((1, 384, 64), (384, 64))),
    # two TensorCores, two calls chained, both axes padded
    (
      jnp.float32,
      tpu.BlockSizes(128, 128, fuse_dy=True, generation="v5p", dy_splits=4),
      ((2, 384, 64), (512, 64)),
    ),
    pytest.param(
      jnp.bfloat16,
      tpu.BlockSizes(128, 128, fuse_dy=True),
      ((1, 384, 64), (384, 64)),
      marks=pytest.mark.slow,
    ),
    # the two kernels: dX as one float32 partial, dY padded to the dY kernel's own row tile
    (
      jnp.float32,
      tpu.BlockSizes(128, 128, block_rows_dy=256, fuse_dy=False),
      ((1, 384, 64), (512, 64)),
    ),
  ],
)
def test_block_ops_accumulate_into_running_gradients(dtype, block_sizes, layout):
  # The ring driver keeps a trip's gradients in the fused kernel's own float32 layout: each
  # block's kernel calls start from them, so nothing is rounded or re-read between blocks.
  # Here dX runs over two chunks of y (from None: zero); the first chunk's dY starts from
  # None, the second continues from the first's running dY (as a chunk's dY continues
  # from hop to hop), so it ends as the sum of both chunks' dY.
  n, m, dim = 300, 300, 64
  x, y = inputs(41, n, 2 * m, dim, dtype)
  x_ids = jnp.arange(n, dtype=jnp.int32) * 2  # some positives in each chunk
  y_ids = jnp.arange(2 * m, dtype=jnp.int32)
  acc = tpu.block_ops(interpret=True, block_sizes=block_sizes).accumulator()
  loss, dys, dlt, db, dx_acc, dy_acc = 0.0, [], 0.0, 0.0, None, None
  for k in range(2):
    chunk = slice(k * m, (k + 1) * m)
    args = (x, y[chunk], x_ids, y_ids[chunk], jnp.float32(LOG10), jnp.float32(-10.0))
    block_loss, (dx_acc, dy_acc, block_dlt, block_db) = acc.block(*args, dx_acc, dy_acc)
    assert (dx_acc.shape, dy_acc.shape) == layout
    assert dx_acc.dtype == dy_acc.dtype == jnp.float32
    loss, dlt, db = loss + block_loss, dlt + block_dlt, db + block_db
    dys.append(acc.finish_dy(dy_acc, y[chunk], jnp.float32(LOG10)))
  dx = acc.finish_dx(dx_acc, x, jnp.float32(LOG10))
  assert dx.dtype == dys[0].dtype == jnp.float32 and dx.shape == (n, dim)
  want, scales = oracle(x, y, x_ids, y_ids, LOG10, -10.0)
  loss_w, (dx_w, dy_w, dlt_w, db_w) = want
  # The second running dY holds both chunks'.
  want = (loss_w, (dx_w, np.concatenate([dy_w[:m], dy_w[:m] + dy_w[m:]]), dlt_w, db_w))
  check((loss, (dx, jnp.concatenate(dys), dlt, db)), want, dtype, "accumulated", scales)


@pytest.mark.parametrize(
  "first,second,layouts",
  [
    # the two kernels' one partial over 384 rows, then two TensorCores' over 512
    (
      tpu.BlockSizes(128, 128, fuse_dy=False),
      tpu.BlockSizes(256, 128, fuse_dy=True, generation="v5p"),
      ((1, 384, 64), (2, 512, 64)),
    ),
    # and back: two TensorCores' partials over 512 rows, then one over 384
    (
      tpu.BlockSizes(256, 128, fuse_dy=True, generation="v5p"),
      tpu.BlockSizes(128, 128, fuse_dy=True),
      ((2, 512, 64), (1, 384, 64)),
    ),
  ],
)
def test_running_dx_continues_across_plans(first, second, layouts):
  # A ring driver's blocks share one running dX, but their text rows differ (the own block
  # has all of them, the travelling parts half), and so may the plans that their default
  # tiles pick: dX padded to other rows, or split over another number of TensorCores. Each
  # call takes the running dX in its own plan's layout; here two plans forced by hand.
  n, dim, m1, m2 = 300, 64, 300, 150
  x, y = inputs(43, n, m1 + m2, dim, jnp.float32)
  x_ids = jnp.arange(n, dtype=jnp.int32) * 2
  y_ids = jnp.arange(m1 + m2, dtype=jnp.int32)
  lt, bias = jnp.float32(LOG10), jnp.float32(-10.0)
  loss, dys, dlt, db, dx_acc = 0.0, [], 0.0, 0.0, None
  for bs, chunk, layout in zip((first, second), (slice(0, m1), slice(m1, None)), layouts):
    acc = tpu.block_ops(interpret=True, block_sizes=bs).accumulator()
    args = (x, y[chunk], x_ids, y_ids[chunk], lt, bias)
    block_loss, (dx_acc, dy_acc, block_dlt, block_db) = acc.block(*args, dx_acc, None)
    assert dx_acc.shape == layout
    loss, dlt, db = loss + block_loss, dlt + block_dlt, db + block_db
    dys.append(acc.finish_dy(dy_acc, y[chunk], lt))
  dx = acc.finish_dx(dx_acc, x, lt)
  want, scales = oracle(x, y, x_ids, y_ids, LOG10, -10.0)
  check((loss, (dx, jnp.concatenate(dys), dlt, db)), want, jnp.float32, "two plans", scales)


def _pallas_params(fn, *args):
  """The params of every pallas_call ``fn`` traces to, in order."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  return [e.params for e in jaxpr.eqns if e.primitive.name == "pallas_call"]


def _count_eqns(jaxpr, name) -> int:
  """Equations named ``name`` in a jaxpr and every jaxpr nested in its equations."""
  return sum(e.primitive.name == name for e in all_eqns(jaxpr))


def test_row_strips_split_the_loss_kernels_only():
  # strip_rows=128 on 256-row tiles: the forward, fused and dX kernels run each tile body
  # (lean and full) as two strips of one, three and two matmuls; the dY kernel (no loss in
  # its tile) keeps whole tiles. The sums come out in another order: float32 rounding apart,
  # the same numbers. The fused and dX kernels pass their strips' logits through a two-strip
  # VMEM buffer; the forward keeps them in registers.
  x, y = inputs(5, 384, 256, 64, jnp.float32)
  ids = (jnp.arange(384, dtype=jnp.int32), jnp.arange(256, dtype=jnp.int32))
  args = (x, y, *ids, jnp.float32(LOG10), jnp.float32(-10.0))
  buf = (2, 128, 128)
  for fn, fuse, dots, bufs in (
    (tpu.loss_sum, None, [2 * 2 * 1], [False]),
    (tpu.loss_sum_and_grads, True, [2 * 2 * 3], [True]),
    (tpu.loss_sum_and_grads, False, [2 * 2 * 2, 2 * 2], [True, False]),
  ):
    whole = tpu.BlockSizes(256, 128, 128, 128, fuse_dy=fuse)
    strips = dataclasses.replace(whole, strip_rows=128)
    run = lambda bs: functools.partial(fn, block_sizes=bs, interpret=True)
    params = _pallas_params(run(strips), *args)
    assert [_count_eqns(p["jaxpr"], "dot_general") for p in params] == dots
    assert [buf in scratch_shapes(p) for p in params] == bufs
    assert not any(buf in scratch_shapes(p) for p in _pallas_params(run(whole), *args))
    got, want = run(strips)(*args), run(whole)(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert rel_err(g, w) < 1e-6


@pytest.mark.parametrize(
  "dtype,n,m,block_sizes,calls",
  [
    # the fused kernel in two calls on one TensorCore, one column tile each: the second
    # continues from the first's partial dX and writes it in x's dtype, times t
    (jnp.bfloat16, 300, 256, tpu.BlockSizes(128, 128, fuse_dy=True, dy_splits=2), 2),
    (jnp.float32, 300, 256, tpu.BlockSizes(128, 128, fuse_dy=True, dy_splits=2), 2),
    # the same in row strips: each strip's dX written on its own
    (
      jnp.bfloat16,
      300,
      256,
      tpu.BlockSizes(256, 128, fuse_dy=True, dy_splits=2, strip_rows=128),
      2,
    ),
    # two TensorCores, one column tile each (a driver's half chunk on v5p)
    (jnp.bfloat16, 300, 256, tpu.BlockSizes(128, 128, fuse_dy=True, generation="v5p"), 1),
    # the two kernels, each with one column tile (y within the dX kernel's, x within the dY's)
    (jnp.float32, 200, 128, tpu.BlockSizes(128, 128, 128, 256, fuse_dy=False), 2),
  ],
)
def test_one_column_tile_per_row_writes_dx_once(dtype, n, m, block_sizes, calls):
  # Where a row tile meets one column tile, its dX is written straight from the tile's
  # matmul (plus the previous call's partial, a pipelined block): no accumulator scratch.
  dim = 64
  x, y = inputs(47, n, 2 * m, dim, dtype)
  x_ids = jnp.arange(n, dtype=jnp.int32) * 2  # positives in both chunks
  y_ids = jnp.arange(2 * m, dtype=jnp.int32)
  lt, bias = jnp.float32(LOG10), jnp.float32(-10.0)
  one = (x, y[:m], x_ids, y_ids[:m], lt, bias)
  kw = dict(block_sizes=block_sizes, interpret=True)
  params = _pallas_params(lambda *a: tpu.loss_sum_and_grads(*a, **kw), *one)
  # No scratch but, in row strips, their logits buffer.
  bs = block_sizes
  scratch = [(2, bs.strip_rows, bs.block_cols)] if bs.strip_rows else []
  assert [scratch_shapes(p) for p in params] == [scratch] * calls
  want, scales = oracle(*one[:4], LOG10, -10.0)
  check(tpu.loss_sum_and_grads(*one, **kw), want, dtype, "one call", scales)

  # The same through the ring driver's accumulator: dX runs over both chunks, the partial
  # in and out one HBM buffer (aliased), read and written a block a step.
  acc = tpu.block_ops(interpret=True, block_sizes=block_sizes).accumulator()
  loss, dys, dlt, db, dx_acc = 0.0, [], 0.0, 0.0, None
  for chunk in (slice(0, m), slice(m, None)):
    args = (x, y[chunk], x_ids, y_ids[chunk], lt, bias)
    block_loss, (dx_acc, dy_acc, block_dlt, block_db) = acc.block(*args, dx_acc, None)
    loss, dlt, db = loss + block_loss, dlt + block_dlt, db + block_db
    dys.append(acc.finish_dy(dy_acc, y[chunk], lt))
  dx = acc.finish_dx(dx_acc, x, lt)
  want, scales = oracle(x, y, x_ids, y_ids, LOG10, -10.0)
  check((loss, (dx, jnp.concatenate(dys), dlt, db)), want, dtype, "accumulated", scales)


def _pallas_costs(fn, *args):
  return [p["cost_estimate"] for p in _pallas_params(fn, *args)]


def test_forward_pays_no_gradient_work_and_costs_are_declared():
  n, m, dim = 256, 384, 128
  x, y = inputs(3, n, m, dim, jnp.bfloat16)
  xi, yi = jnp.arange(n, dtype=jnp.int32), jnp.arange(m, dtype=jnp.int32)
  args = (x, y, xi, yi, jnp.float32(0.0), jnp.float32(0.0))
  kw = dict(interpret=True, block_sizes=tpu.BlockSizes(128, 128))
  fwd = _pallas_costs(lambda *a: tpu.loss_sum(*a, **kw), *args)
  vg = _pallas_costs(lambda *a: tpu.loss_sum_and_grads(*a, **kw), *args)
  fused_kw = dict(kw, block_sizes=tpu.BlockSizes(128, 128, fuse_dy=True))
  fused = _pallas_costs(lambda *a: tpu.loss_sum_and_grads(*a, **fused_kw), *args)
  assert [c.flops for c in fwd] == [2 * n * m * dim]
  assert sorted(c.flops for c in vg) == [4 * n * m * dim] * 2  # 8 n m D in all
  assert [c.flops for c in fused] == [6 * n * m * dim]
  # exp2 per logit; a log and a reciprocal per column and sublane of each 128-row tile.
  assert fwd[0].transcendentals == n * m + (n // 128) * 2 * 8 * m
  assert all(c.bytes_accessed >= (n + m) * dim * 2 for c in fwd + vg + fused)


def test_padding_from_the_lcm_of_two_tiles_is_masked():
  # Regression: B = 384 with 128-row tiles and 256-row dY tiles used to pad both operands
  # to 768 rows while the mask was only built for n % rows != 0: whole padded tiles were
  # summed (loss rel. error 1.4e-3, dbias 1.4e-2 against the float64 oracle).
  x, y = random_inputs(90, 384, 128)
  bs = tpu.BlockSizes(128, 128, 256, 256, fuse_dy=False)
  f = lambda *a: siglip_fast.sigmoid_loss(
    *a, implementation="pallas_tpu", interpret=True, block_sizes=bs
  )
  val, grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3))(
    x, y, jnp.float32(LOG10), jnp.float32(-10.0)
  )
  mean, want = numpy_loss_and_grads(x, y, LOG10, -10.0)
  assert rel_err(val, mean) < 1e-5
  for g, w in zip(grads, want):
    assert rel_err(g, w) < 1e-5


def _kernel_operand_rows(fn, n, dim, block_sizes):
  """Rows of every (rows, dim) embedding operand of the pallas_calls fn traces to."""
  x = jax.ShapeDtypeStruct((n, dim), jnp.bfloat16)
  ids = jnp.arange(n, dtype=jnp.int32)
  jaxpr = jax.make_jaxpr(lambda x: fn(x, x, ids, ids, 0.0, 0.0, block_sizes=block_sizes))(x)
  rows = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      rows += [
        v.aval.shape[0] for v in eqn.invars if len(v.aval.shape) == 2 and v.aval.shape[1] == dim
      ]
  return rows


@pytest.mark.parametrize(
  "n,gen,dim", [(896, "v6e", 1152), (1152, "v6e", 768), (4100, "v5e", 1152), (1000, "v5p", 768)]
)
def test_padding_stays_under_one_tile(n, gen, dim):
  # Regression: B = 896 with v6e tiles padded operands to 3584 rows (the lcm of a 1024-row
  # and a 512-row tile; 16x the pair work), B = 1152 to 2048 x 1536.
  base = tpu.BlockSizes.for_generation(gen, dim)
  for bs in (dataclasses.replace(base, fuse_dy=False), dataclasses.replace(base, fuse_dy=True)):
    rows = _kernel_operand_rows(tpu.loss_sum_and_grads, n, dim, bs)
    assert rows, "no pallas_call traced"
    largest_tile = max(bs.block_rows, bs.block_cols, *bs.dy_tiles)
    assert all(n <= r < n + largest_tile for r in rows), (bs, rows)
  assert tpu._tile(896, 1024) == 896 and tpu._tile(896, 512) == 512
  assert tpu._tile(1152, 512) == 384 and tpu._tile(1152, 1024) == 640


@pytest.mark.parametrize(
  "bad,exc,match",
  [
    (lambda a: dict(a, x=a["x"][:, :32]), ValueError, "x and y must have the same dim"),
    (lambda a: dict(a, x=a["x"].astype(jnp.float16)), TypeError, "x must be float32"),
    (lambda a: dict(a, y=a["y"].astype(jnp.float32)), TypeError, "same dtype"),
    (lambda a: dict(a, x_ids=a["x_ids"][:5]), ValueError, "x_ids must have shape"),
    (lambda a: dict(a, y_ids=a["y_ids"].astype(jnp.float32)), TypeError, "y_ids must be int"),
    (lambda a: dict(a, log_t=jnp.zeros((2,))), ValueError, "log_t must be a scalar"),
    (lambda a: dict(a, x=a["x"][0]), ValueError, "x must have shape \\(batch, dim\\)"),
  ],
)
def test_bad_inputs_raise_clear_errors(bad, exc, match):
  x, y = inputs(0, 16, 24, 64, jnp.bfloat16)
  a = dict(
    x=x,
    y=y,
    x_ids=jnp.arange(16, dtype=jnp.int32),
    y_ids=jnp.arange(24, dtype=jnp.int32),
    log_t=0.0,
    bias=0.0,
  )
  a = bad(a)
  with pytest.raises(exc, match=match):
    tpu.loss_sum(a["x"], a["y"], a["x_ids"], a["y_ids"], a["log_t"], a["bias"], interpret=True)


def test_block_sizes_validation_and_generation_defaults():
  with pytest.raises(ValueError, match="multiple of 128"):
    tpu.BlockSizes(100, 128)
  with pytest.raises(ValueError, match="generation"):
    tpu.BlockSizes(128, 128, generation="v9")
  for bad in (0, 2.0, True):
    with pytest.raises(ValueError, match="dy_splits must be a positive int"):
      tpu.BlockSizes(128, 128, dy_splits=bad)
  with pytest.raises(ValueError, match="strip_rows must be a positive multiple of 128"):
    tpu.BlockSizes(256, 128, strip_rows=64)
  # Row strips by default where the profile took them (v6e), for every default plan.
  for gen in tpu.VMEM_CAPACITY:
    want = 256 if gen == "v6e" else None
    assert tpu.BlockSizes.for_generation(gen, 1152).strip_rows == want
    assert tpu.forward_block_sizes(gen, dim=1152).strip_rows == want
    assert tpu.grad_block_sizes(gen, 4096, 4096, 1152, jnp.bfloat16).strip_rows == want
  for gen, cap in tpu.VMEM_CAPACITY.items():
    for dim in (768, 1152, 1536):
      for dtype in (jnp.bfloat16, jnp.float32):
        bs = tpu.BlockSizes.for_generation(gen, dim, dtype)
        assert bs.generation == gen
        for grad in (False, True):
          assert (
            tpu.vmem_bytes(bs.block_rows, bs.block_cols, dim, dtype, with_grad=grad, n_stats=3)
            <= cap
          )
  # The forward alone takes tiles at least as large, within the same budget.
  for gen, cap in tpu.VMEM_CAPACITY.items():
    for dim in (768, 1152, 1536):
      for dtype in (jnp.bfloat16, jnp.float32):
        fwd = tpu.forward_block_sizes(gen, dim=dim, dtype=dtype)
        both = tpu.BlockSizes.for_generation(gen, dim, dtype)
        assert fwd.generation == gen
        assert fwd.block_rows * fwd.block_cols >= both.block_rows * both.block_cols
        assert tpu.vmem_bytes(fwd.block_rows, fwd.block_cols, dim, dtype, with_grad=False) <= (
          0.75 * cap
        )
  assert tpu.forward_block_sizes(None, interpret=True) == tpu.default_block_sizes(
    None, interpret=True
  )
  # More VMEM, no smaller tiles.
  small = tpu.BlockSizes.for_generation("v4", 1536)
  big = tpu.BlockSizes.for_generation("v6e", 1536)
  assert big.block_rows * big.block_cols > small.block_rows * small.block_cols
  # Tiles that cannot fit the chip are refused before compiling.
  too_big = tpu.BlockSizes(2048, 2048, generation="v4")
  with pytest.raises(ValueError, match="VMEM"):
    _eval(tpu.loss_sum, 4096, 1536, too_big)


def _eval(fn, batch, dim, block_sizes):
  """Trace (no compile, no run) fn on (batch, dim) bf16 inputs: checks and kernel plans."""
  ids = jnp.arange(batch, dtype=jnp.int32)
  return jax.eval_shape(
    lambda x: fn(x, x, ids, ids, 0.0, 0.0, block_sizes=block_sizes),
    jax.ShapeDtypeStruct((batch, dim), jnp.bfloat16),
  )


def test_fused_dy_in_super_blocks_at_any_batch():
  # With the tiles value-and-grad takes by default (grad_block_sizes: the fused plan chosen
  # before the tiles).
  plan = lambda gen, batch, dim=1152: tpu._fused_plan(
    tpu.grad_block_sizes(gen, batch, batch, dim, jnp.bfloat16), batch, batch, dim, jnp.bfloat16
  )
  # One super-block where all of dY fits (v5e, v6e up to 16k at D = 768); one per
  # TensorCore on megacore chips; more beyond: the fused plan (6 B^2 D) at any batch.
  assert plan("v5e", 4096) == (True, 1) and plan("v6e", 4096) == (True, 1)
  assert plan("v5p", 4096) == (True, 2) and plan("v4", 4096, 768) == (True, 4)
  assert plan("v6e", 16384, 768) == (True, 1) and plan("v6e", 16384) == (True, 2)
  # v5p at 16k, D = 1152: 512 x 1024 tiles, whose resident dY takes six super-blocks.
  assert plan("v5e", 32768) == (True, 2) and plan("v5p", 16384) == (True, 6)
  every_dim = (768, 1152, 1536)
  for gen, dims in (
    ("v4", (768, 1152)),
    ("v5e", every_dim),
    ("v5p", every_dim),
    ("v6e", every_dim),
  ):
    for dim in dims:
      fuse, splits = plan(gen, 65536, dim)
      assert fuse and splits % tpu.TENSORCORES.get(gen, 1) == 0, (gen, dim, splits)
  # Super-blocks as even as the column tiles go: v6e at 16k, D = 1152, 16 tiles of
  # 1024 x 1024 in three calls of 6, 5 and 5 (no padding); on v5p a pair per call.
  bs = tpu.grad_block_sizes("v6e", 16384, 16384, 1152, jnp.bfloat16)
  assert (bs.block_rows, bs.block_cols) == (1024, 1024)
  assert tpu._super_blocks(bs, 16384, 3) == (1024, 1, [6, 5, 5])
  assert tpu._super_blocks(tpu.BlockSizes(generation="v5p"), 16384, 4) == (512, 2, [16, 16])
  # v4 up to D = 1152: 256 x 256 tiles and a super-block per 512 rows of dY a TensorCore
  # holds (219 FLOP per HBM byte: compute bound at the rate the kernel runs, not at the
  # peak). From D = 1280 the dY that fits its 16 MiB makes calls too short: two kernels.
  assert plan("v4", 4096) == (True, 8) and plan("v4", 16384) == (True, 32)
  assert plan("v4", 4096, 1280)[0] is False and plan("v4", 4096, 1536)[0] is False
  # Unknown chip (interpret mode): two kernels unless asked.
  assert tpu._fused_plan(tpu.BlockSizes(), 4096, 4096, 1152, jnp.bfloat16) == (False, 1)
  # Forcing one super-block where it cannot fit is refused at trace time, not left to the
  # compiler.
  forced = tpu.BlockSizes(256, 256, generation="v4", fuse_dy=True, dy_splits=1)
  with pytest.raises(ValueError, match="VMEM"):
    _eval(tpu.loss_sum_and_grads, 16384, 1152, forced)


# ------------------------------------------------------------------------------------------
# Real Mosaic compiles for compile-only TPU topologies (libtpu, no TPU needed)


def _tpu_sharding(topology_name):
  topologies = pytest.importorskip("jax.experimental.topologies")
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
  except Exception as e:  # noqa: BLE001 - no libtpu in this install
    pytest.skip(f"compile-only TPU topology unavailable: {e}")
  return jax.sharding.SingleDeviceSharding(topo.devices[0])


def _compile(fn, batch, dim, dtype, sharding):
  emb = jax.ShapeDtypeStruct((batch, dim), dtype, sharding=sharding)
  ids = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)
  s = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding)
  return jax.jit(fn).lower(emb, emb, ids, ids, s, s).compile()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_forward_default_tiles_compile_on_the_smallest_vmem(dtype):
  # v4's 16 MiB: the forward's own tiles (larger than the gradient kernels') must compile
  # under the limit the kernel asks for, at every dim users run, picked from the target.
  sharding = _tpu_sharding("v4:2x2x1")
  for dim in (768, 1536):
    bs = tpu.forward_block_sizes("v4", dim=dim, dtype=dtype)
    x = jax.ShapeDtypeStruct((4096, dim), dtype)
    ids = jnp.arange(4096, dtype=jnp.int32)
    v4 = target_lib.Target("tpu", "TPU v4")
    jaxpr = jax.make_jaxpr(lambda x: tpu.loss_sum(x, x, ids, ids, 0.0, 0.0, target=v4))(x)
    (grid,) = [
      e.params["grid_mapping"].grid for e in jaxpr.eqns if e.primitive.name == "pallas_call"
    ]
    assert grid == (4096 // bs.block_rows, 4096 // bs.block_cols), (grid, bs)
    _compile(tpu.loss_sum, 4096, dim, dtype, sharding)  # raises if Mosaic runs out of VMEM
  assert tpu.forward_block_sizes("v4", dim=768) == tpu.BlockSizes(512, 1024, generation="v4")


def test_mosaic_compiles_v5e_without_bxb_temporary():
  batch, dim = 16384, 512
  sharding = _tpu_sharding("v5e:2x2")
  bs = tpu.BlockSizes.for_generation("v5e", dim, jnp.bfloat16)
  assert tpu._fused_plan(bs, batch, batch, dim, jnp.bfloat16) == (True, 1)  # dY fits VMEM
  two = dataclasses.replace(bs, fuse_dy=False)
  bxb = 4 * batch * batch
  for fn, b, flops in (
    (tpu.loss_sum, bs, 2),
    (tpu.loss_sum_and_grads, bs, 6),
    (tpu.loss_sum_and_grads, two, 8),
  ):
    compiled = _compile(
      lambda *a, fn=fn, b=b: fn(*a, block_sizes=b), batch, dim, jnp.bfloat16, sharding
    )
    temp = compiled.memory_analysis().temp_size_in_bytes
    # At most the float32 (B, D) dY staging of the fused kernel: O(B D), not O(B^2).
    assert temp <= 4 * batch * dim, f"temp {temp} bytes"
    assert temp < bxb / 32, f"temp {temp} bytes is not far below a B x B f32 ({bxb})"
    assert f"[{batch},{batch}]" not in compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert cost["flops"] == pytest.approx(flops * batch * batch * dim, rel=1e-3)


@pytest.mark.parametrize(
  "gen,topology,splits",
  [pytest.param("v5e", "v5e:2x2", 3, marks=pytest.mark.slow), ("v5p", "v5p:2x2x1", 4)],
)
def test_mosaic_compiles_fused_super_blocks(gen, topology, splits):
  # The fused kernel over super-blocks: one call each (v5e), or one per pair with a
  # TensorCore each (v5p), chained through the float32 partial dX. Real Mosaic compiles;
  # 6 B^2 D in all, no B x B array, HBM temporaries O(B D).
  batch, dim = 3072, 1152
  bs = tpu.BlockSizes(512, 512, generation=gen, fuse_dy=True, dy_splits=splits)
  compiled = _compile(
    lambda *a: tpu.loss_sum_and_grads(*a, block_sizes=bs),
    batch,
    dim,
    jnp.bfloat16,
    _tpu_sharding(topology),
  )
  text = compiled.as_text()
  cores = tpu.TENSORCORES.get(gen, 1)
  assert text.count('custom_call_target="tpu_custom_call"') == splits // cores
  assert f"[{batch},{batch}]" not in text
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert cost["flops"] == pytest.approx(6 * batch * batch * dim, rel=1e-3)
  temp = compiled.memory_analysis().temp_size_in_bytes
  # The float32 partial dX in and out of a call (one per TensorCore), and dY.
  assert temp <= (2 * cores + 1) * 4 * batch * dim, f"temp {temp} bytes"


def test_mosaic_compiles_ragged_shapes_and_odd_dim():
  # The masked (ragged) kernel variant and a feature dim that is not a multiple of 128.
  sharding = _tpu_sharding("v5e:2x2")
  n, m, dim = 1000, 777, 100
  bs = tpu.BlockSizes(256, 128, generation="v5e")
  s = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  args = (
    s((n, dim), jnp.bfloat16),
    s((m, dim), jnp.bfloat16),
    s((n,), jnp.int32),
    s((m,), jnp.int32),
    s((), jnp.float32),
    s((), jnp.float32),
  )
  for fn in (tpu.loss_sum, tpu.loss_sum_and_grads):
    jax.jit(lambda *a, fn=fn: fn(*a, block_sizes=bs)).lower(*args).compile()


def test_mosaic_compiles_v4_widest_dim():
  # v4 has the least VMEM (16 MiB); D = 1536 must still compile with its defaults.
  sharding = _tpu_sharding("v4:2x2x1")
  bs = tpu.BlockSizes.for_generation("v4", 1536, jnp.bfloat16)
  _compile(
    lambda *a: tpu.loss_sum_and_grads(*a, block_sizes=bs), 4096, 1536, jnp.bfloat16, sharding
  )


# ------------------------------------------------------------------------------------------
# Slow: bigger shapes, more tile shapes, and the ring on simulated devices


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
  "block_sizes",
  [
    tpu.BlockSizes(128, 256),
    tpu.BlockSizes(512, 256),
    tpu.BlockSizes(256, 512, 128, 384),
    tpu.BlockSizes(256, 128, fuse_dy=True, generation="v5p"),
  ],
)
def test_larger_ragged_blocks(dtype, block_sizes):
  n, m, dim = 1000, 777, 256
  x, y = inputs(4242, n, m, dim, dtype)
  rng = np.random.default_rng(4242)
  x_ids = jnp.asarray(rng.integers(0, 900, size=n), jnp.int32)
  y_ids = jnp.asarray(rng.integers(0, 900, size=m), jnp.int32)
  got = tpu.loss_sum_and_grads(
    x,
    y,
    x_ids,
    y_ids,
    jnp.float32(LOG10),
    jnp.float32(-10.0),
    interpret=True,
    block_sizes=block_sizes,
  )
  want, scales = oracle(x, y, x_ids, y_ids, LOG10, -10.0)
  check(got, want, dtype, "large", scales)


@pytest.mark.parametrize(
  "n_dev,schedule,block_sizes,b_local",
  [
    # the fused kernel in two calls chained through the partial dX, under shard_map
    (2, "bidirectional", tpu.BlockSizes(128, 128, fuse_dy=True, dy_splits=2), 256),
    # an odd local batch: halves of 66 and 65 rows, every call padded
    (3, "bidirectional", tpu.BlockSizes(128, 128, fuse_dy=True), 131),
    # a megacore chip's layout: the two TensorCores' partial dX travel round the trip
    pytest.param(
      2,
      "unidirectional",
      tpu.BlockSizes(128, 128, fuse_dy=True, generation="v5p"),
      256,
      marks=pytest.mark.slow,
    ),
    pytest.param(4, "bidirectional", None, 256, marks=pytest.mark.slow),
    pytest.param(3, "unidirectional", None, 256, marks=pytest.mark.slow),
  ],
)
def test_ring_over_simulated_devices_uses_the_kernel(n_dev, schedule, block_sizes, b_local):
  # The block kernel as the reference ring's local step under shard_map (check_vma=True):
  # outputs declare how they vary, and the replicated log_t / bias get their gradient summed
  # over devices. (The public API runs the whole-ring kernel instead; tests/test_api.py. The
  # loss-only trip is the same driver code with any blocks: tests/test_ring.py.)
  from jax.sharding import Mesh, PartitionSpec as P
  from siglip_fast.reference import ring as ring_lib

  mesh = Mesh(np.array(jax.devices()[:n_dev]), ("d",))
  batch, dim = b_local * n_dev, 64
  x, y = random_inputs(808 + n_dev, batch, dim, jnp.float32)
  lt, b = jnp.float32(LOG10), jnp.float32(-10.0)
  ops = tpu.block_ops(interpret=True, block_sizes=block_sizes)

  def local(x, y, lt, b):
    ids = jax.lax.axis_index("d") * x.shape[0] + jnp.arange(x.shape[0], dtype=jnp.int32)
    return ring_lib.ring_loss(x, y, ids, ids, lt, b, axis_name="d", schedule=schedule, ops=ops)

  f = jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d"), P(), P()), out_specs=P())
  # Jitted, as a training step runs. Eagerly, shard_map makes every op a program of its own,
  # XLA:CPU runs different programs on different devices at once, and TPU interpret mode's
  # callbacks launch programs too. With 4 devices that deadlocked (jax 0.10.2; gdb: two
  # devices waiting in a permute's rendezvous for the other two, every other execution
  # waiting on a device's execution semaphore or its inputs, the callbacks among them).
  val, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(x, y, lt, b)
  mean, want = numpy_loss_and_grads(x, y, LOG10, -10.0)
  ids = np.arange(batch)
  _, scales = oracle(x, y, ids, ids, LOG10, -10.0, norm=batch)
  check((val, grads), (mean, want), jnp.float32, f"ring of {n_dev}", scales)


@pytest.mark.slow
def test_mosaic_compiles_all_generations():
  for gen, topo in (
    ("v4", "v4:2x2x1"),
    ("v5e", "v5e:2x2"),
    ("v5p", "v5p:2x2x1"),
    ("v6e", "v6e:2x2"),
  ):
    sharding = _tpu_sharding(topo)
    for dim in (768, 1152):
      # The forward with no block_sizes: its own tiles for the target (forward_block_sizes).
      _compile(tpu.loss_sum, 16384, dim, jnp.bfloat16, sharding)
      # The value-and-grad plan and tiles the API picks by default at this shape.
      gbs = tpu.grad_block_sizes(gen, 16384, 16384, dim, jnp.bfloat16)
      compiled = _compile(
        lambda *a: tpu.loss_sum_and_grads(*a, block_sizes=gbs), 16384, dim, jnp.bfloat16, sharding
      )
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      # The fused kernel's 6 B^2 D (up to the padding of whole tiles) on every chip, v4's
      # 16 MiB too (in 32 super-blocks at D = 1152).
      assert tpu._fused_plan(gbs, 16384, 16384, dim, jnp.bfloat16)[0], (gen, dim)
      want = 6 * 16384**2 * dim
      assert cost["flops"] == pytest.approx(want, rel=0.05), (gen, dim)


# Tile sizes, batch shapes, the fused/two-kernel choice and the fused kernel's super-blocks
# drawn at random: padding and the lean/full tile bodies must never change the result (the two-kernel path once summed
# padded tiles where the padding came from the lcm of two tile sizes).
from hypothesis import given, settings, strategies as st  # noqa: E402

_TILE = st.sampled_from([128, 256])


@settings(max_examples=6, deadline=None, derandomize=False)
@given(
  n=st.integers(1, 400),
  m=st.integers(1, 400),
  rows=_TILE,
  cols=_TILE,
  rows_dy=_TILE,
  cols_dy=_TILE,
  fuse=st.booleans(),
  splits=st.sampled_from([None, 2, 3]),
  strip=st.sampled_from([None, 128]),
  dup=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_any_block_sizes_match_oracle(
  n, m, rows, cols, rows_dy, cols_dy, fuse, splits, strip, dup, seed
):
  x, y = inputs(seed, n, m, 64, jnp.float32)
  x_ids = np.arange(n) // (3 if dup else 1)
  y_ids = np.arange(m) // (3 if dup else 1)
  bs = tpu.BlockSizes(
    rows, cols, rows_dy, cols_dy, fuse_dy=fuse, dy_splits=splits, strip_rows=strip
  )
  got = tpu.loss_sum_and_grads(
    x,
    y,
    jnp.asarray(x_ids, jnp.int32),
    jnp.asarray(y_ids, jnp.int32),
    LOG10,
    -10.0,
    block_sizes=bs,
    interpret=True,
  )
  want, scales = oracle(x, y, x_ids, y_ids, LOG10, -10.0)
  check(got, want, jnp.float32, f"{n}x{m} {bs}", scales)

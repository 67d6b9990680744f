"""The Pallas GPU (Triton) kernels: interpret-mode numerics on CPU, and the Triton lowering.

Numerics run ``pallas_call(..., interpret=True)`` against a float64 NumPy oracle of the block
(and the public API against tests.helpers' oracle). Tolerances: float32 1e-5 (interpret-mode
dots are exact float32); bfloat16 inputs 1e-2 for dx and dy, which go through G rounded to
bfloat16 and a bfloat16 result; the loss, dlog_t and dbias of bfloat16 inputs stay 1e-5, as
they come from float32 arithmetic on exactly representable bf16 products.

The lowering tests lower for CUDA on this CPU machine (``lowering_platforms=("cuda",)``): the
Pallas-to-Triton-IR lowering runs for real, so non-power-of-two tiles and unsupported ops
fail here, without a GPU. Tests that need a GPU are skipped unless the backend is "gpu".
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import siglip_fast
from siglip_fast.kernels import gpu
from siglip_fast.reference import dense, ring_loss
from tests.helpers import numpy_loss_and_grads, random_inputs, rel_err

F32, BF16 = jnp.float32, jnp.bfloat16
LOG10 = math.log(10.0)
SMALL = gpu.BlockSizes(
  block_rows=32, block_cols=32, block_k=32, num_warps=4, num_stages=2, fwd_group=2, grad_chunk=64
)
on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")


def block_oracle(x, y, x_ids, y_ids, log_t, bias, with_scales=False):
  """Block loss SUM and its gradients in float64 NumPy (n != m allowed).

  with_scales: also sum|g * (l - b)| and sum|g|, the magnitudes a float32 sum of the
  dlog_t and dbias terms is accurate relative to (at t = 100, b = -20, dbias = 0.70 is a
  sum of terms with sum|g| = 370: float32 XLA is off by 8e-5 relative there too).
  """
  x = np.asarray(jnp.asarray(x, F32), np.float64)
  y = np.asarray(jnp.asarray(y, F32), np.float64)
  pos = np.asarray(x_ids)[:, None] == np.asarray(y_ids)[None, :]
  t = np.exp(np.float64(log_t))
  logits = t * (x @ y.T) + np.float64(bias)
  u = np.where(pos, -logits, logits)
  loss = np.sum(np.maximum(u, 0) + np.log1p(np.exp(-np.abs(u))))
  g = 1.0 / (1.0 + np.exp(-logits)) - pos
  grads = (t * g @ y, t * g.T @ x, np.sum(g * (logits - bias)), np.sum(g))
  if with_scales:
    return loss, grads, (np.sum(np.abs(g * (logits - bias))), np.sum(np.abs(g)))
  return loss, grads


@functools.partial(jax.jit, static_argnames=("block_sizes",))
def _kernel_both(x, y, x_ids, y_ids, log_t, bias, block_sizes=None):
  kw = dict(block_sizes=block_sizes, interpret=True)
  fwd = gpu.block_loss_sum(x, y, x_ids, y_ids, log_t, bias, **kw)
  return fwd, gpu.block_loss_sum_and_grads(x, y, x_ids, y_ids, log_t, bias, **kw)


def _inputs(seed, n, m, d, dtype, n_ids=None):
  kx, ky, ki, kj = jax.random.split(jax.random.key(seed), 4)
  x, _ = random_inputs(seed, n, d, dtype)
  _, y = random_inputs(seed + 1000, m, d, dtype)
  if n_ids is None:
    x_ids, y_ids = jnp.arange(n, dtype=jnp.int32), jnp.arange(m, dtype=jnp.int32)
  else:  # duplicated pair ids on both sides
    x_ids = jax.random.randint(ki, (n,), 0, n_ids).astype(jnp.int32)
    y_ids = jax.random.randint(kj, (m,), 0, n_ids).astype(jnp.int32)
  return x, y, x_ids, y_ids


def _check_against_oracle(x, y, x_ids, y_ids, lt, b, block_sizes, grad_tol):
  fwd, (loss, grads) = _kernel_both(
    x, y, x_ids, y_ids, jnp.float32(lt), jnp.float32(b), block_sizes=block_sizes
  )
  ref_loss, ref_grads, scales = block_oracle(x, y, x_ids, y_ids, lt, b, with_scales=True)
  errs = {
    "fwd": rel_err(fwd, ref_loss),
    "loss": rel_err(loss, ref_loss),
    "dx": rel_err(grads[0], ref_grads[0]),
    "dy": rel_err(grads[1], ref_grads[1]),
  }
  # Scalar sums: error relative to the sum of the terms' magnitudes (see block_oracle).
  for k, g, r, scale in zip(("dlog_t", "dbias"), grads[2:], ref_grads[2:], scales):
    errs[k] = abs(float(g) - r) / scale
  assert grads[0].dtype == x.dtype and grads[1].dtype == y.dtype
  assert grads[0].shape == x.shape and grads[1].shape == y.shape
  assert grads[2].dtype == F32 and grads[3].dtype == F32
  for k, e in errs.items():
    tol = grad_tol if k in ("dx", "dy") else 1e-5
    assert e < tol, (k, errs)
  return errs


# --- numerics (interpret mode) -------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(F32, 1e-5), (BF16, 1e-2)])
def test_ragged_duplicates_small_tiles(dtype, tol):
  # n, m not multiples of the 32-row tiles, three column tiles in groups of two (a partial
  # group), two G chunks of 64 text rows (the second ragged), repeated ids on both sides.
  x, y, xi, yi = _inputs(101, 100, 77, 96, dtype, n_ids=40)
  _check_against_oracle(x, y, xi, yi, LOG10, -10.0, SMALL, tol)


@pytest.mark.parametrize("dtype,tol", [(F32, 1e-5), (BF16, 1e-2)])
def test_default_block_sizes(dtype, tol):
  x, y, xi, yi = _inputs(202, 192, 192, 128, dtype)
  _check_against_oracle(x, y, xi, yi, LOG10, -10.0, None, tol)


@pytest.mark.parametrize(
  "log_t,bias", [(math.log(100.0), 20.0), (math.log(100.0), -20.0), (0.0, 0.0)]
)
def test_extreme_temperature_and_bias(log_t, bias):
  # t = 100 and |b| = 20 put logits near +-120: exp underflows, softplus is linear.
  # Same shapes and block sizes as the ragged test: log_t and bias are operands, no recompile.
  x, y, xi, yi = _inputs(303, 100, 77, 96, F32, n_ids=40)
  fwd, (loss, grads) = _kernel_both(
    x, y, xi, yi, jnp.float32(log_t), jnp.float32(bias), block_sizes=SMALL
  )
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in (fwd, loss, *grads))
  _check_against_oracle(x, y, xi, yi, log_t, bias, SMALL, 1e-5)


@pytest.mark.parametrize(
  "block_sizes",
  [
    gpu.BlockSizes(16, 16, 16, 4, 2, fwd_group=3, grad_chunk=32),
    gpu.BlockSizes(64, 32, 16, 4, 3, fwd_group=1, grad_chunk=96),
    gpu.BlockSizes(32, 64, 64, 8, 3, fwd_group=8, grad_chunk=128),
    gpu.BlockSizes(
      32, 64, 32, 4, 3, fwd_group=2, grad_chunk=48, grad_block_rows=16, grad_block_cols=16
    ),
  ],
)
def test_several_block_sizes(block_sizes):
  # D = 80 is not a multiple of 32 or 64: exercises zero-padding D as well.
  x, y, xi, yi = _inputs(404, 120, 88, 80, F32, n_ids=30)
  _check_against_oracle(x, y, xi, yi, LOG10, -10.0, block_sizes, 1e-5)


def test_single_row_and_tiny_dim():
  x, y, xi, yi = _inputs(505, 1, 5, 3, F32)
  _check_against_oracle(x, y, xi, yi, LOG10, -10.0, None, 1e-5)


def test_standalone_custom_vjp_scales_by_cotangent():
  x, y, xi, yi = _inputs(606, 40, 40, 32, F32, n_ids=25)
  lt, b = jnp.float32(LOG10), jnp.float32(-5.0)

  def f(x, y, lt, b):
    return 3.0 * gpu.block_loss_sum(x, y, xi, yi, lt, b, block_sizes=SMALL, interpret=True)

  loss, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(x, y, lt, b)
  ref_loss, ref_grads = block_oracle(x, y, xi, yi, LOG10, -5.0)
  assert rel_err(loss, 3.0 * ref_loss) < 1e-5
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, 3.0 * np.asarray(r)) < 1e-5


def test_public_api_jit_grad_with_pair_ids():
  x, y = random_inputs(707, 72, 48)
  ids = jax.random.randint(jax.random.key(708), (72,), 0, 30).astype(jnp.int32)
  lt, b = jnp.float32(LOG10), jnp.float32(-10.0)

  def loss_fn(x, y, lt, b):
    return siglip_fast.sigmoid_loss(
      x, y, lt, b, pair_ids=ids, implementation="pallas_gpu", interpret=True
    )

  loss, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))(x, y, lt, b)
  ref_loss, ref_grads = numpy_loss_and_grads(x, y, LOG10, -10.0, ids)
  assert rel_err(loss, ref_loss) < 1e-5
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) < 1e-5
  # Forward only (the loss-only kernel), through jax.jit.
  assert rel_err(jax.jit(loss_fn)(x, y, lt, b), ref_loss) < 1e-5


def test_ring_local_step_under_shard_map():
  n_dev, b_local, dim = 4, 24, 32
  mesh = Mesh(np.array(jax.devices()[:n_dev]), ("d",))
  x, y = random_inputs(808, n_dev * b_local, dim)
  lt, b = jnp.float32(LOG10), jnp.float32(-10.0)

  def local(x, y, lt, b):
    return siglip_fast.sigmoid_loss(
      x, y, lt, b, axis_name="d", implementation="pallas_gpu", interpret=True
    )

  ring = jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d"), P(), P()), out_specs=P())
  loss, grads = jax.jit(jax.value_and_grad(ring, argnums=(0, 1, 2, 3)))(x, y, lt, b)
  ref_loss, ref_grads = jax.value_and_grad(dense.sigmoid_loss_dense, argnums=(0, 1, 2, 3))(
    x, y, lt, b
  )
  assert rel_err(loss, ref_loss) < 1e-5
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) < 1e-5
  assert rel_err(jax.jit(ring)(x, y, lt, b), ref_loss) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(F32, 1e-5), (BF16, 1e-2)])
def test_bigger_ragged_default_tiles(dtype, tol):
  # Several 128-row tiles, a ragged edge and a D that needs two BK chunks.
  x, y, xi, yi = _inputs(909, 300, 260, 192, dtype, n_ids=200)
  _check_against_oracle(x, y, xi, yi, LOG10, -10.0, None, tol)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["unidirectional", "bidirectional"])
def test_ring_bf16_and_pair_ids(schedule):
  n_dev, b_local, dim = 4, 16, 32
  mesh = Mesh(np.array(jax.devices()[:n_dev]), ("d",))
  x, y = random_inputs(1010, n_dev * b_local, dim, BF16)
  ids = jax.random.randint(jax.random.key(1011), (n_dev * b_local,), 0, 20).astype(jnp.int32)
  lt, b = jnp.float32(LOG10), jnp.float32(-10.0)

  def local(x, y, ids, lt, b):
    return siglip_fast.sigmoid_loss(
      x,
      y,
      lt,
      b,
      pair_ids=ids,
      axis_name="d",
      implementation="pallas_gpu",
      interpret=True,
      schedule=schedule,
    )

  ring = jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d"), P("d"), P(), P()), out_specs=P())
  f = lambda x, y, lt, b: ring(x, y, ids, lt, b)
  loss, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(x, y, lt, b)
  ref_loss, ref_grads = numpy_loss_and_grads(x, y, LOG10, -10.0, ids)
  assert rel_err(loss, ref_loss) < 1e-5
  for g, r, tol in zip(grads, ref_grads, (1e-2, 1e-2, 1e-5, 1e-5)):
    assert rel_err(g, r) < tol


def test_log1p_polynomial_matches_log1p_on_unit_interval():
  # The kernels' branch-free log1p(e) for e = exp(-|l|) in [0, 1], in float32 (normal
  # floats: XLA:CPU, like the GPU kernels, flushes denormals, where e*poly would be 0).
  e = np.concatenate([np.linspace(0, 1, 200001), np.geomspace(1e-37, 1, 20001)])
  got = np.asarray(jax.jit(gpu._log1p_unit)(jnp.asarray(e, F32)), np.float64)
  e32 = np.asarray(jnp.asarray(e, F32), np.float64)
  want = np.log1p(e32)
  nz = want > 0
  assert np.max(np.abs(got[nz] - want[nz]) / want[nz]) < 3e-7
  assert np.all(got[~nz] == 0)


# --- structure: the Triton lowering, FLOPs, defaults ----------------------------------------


def _lower_cuda(fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _abstract(n, d, dtype):
  s = jax.ShapeDtypeStruct
  return (
    s((n, d), dtype),
    s((n, d), dtype),
    s((n,), jnp.int32),
    s((n,), jnp.int32),
    s((), F32),
    s((), F32),
  )


@pytest.mark.parametrize("d", [768, 1152])
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("n", [32768, 1000])
def test_triton_lowering_of_default_block_sizes(n, d, dtype):
  args = _abstract(n, d, dtype)
  fwd = _lower_cuda(gpu.block_loss_sum, *args)
  vg = _lower_cuda(jax.value_and_grad(gpu.block_loss_sum, argnums=(0, 1, 4, 5)), *args)
  # One Triton kernel each, and no XLA matmul in the forward: it does no gradient work.
  # The value-and-grad has exactly the two gradient matmuls (G_c @ Y_c, G_c^T @ X), each
  # three bf16 matmuls (bf16x3) for float32 inputs, and no float32-operand matmul at all.
  assert fwd.count("__gpu$xla.gpu.triton") == 1
  assert "stablehlo.dot_general" not in fwd
  assert vg.count("__gpu$xla.gpu.triton") == 1
  assert vg.count("stablehlo.dot_general") == (6 if dtype == F32 else 2)
  dots = [line for line in vg.splitlines() if "stablehlo.dot_general" in line]
  assert all("xf32>, tensor" not in line.split("->")[0] for line in dots), dots


@pytest.mark.parametrize("schedule", ["unidirectional", "bidirectional"])
def test_ring_lowering_under_shard_map(schedule):
  # The compiled kernels as the ring's local step, under shard_map with check_vma=True
  # (the default), lowered for CUDA: the kernels' outputs carry the right varying axes,
  # the replicated log_t / bias get replicated gradients, the permutes are XLA's.
  n_dev, b_local, d = 4, 4096, 768
  mesh = Mesh(np.array(jax.devices()[:n_dev]), ("d",))
  ops = gpu.block_ops()

  def local(x, y, ids, lt, b):
    return ring_loss(x, y, ids, ids, lt, b, axis_name="d", schedule=schedule, ops=ops)

  f = jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d"), P("d"), P(), P()), out_specs=P())
  s = jax.ShapeDtypeStruct
  args = (s((n_dev * b_local, d), BF16),) * 2 + (
    s((n_dev * b_local,), jnp.int32),
    s((), F32),
    s((), F32),
  )
  vg = _lower_cuda(jax.value_and_grad(f, argnums=(0, 1, 3, 4)), *args)
  fwd = _lower_cuda(f, *args)
  for text in (vg, fwd):
    assert "__gpu$xla.gpu.triton" in text and "collective_permute" in text
  assert "stablehlo.dot_general" not in fwd


def test_triton_lowering_rejects_non_power_of_two_tiles():
  bs = gpu.BlockSizes()
  object.__setattr__(bs, "block_k", 48)  # bypass validation: the lowering must catch it
  with pytest.raises(Exception, match="power of 2"):
    _lower_cuda(functools.partial(gpu.block_loss_sum, block_sizes=bs), *_abstract(4096, 1152, BF16))


def test_default_block_sizes_by_shape():
  big = gpu.default_block_sizes(32768, 32768, 1152, BF16)
  # The largest tiles that compile for sm_90a with no spills (benchmarks/gpu_ptxas.py).
  assert (big.block_rows, big.block_cols, big.block_k, big.num_warps) == (128, 128, 64, 8)
  assert big.grad_tile == (128, 128) and big.grad_num_warps == 16
  wide = gpu.default_block_sizes(32768, 32768, 1152, F32)
  assert (wide.block_rows, wide.block_cols, wide.block_k, wide.num_warps) == (64, 128, 32, 8)
  assert wide.grad_tile == (64, 128) and wide.grad_num_warps == 8
  # C is at least 4 x the ridge (1200 text rows, rounded to the tile: 1280), so that the dX
  # accumulator's traffic stays under the dX matmul's time.
  assert big.grad_chunk >= gpu.min_grad_chunk(1152, BF16) == 1200
  small = gpu.default_block_sizes(20, 20, 40, F32)
  assert small.block_rows == small.block_cols == 32 and small.block_k == 32
  assert small.grad_tile == (32, 32) and small.grad_chunk == 32
  for n, d in ((4096, 768), (16384, 1152), (1 << 20, 768)):
    bs = gpu.default_block_sizes(n, n, d, BF16)
    assert d % bs.block_k == 0
    assert bs.grad_chunk % bs.grad_tile[1] == 0
  # The dataclass's own defaults use one tile for both kernels.
  assert gpu.BlockSizes().grad_tile == (128, 128)
  assert gpu.BlockSizes(block_cols=64, grad_block_cols=32, grad_chunk=96).grad_tile == (128, 32)


@pytest.mark.parametrize("d", [768, 1152])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_grad_plan_at_32768(d, dtype):
  # Static: no arrays. The value-and-grad's live temp (G slab + float32 dX accumulator +
  # one dY_c) is >= 50x below XLA dense's 12 B^2 bytes, and the accumulator's HBM traffic
  # per step stays under the dX matmul's tensor-core time (ratio < 1 at the H100's ridge).
  plan = gpu.grad_plan(32768, 32768, d, dtype)
  assert plan["xla_dense_bytes"] / plan["temp_bytes"] >= 50, plan
  assert plan["acc_over_matmul"] < 1, plan
  assert plan["m_pad"] >= 32768 and plan["n_pad"] == 32768 and plan["d_pad"] == d
  itemsize = jnp.dtype(dtype).itemsize
  assert plan["slab_bytes"] == 32768 * plan["chunk"] * itemsize
  assert plan["acc_bytes"] == 32768 * d * 4
  if dtype == BF16:  # the slab and the number of steps at the benchmark's target shape
    assert (plan["chunk"], plan["n_chunks"]) == ((1280, 26) if d == 1152 else (1920, 18))


def test_grad_plan_at_one_million():
  # B = 1,048,576, D = 768 bf16: the G slab is 1920 text rows (2048 would be 2^31 elements,
  # past int32 indexing), the dX accumulator 3 GiB, and the grid fits CUDA's limits; XLA
  # dense would need 12 TiB.
  n = 1 << 20
  bs = gpu.default_block_sizes(n, n, 768, BF16)
  plan = gpu.grad_plan(n, n, 768, BF16, bs)
  assert plan["chunk"] == 1920 and plan["n_chunks"] == 547
  assert plan["slab_bytes"] == 3840 << 20 and plan["slab_elements"] < 2**31
  assert plan["acc_bytes"] == 3 << 30 and plan["acc_over_matmul"] < 1
  assert plan["xla_dense_bytes"] / plan["temp_bytes"] > 1000
  assert n // bs.grad_tile[0] <= 65535 and n // bs.block_rows <= 65535
  # The compiled lowering agrees (abstract shapes only).
  text = _lower_cuda(gpu.block_loss_sum_and_grads, *_abstract(n, 768, BF16))
  assert f"tensor<{n}x1920xbf16>" in text


def test_partial_column_group_is_sliced_off():
  # 5 column tiles in groups of 2: the grid has a third, partial group whose spare program
  # writes no partial sum. Interpret mode zero-fills that slot; on a GPU it is garbage, so
  # the caller must slice it off before summing: check that statically.
  bs = dataclasses.replace(SMALL, fwd_group=2)
  s = jax.ShapeDtypeStruct
  xp, yp = s((64, 32), F32), s((160, 32), F32)
  ids_x, ids_y = s((64,), jnp.int32), s((160,), jnp.int32)
  scal, rng = s((2,), F32), s((2,), jnp.int32)
  f = functools.partial(gpu._tiles, bs=bs, n=64, mask_cols=False, with_grads=False, interpret=True)
  (loss,) = jax.eval_shape(f, xp, yp, ids_x, ids_y, scal, rng)
  assert loss.shape == (2, 5)
  jaxpr = jax.make_jaxpr(f)(xp, yp, ids_x, ids_y, scal, rng)
  (call,) = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
  assert call.outvars[0].aval.shape == (2, 6)  # 3 groups of 2: one spare program per row
  assert tuple(call.params["grid_mapping"].grid) == (2, 2, 3)  # (group, rows, groups)


@pytest.mark.parametrize("dtype,tol", [(F32, 1e-5), (BF16, 1e-2)])
def test_fast_math_worst_case_ragged_multichunk(dtype, tol):
  # Interpret mode has no PTX: "emulate" applies rcp.approx's 1 ulp and ex2.approx's 2 ulp
  # (the PTX ISA's bounds) as one-sided steps on every element, so the errors add up
  # instead of cancelling. Ragged n and m, three G chunks of 32 (the last overlapping the
  # second), a partial column group, repeated ids; the same tolerances as exact math.
  bs = gpu.BlockSizes(32, 32, 32, 4, 2, fwd_group=2, grad_chunk=32)
  x, y, xi, yi = _inputs(1313, 70, 75, 48, dtype, n_ids=30)
  lt, b = jnp.float32(LOG10), jnp.float32(-10.0)
  ref_loss, ref_grads, scales = block_oracle(x, y, xi, yi, LOG10, -10.0, with_scales=True)
  outs = {}
  for mode in ("exact", "emulate"):
    kw = dict(block_sizes=bs, interpret=True, fast_math=mode)
    fwd = jax.jit(lambda *a: gpu.block_loss_sum(*a, **kw))(x, y, xi, yi, lt, b)
    loss, grads = jax.jit(lambda *a: gpu.block_loss_sum_and_grads(*a, **kw))(x, y, xi, yi, lt, b)
    outs[mode] = (fwd, loss, grads)
    assert rel_err(fwd, ref_loss) < 1e-5 and rel_err(loss, ref_loss) < 1e-5
    assert rel_err(grads[0], ref_grads[0]) < tol and rel_err(grads[1], ref_grads[1]) < tol
    for g, r, scale in zip(grads[2:], ref_grads[2:], scales):
      assert abs(float(g) - r) / scale < 1e-5
  # The emulated approximations move the float32 results, by about their ulps. dX shows it
  # element by element (float32 inputs; bf16 dX rounds the shift away). The loss total is
  # not compared for a change: its positives dominate it (1987 against a shift of ~1e-7 in
  # the negatives' terms), so whether the float32 sum moves depends on the CPU's summation
  # order (it did on one CI machine, not on the next).
  (f0, _, g0), (f1, _, g1) = outs["exact"], outs["emulate"]
  assert rel_err(f1, np.asarray(f0, np.float64)) < 1e-6
  if dtype == F32:
    assert 0 < rel_err(g1[0], np.asarray(g0[0], np.float64)) < 1e-6


def test_fast_math_mode_must_match_interpret():
  x, y, xi, yi = _inputs(1414, 8, 8, 16, F32)
  with pytest.raises(ValueError, match="'ptx' is for compiled kernels"):
    gpu.block_loss_sum(x, y, xi, yi, 0.0, 0.0, interpret=True, fast_math="ptx")
  with pytest.raises(ValueError, match="'exact' and 'emulate' for interpret mode"):
    _lower_cuda(functools.partial(gpu.block_loss_sum, fast_math="exact"), *_abstract(64, 32, F32))


def test_bf16x3_dot_error_bound():
  # bf16x3 keeps ~16 significant bits of each float32 operand and drops lo * lo: each product
  # is within ~3 * 2^-17 relative, so a dot is within ~2^-15 of sum |a_k b_k| even with
  # one-sided errors; random signs land far below (measured here: ~2^-18).
  rng = np.random.default_rng(1515)
  a = rng.standard_normal((64, 256)).astype(np.float32)
  b = rng.standard_normal((48, 256)).astype(np.float32)
  got = np.asarray(
    jax.jit(lambda a, b: gpu._dot_bf16x3(a, b, (((1,), (1,)), ((), ()))))(a, b), np.float64
  )
  want = a.astype(np.float64) @ b.astype(np.float64).T
  scale = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)).T
  assert np.max(np.abs(got - want) / scale) < 2.0**-15
  assert np.mean(np.abs(got - want) / scale) < 2.0**-17
  # ... and it is not plain bf16 (which is ~2^-9 per product).
  bf = np.asarray(
    jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16).T, preferred_element_type=jnp.float32),
    np.float64,
  )
  assert np.max(np.abs(bf - want) / scale) > 2.0**-12


def test_scalars_fold_log2e():
  t2, b2 = np.asarray(gpu._scalars(jnp.float32(LOG10), jnp.float32(-10.0)), np.float64)
  assert t2 == pytest.approx(10.0 / math.log(2.0), rel=1e-6)
  assert b2 == pytest.approx(-10.0 / math.log(2.0), rel=1e-6)


# --- errors --------------------------------------------------------------------------------

X32, Y32, XI, YI = _inputs(1111, 8, 8, 16, F32)


@pytest.mark.parametrize(
  "args,exc,match",
  [
    ((X32[0], Y32, XI, YI, 0.0, 0.0), ValueError, "x must be a 2-D"),
    ((X32, Y32[:, :4], XI, YI, 0.0, 0.0), ValueError, "same dim"),
    ((X32.astype(jnp.float16), Y32, XI, YI, 0.0, 0.0), TypeError, "x must be float32 or bf"),
    ((X32, Y32.astype(BF16), XI, YI, 0.0, 0.0), TypeError, "same dtype"),
    ((X32, Y32, XI[:4], YI, 0.0, 0.0), TypeError, "x_ids must be int32 of shape \\(8,\\)"),
    ((X32, Y32, XI, YI.astype(F32), 0.0, 0.0), TypeError, "y_ids must be int32"),
    ((X32, Y32, XI, YI, jnp.zeros(2), 0.0), ValueError, "log_t must be a scalar"),
    ((X32, Y32, XI, YI, 0.0, 1), TypeError, "bias must be a floating-point scalar"),
  ],
)
def test_bad_inputs(args, exc, match):
  with pytest.raises(exc, match=match):
    gpu.block_loss_sum(*args, interpret=True)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(block_rows=48), "block_rows must be a power of two"),
    (dict(block_k=8), "block_k must be a power of two >= 16"),
    (dict(num_warps=3), "num_warps must be a power of two"),
    (dict(num_stages=0), "num_stages must be a positive int"),
    (dict(grad_chunk=100), "grad_chunk must be a positive multiple of the value-and-grad"),
    (dict(grad_block_cols=48), "grad_block_cols must be a power of two"),
    (dict(grad_num_warps=64), "grad_num_warps must be a power of two <= 32"),
  ],
)
def test_bad_block_sizes(kwargs, match):
  with pytest.raises(ValueError, match=match):
    gpu.BlockSizes(**kwargs)


def test_block_ops_rejects_foreign_block_sizes():
  with pytest.raises(TypeError, match="block_sizes must be a siglip_fast.kernels.gpu"):
    gpu.block_ops(interpret=True, block_sizes=(128, 128))


# --- on a real GPU -------------------------------------------------------------------------


@on_gpu
@pytest.mark.parametrize("dtype,tol", [(F32, 1e-5), (BF16, 1e-2)])
def test_compiled_on_gpu_matches_reference(dtype, tol):
  # Ragged n; the reference runs at highest precision so float32 is not TF32 on both sides.
  x, y, xi, yi = _inputs(1212, 2000, 2000, 768, dtype, n_ids=1500)
  lt, b = jnp.float32(LOG10), jnp.float32(-10.0)
  fwd = jax.jit(gpu.block_loss_sum)(x, y, xi, yi, lt, b)
  loss, grads = jax.jit(gpu.block_loss_sum_and_grads)(x, y, xi, yi, lt, b)
  with jax.default_matmul_precision("highest"):
    ref_loss, ref_grads = jax.jit(dense.block_loss_sum_and_grads)(x, y, xi, yi, lt, b)
  assert rel_err(fwd, ref_loss) < 1e-5 and rel_err(loss, ref_loss) < 1e-5
  for g, r, t in zip(grads, ref_grads, (tol, tol, 1e-5, 1e-5)):
    assert rel_err(g, np.asarray(r, np.float32)) < t

"""Every registered implementation held to one float64 oracle, through the public API.

One oracle (``tests.helpers.numpy_loss_and_grads``, float64 NumPy from the loss's definition),
one tolerance table per input dtype, and one list of cases, parametrised over the registry
(``siglip_fast.loss.REGISTRY``): a new implementation is covered by adding its entry. Kernels
run in interpret mode here (no accelerator in CI). Backend test files keep only what is
backend-specific (Mosaic compiles, VMEM plans, Triton lowering, DMA races).

Tolerances (relative Frobenius error against float64):
  float32 inputs   1e-5 for the value and every gradient: float32 accumulation over at most a
                   few thousand terms, matmuls at full float32 precision.
  bfloat16 inputs  value, dlog_t and dbias 1e-4 (products of bf16 values are exact in float32;
                   only the accumulation rounds), dx and dy 1e-2 (G is rounded to bf16 for
                   the gradient matmuls, as the matrix units take it: 2^-8 relative per term).
dlog_t and dbias are sums of B^2 terms of both signs that largely cancel; their error is
measured against the sum of the terms' magnitudes (``scalar_grad_scales``), the quantity a
float32 sum's rounding error is proportional to.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import siglip_fast
from siglip_fast.loss import REGISTRY
from tests.helpers import numpy_loss_and_grads, random_inputs, rel_err, scalar_grad_scales

TOL = {jnp.float32: dict(value=1e-5, grad=1e-5), jnp.bfloat16: dict(value=1e-4, grad=1e-2)}
IMPLS = sorted(REGISTRY)
LOG10 = math.log(10.0)


def _kwargs(name):
  return {"implementation": name, "interpret": REGISTRY[name].platform is not None}


def _check(got, want, scales, dtype, what=""):
  (val, grads), (ref_val, ref_grads) = got, want
  tol = TOL[dtype]
  assert np.isfinite(float(val)), what
  assert rel_err(val, ref_val) < tol["value"], (what, "value", rel_err(val, ref_val))
  for name, g, r in zip(("dx", "dy"), grads, ref_grads):
    assert bool(jnp.all(jnp.isfinite(jnp.asarray(g, jnp.float32)))), (what, name)
    assert rel_err(g, r) < tol["grad"], (what, name, rel_err(g, r))
  for name, g, r, scale in zip(("dlog_t", "dbias"), grads[2:], ref_grads[2:], scales):
    err = abs(float(g) - float(r)) / max(scale, abs(float(r)))
    assert err < tol["value"], (what, name, err)


def _oracle(x, y, lt, b, ids=None):
  return numpy_loss_and_grads(x, y, lt, b, ids), scalar_grad_scales(x, y, lt, b, ids)


def _value_and_grad(fn, *args):
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(*args)


CASES = {
  # name: (batch, dim, log_t, bias, pair ids or None)
  "square": (64, 32, LOG10, -10.0, None),
  "ragged": (100, 48, LOG10, -10.0, None),
  "one_row": (1, 8, LOG10, -10.0, None),
  "duplicate_ids": (40, 16, LOG10, -10.0, np.arange(40) // 3),
  "hot_and_biased": (48, 16, math.log(100.0), 20.0, None),
  "cold_negative_bias": (48, 16, 0.0, -20.0, None),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_single_device(impl, case, dtype):
  batch, dim, lt, b, ids = CASES[case]
  if dtype == jnp.bfloat16 and case not in ("square", "ragged", "duplicate_ids"):
    pytest.skip("bf16 runs the shape cases; the scalar extremes are dtype-independent")
  x, y = random_inputs(zlib.crc32(f"{impl} {case}".encode()), batch, dim, dtype)
  kw = _kwargs(impl)
  pair_ids = None if ids is None else jnp.asarray(ids, jnp.int32)
  f = lambda x, y, lt, b: siglip_fast.sigmoid_loss(x, y, lt, b, pair_ids=pair_ids, **kw)
  got = _value_and_grad(f, x, y, jnp.float32(lt), jnp.float32(b))
  _check(got, *_oracle(x, y, lt, b, ids), dtype, f"{impl} {case}")
  # The forward alone (no grad: the loss-only kernels) gives the same value.
  assert (
    rel_err(
      jax.jit(f)(x, y, jnp.float32(lt), jnp.float32(b)), numpy_loss_and_grads(x, y, lt, b, ids)[0]
    )
    < TOL[dtype]["value"]
  )


@pytest.mark.parametrize("impl", IMPLS)
def test_cotangent_scales_every_gradient(impl):
  x, y = random_inputs(7, 32, 16)
  kw = _kwargs(impl)
  f = lambda x, y, lt, b: 3.5 * siglip_fast.sigmoid_loss(x, y, lt, b, **kw)
  val, grads = _value_and_grad(f, x, y, jnp.float32(LOG10), jnp.float32(-10.0))
  _check((val / 3.5, [g / 3.5 for g in grads]), *_oracle(x, y, LOG10, -10.0), jnp.float32, impl)


RINGS = [
  (impl, n, schedule)
  for impl in IMPLS
  for n in (2, 3, 4)
  for schedule in ("bidirectional", "unidirectional")
]


@pytest.mark.parametrize("impl,n_dev,schedule", RINGS)
def test_ring_under_shard_map(impl, n_dev, schedule):
  # Local batch 8 with duplicate ids that span devices: positives off the diagonal block.
  b_local, dim = 8, 16
  batch = b_local * n_dev
  x, y = random_inputs(11 * n_dev, batch, dim)
  ids = np.arange(batch) % (batch - 3)
  mesh = Mesh(np.array(jax.devices()[:n_dev]), ("batch",))
  kw = _kwargs(impl)

  def local(x, y, ids, lt, b):
    return siglip_fast.sigmoid_loss(
      x, y, lt, b, pair_ids=ids, axis_name="batch", schedule=schedule, **kw
    )

  f = jax.shard_map(local, mesh=mesh, in_specs=(P("batch"),) * 3 + (P(), P()), out_specs=P())
  lt, b = jnp.float32(LOG10), jnp.float32(-10.0)
  got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 3, 4)))(
    x, y, jnp.asarray(ids, jnp.int32), lt, b
  )
  _check(got, *_oracle(x, y, LOG10, -10.0, ids), jnp.float32, f"{impl} ring of {n_dev} {schedule}")


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("schedule", ["bidirectional", "unidirectional"])
def test_ring_of_eight_bf16(impl, schedule):
  n_dev, b_local, dim = 8, 16, 32
  x, y = random_inputs(88, n_dev * b_local, dim, jnp.bfloat16)
  got = _value_and_grad(
    lambda x, y, lt, b: siglip_fast.sigmoid_loss_sharded(
      x,
      y,
      lt,
      b,
      mesh=Mesh(np.array(jax.devices()[:n_dev]), ("batch",)),
      axis_name="batch",
      schedule=schedule,
      **_kwargs(impl),
    ),
    x,
    y,
    jnp.float32(LOG10),
    jnp.float32(-10.0),
  )
  _check(got, *_oracle(x, y, LOG10, -10.0), jnp.bfloat16, f"{impl} ring of 8")

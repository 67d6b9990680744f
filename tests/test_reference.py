"""The dense reference against an independent float64 NumPy computation (docs/DESIGN.md section 1)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_fast.reference import sigmoid_loss_dense
from tests.helpers import numpy_loss_and_grads, random_inputs, rel_err

# fp32: float32 accumulation over D products and B^2 terms, ~1e-6 in practice; 1e-5 leaves
# headroom for reduction order. bf16 inputs are held at their stored (bf16) values by the
# oracle, so the only error is float32 arithmetic and the bf16 rounding of the gradients
# themselves (8 mantissa bits: 2^-8 ~ 4e-3 per element).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _grads(x, y, log_t, bias, ids=None):
  f = lambda *a: sigmoid_loss_dense(*a, pair_ids=ids)
  return jax.value_and_grad(f, argnums=(0, 1, 2, 3))(x, y, log_t, bias)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
  "batch,dim,log_t,bias",
  [
    (1, 1, math.log(10.0), -10.0),
    (7, 3, math.log(10.0), -10.0),
    (33, 16, 0.0, 0.0),
    (130, 48, math.log(10.0), -2.71),
    (61, 8, math.log(100.0), 20.0),  # extreme: t = 100, b = +20
    (61, 8, math.log(100.0), -20.0),  # extreme: t = 100, b = -20
  ],
)
def test_dense_matches_float64_numpy(dtype, batch, dim, log_t, bias):
  seed = batch * 1000 + dim + int(bias)
  x, y = random_inputs(seed, batch, dim, dtype)
  lt, b = jnp.float32(log_t), jnp.float32(bias)
  loss, (dx, dy, dlt, db) = _grads(x, y, lt, b)
  ref_loss, (rdx, rdy, rdlt, rdb) = numpy_loss_and_grads(x, y, lt, b)
  for got in (loss, dx, dy, dlt, db):
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
  assert dx.dtype == dtype and dy.dtype == dtype and loss.dtype == jnp.float32
  tol = TOL[dtype]
  assert rel_err(loss, ref_loss) < tol
  assert rel_err(dx, rdx) < tol
  assert rel_err(dy, rdy) < tol
  assert rel_err(dlt, rdlt) < tol
  assert rel_err(db, rdb) < tol


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pair_ids_with_duplicates(dtype):
  batch, dim = 40, 12
  x, y = random_inputs(7, batch, dim, dtype)
  ids = jax.random.randint(jax.random.key(8), (batch,), 0, 15)  # many repeats
  assert len(np.unique(np.asarray(ids))) < batch
  lt, b = jnp.float32(math.log(10.0)), jnp.float32(-10.0)
  loss, grads = _grads(x, y, lt, b, ids)
  ref_loss, ref_grads = numpy_loss_and_grads(x, y, lt, b, ids)
  assert rel_err(loss, ref_loss) < TOL[dtype]
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) < TOL[dtype]
  # Duplicates change the loss: the same batch with only the diagonal positive differs.
  assert abs(float(loss) - float(sigmoid_loss_dense(x, y, lt, b))) > 1e-3


def test_extreme_logits_do_not_overflow():
  # |logits| up to ~1e4: log(sigmoid(.)) would give -inf / nan; softplus stays finite.
  x, y = random_inputs(3, 16, 4)
  lt, b = jnp.float32(math.log(1e4)), jnp.float32(20.0)
  loss, grads = _grads(x, y, lt, b)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  ref_loss, _ = numpy_loss_and_grads(x, y, lt, b)
  assert rel_err(loss, ref_loss) < 1e-5


def test_normalisation_is_by_batch_not_batch_squared():
  # All logits at the bias: positives cost softplus(-b), negatives softplus(b).
  batch, b = 10, -10.0
  x = jnp.zeros((batch, 4), jnp.float32)
  loss = sigmoid_loss_dense(x, x, jnp.float32(0.0), jnp.float32(b))
  expected = batch * math.log1p(math.exp(-b)) + batch * (batch - 1) * math.log1p(math.exp(b))
  np.testing.assert_allclose(float(loss), expected / batch, rtol=1e-6)

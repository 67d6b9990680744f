"""Shared test utilities: fresh random inputs, float64 NumPy oracles, a compile cache."""

from __future__ import annotations

import contextlib

import numpy as np
import jax
import jax.numpy as jnp


def random_inputs(seed, batch, dim, dtype=jnp.float32, normalise=True):
  """(img, txt) of shape (batch, dim) in ``dtype``; L2-normalised rows like the towers give."""
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (batch, dim), jnp.float32)
  y = jax.random.normal(ky, (batch, dim), jnp.float32)
  if normalise:
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    y = y / jnp.linalg.norm(y, axis=-1, keepdims=True)
  return x.astype(dtype), y.astype(dtype)


def numpy_loss_and_grads(x, y, log_t, bias, ids=None):
  """Mean loss and (dx, dy, dlog_t, dbias) in float64 NumPy, from docs/DESIGN.md section 1.

  Inputs are taken at their stored precision (bf16 values upcast exactly to float64).
  """
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  n = x.shape[0]
  ids = np.arange(n) if ids is None else np.asarray(ids)
  t = np.exp(np.float64(log_t))
  sim = x @ y.T
  logits = t * sim + np.float64(bias)
  pos = ids[:, None] == ids[None, :]
  z = np.where(pos, 1.0, -1.0)
  u = -z * logits
  loss = np.sum(np.maximum(u, 0) + np.log1p(np.exp(-np.abs(u)))) / n
  sig = 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid without overflow
  g = (sig - pos) / n
  return loss, (t * g @ y, t * g.T @ x, np.sum(g * (logits - bias)), np.sum(g))


def scalar_grad_scales(x, y, log_t, bias, ids=None):
  """The sums of |terms| (over B) of dlog_t = sum g * (logits - b) and dbias = sum g.

  Both are sums of B^2 terms of either sign that largely cancel, so their float32 error is
  bounded relative to these sums, not to the (much smaller) results.
  """
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  n = x.shape[0]
  ids = np.arange(n) if ids is None else np.asarray(ids)
  t = np.exp(np.float64(log_t))
  ts = t * (x @ y.T)
  g = 0.5 * (1.0 + np.tanh(0.5 * (ts + np.float64(bias)))) - (ids[:, None] == ids[None, :])
  return np.sum(np.abs(g * ts)) / n, np.sum(np.abs(g)) / n


def rel_err(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@contextlib.contextmanager
def persistent_compilation_cache(cache_dir):
  """jax's persistent compilation cache in ``cache_dir`` for the duration: test modules whose
  runs share programs (the trainer's tiny configs) spend most of their time compiling."""
  from jax.experimental.compilation_cache import compilation_cache as cc

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(cache_dir))
  jax.config.update(names[1], 0.2)
  cc.reset_cache()
  try:
    yield
  finally:
    for n, v in old.items():
      jax.config.update(n, v)
    cc.reset_cache()


def all_eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in its equations (shard_map's, a
  pallas_call's kernel), in order."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from all_eqns(inner)


def pallas_calls(jaxpr):
  """The params of every pallas_call in a jaxpr and the jaxprs nested in it, in order."""
  return (e.params for e in all_eqns(jaxpr) if e.primitive.name == "pallas_call")


def scratch_shapes(params) -> list[tuple[int, ...]]:
  """The shapes of a pallas_call's scratch operands (its kernel's last arguments)."""
  invars = params["jaxpr"].invars
  return [
    tuple(v.aval.shape) for v in invars[len(invars) - params["grid_mapping"].num_scratch_operands :]
  ]

"""The one input validator of the public API and every kernel.

All checks run at trace time on shapes and dtypes (values only where an eager call makes them
concrete), so they cost nothing in a compiled step. Each error names the argument and what was
expected. The API calls them with the user's argument names (``img_emb``, ``txt_emb``,
``pair_ids``); kernels with their own (``x``, ``y``, ``x_ids``, ``y_ids``).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

EMB_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def check_embeddings(a, b, names=("img_emb", "txt_emb"), *, same_rows: bool = True):
  """Two (rows, dim) float32 or bfloat16 arrays of one dtype and dim (and, by default, the
  same number of rows)."""
  for arg, v in zip(names, (a, b)):
    if not hasattr(v, "shape") or not hasattr(v, "dtype"):
      raise TypeError(f"{arg} must be an array, got {type(v).__name__}")
    if v.ndim != 2:
      raise ValueError(f"{arg} must have shape (batch, dim), got shape {tuple(v.shape)}")
    if jnp.dtype(v.dtype) not in EMB_DTYPES:
      raise TypeError(f"{arg} must be float32 or bfloat16, got {v.dtype}")
    if v.shape[0] == 0 or v.shape[1] == 0:
      raise ValueError(f"{arg} must be non-empty, got shape {tuple(v.shape)}")
  shape_ok = a.shape == b.shape if same_rows else a.shape[1] == b.shape[1]
  if not shape_ok:
    what = "(batch, dim) shape" if same_rows else "dim"
    raise ValueError(
      f"{names[0]} and {names[1]} must have the same {what}, got "
      f"{tuple(a.shape)} and {tuple(b.shape)}"
    )
  if a.dtype != b.dtype:
    raise TypeError(
      f"{names[0]} and {names[1]} must have the same dtype, got {a.dtype} and {b.dtype}"
    )


def as_scalar(arg: str, v) -> jax.Array:
  """A float32 scalar from a Python number or a real array of shape () or (1,)."""
  if isinstance(v, (bool, np.bool_)) or not (isinstance(v, numbers.Real) or hasattr(v, "dtype")):
    raise TypeError(
      f"{arg} must be a real scalar (a Python number or an array of shape () "
      f"or (1,)), got {type(v).__name__}"
    )
  v = jnp.asarray(v)
  if v.shape not in ((), (1,)):
    raise ValueError(f"{arg} must be a scalar (shape () or (1,)), got shape {v.shape}")
  if not (jnp.issubdtype(v.dtype, jnp.floating) or jnp.issubdtype(v.dtype, jnp.integer)):
    raise TypeError(f"{arg} must be a real (floating-point or integer) scalar, got {v.dtype}")
  return v.reshape(()).astype(jnp.float32)


def check_ids(arg: str, ids, rows: int) -> jax.Array:
  """(rows,) integer pair ids, as int32."""
  if not hasattr(ids, "dtype"):
    ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{arg} must be integers, got {ids.dtype}")
  if tuple(ids.shape) != (rows,):
    raise ValueError(f"{arg} must have shape (batch,) = ({rows},), got {tuple(ids.shape)}")
  return jnp.asarray(ids).astype(jnp.int32)


def check_block_inputs(x, y, x_ids, y_ids, log_t, bias):
  """A kernel's block inputs: (n, D) and (m, D) embeddings, their ids, two scalars.

  Returns (x_ids, y_ids, log_t, bias) as int32 ids and float32 scalars.
  """
  check_embeddings(x, y, ("x", "y"), same_rows=False)
  return (
    check_ids("x_ids", x_ids, x.shape[0]),
    check_ids("y_ids", y_ids, y.shape[0]),
    as_scalar("log_t", log_t),
    as_scalar("bias", bias),
  )


def _concrete(a):
  """``a``'s value if it is known now (eager, or the primal of an eager ``grad``), else
  None."""
  if not isinstance(a, jax.core.Tracer):
    return a
  to_concrete = getattr(a, "to_concrete_value", None)  # a Tracer method on jax >= 0.5
  return to_concrete() if to_concrete is not None else None


def check_finite_if_concrete(**arrays):
  """Raise on NaN or inf in arrays whose values are known at call time.

  Under ``jit`` (and ``shard_map``) values are unknown at trace time: nothing is checked
  there, which is why the trainer checks its loss every step.
  """
  for arg, a in arrays.items():
    v = _concrete(a)
    if v is None:
      continue
    # On the host: jnp would trace into whatever context (e.g. eager shard_map) we are in.
    if not np.isfinite(np.asarray(v).astype(np.float32)).all():
      raise ValueError(f"{arg} contains non-finite values (NaN or inf)")

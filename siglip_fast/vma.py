"""shard_map's varying-manual-axes types, in one place for the ring and every kernel.

Under ``shard_map(check_vma=True)`` (the default) each value records the mesh axes it varies
over. A ``pallas_call`` must declare that for its outputs, its operands must agree, and the
gradient of a replicated input (log_t, bias) must be summed over the axes its computation
varied over. The attribute is ``manual_axis_type.varying`` on jax 0.10 and ``vma`` on some
other versions; these helpers hide the difference and are no-ops outside ``shard_map``.
"""

from __future__ import annotations

import jax
from jax import lax


def varying_axes(a) -> frozenset:
  """The shard_map axes ``a`` varies over; empty outside shard_map."""
  aval = jax.typeof(a)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None and hasattr(mat, "varying"):
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", None) or ())


def pvary(a, axes):
  """``a`` marked as varying over ``axes`` too (a no-op for axes it already varies over)."""
  missing = tuple(sorted(frozenset(axes) - varying_axes(a)))
  if not missing:
    return a
  if hasattr(lax, "pcast"):
    return lax.pcast(a, missing, to="varying")
  return lax.pvary(a, missing)  # older jax


def shape_struct(shape, dtype, axes=frozenset()) -> jax.ShapeDtypeStruct:
  """A ``pallas_call`` output type that varies over ``axes``."""
  if not axes:
    return jax.ShapeDtypeStruct(shape, dtype)
  mat_cls = getattr(jax.sharding, "ManualAxisType", None)
  if mat_cls is not None:
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat_cls(varying=frozenset(axes)))
  return jax.ShapeDtypeStruct(shape, dtype, vma=frozenset(axes))


def match_varying(operands):
  """Casts every operand to the union of their varying axes; returns (operands, axes)."""
  axes = frozenset().union(*map(varying_axes, operands))
  return tuple(pvary(o, axes) for o in operands), axes


def sum_to_match(grad, primal):
  """Sums ``grad`` over the axes it varies over and ``primal`` does not, as autodiff does
  for a replicated input (the transpose of its implicit broadcast is a psum)."""
  extra = varying_axes(grad) - varying_axes(primal)
  return lax.psum(grad, tuple(sorted(extra))) if extra else grad

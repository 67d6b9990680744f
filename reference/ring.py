"""The pure-JAX ring: the reference the distributed kernels are held to.

The shared ring driver (``siglip_fast.ring``) with the dense block of Algorithm 1
(``siglip_fast.reference.dense``): text chunks travel by ``lax.ppermute``, gradients by the
shared custom VJP. This is what ``implementation="xla"`` runs.
"""

from __future__ import annotations

from siglip_fast import ring as ring_lib
from siglip_fast.reference import dense

REFERENCE_OPS = ring_lib.BlockOps("xla", dense.block_loss_sum, dense.block_loss_sum_and_grads)


def ring_loss(
  x,
  y,
  x_ids,
  y_ids,
  log_t,
  bias,
  *,
  axis_name=None,
  schedule="bidirectional",
  ops: ring_lib.BlockOps = REFERENCE_OPS,
):
  """Mean SigLIP loss over the ring on ``axis_name`` (or one device when None).

  x, y: this device's (b, D) image and text chunks. x_ids, y_ids: their (b,) int32 pair ids,
  compared across devices. log_t, bias: float32 scalars, replicated. ``ops``: the block
  computation (default: the dense reference). Differentiable w.r.t. x, y, log_t and bias;
  the global batch is b times the axis size.
  """
  trip = ring_lib.block_trip(axis_name=axis_name, schedule=schedule, ops=ops)
  return ring_lib.global_mean(trip, x, y, x_ids, y_ids, log_t, bias, axis_name)

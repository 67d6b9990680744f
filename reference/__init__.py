"""Pure-JAX reference: the dense loss (paper Algorithm 1) and the ring over devices."""

from siglip_fast.reference.dense import block_loss_sum, block_loss_sum_and_grads, sigmoid_loss_dense
from siglip_fast.reference.ring import REFERENCE_OPS, ring_loss

__all__ = [
  "REFERENCE_OPS",
  "block_loss_sum",
  "block_loss_sum_and_grads",
  "ring_loss",
  "sigmoid_loss_dense",
]

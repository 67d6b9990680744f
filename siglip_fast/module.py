"""A Flax module that owns the learnable temperature and bias and calls ``sigmoid_loss``."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from siglip_fast.loss import sigmoid_loss


class SigmoidLoss(nn.Module):
  """SigLIP loss head with parameters ``log_t`` (t') and ``bias``.

  The paper initialises t' = log 10 and b = -10 (Table 4); big_vision's LiT-COCO config uses
  b = -2.71, hence both are arguments. Remaining keyword arguments of ``sigmoid_loss``
  (axis_name, implementation, schedule, interpret, block_sizes) are module attributes.
  """

  log_t_init: float = math.log(10.0)
  bias_init: float = -10.0
  axis_name: str | None = None
  implementation: str | None = None
  schedule: str = "bidirectional"
  interpret: bool = False
  block_sizes: object = None

  @nn.compact
  def __call__(self, img_emb, txt_emb, pair_ids=None):
    log_t = self.param("log_t", lambda _: jnp.asarray(self.log_t_init, jnp.float32))
    bias = self.param("bias", lambda _: jnp.asarray(self.bias_init, jnp.float32))
    return sigmoid_loss(
      img_emb,
      txt_emb,
      log_t,
      bias,
      pair_ids=pair_ids,
      axis_name=self.axis_name,
      implementation=self.implementation,
      interpret=self.interpret,
      schedule=self.schedule,
      block_sizes=self.block_sizes,
    )

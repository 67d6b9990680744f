"""Dense SigLIP loss in plain XLA: the paper's Algorithm 1, and the oracle for every kernel.

The unit every implementation provides is the *block loss sum*: for image rows ``x`` (n, D),
text rows ``y`` (m, D) and their pair ids,

    sum_ij softplus(-z_ij * (t * <x_i, y_j> + b)),   z_ij = +1 where x_ids[i] == y_ids[j] else -1,

in float32 whatever the input dtype. The mean loss over a batch of B pairs is that sum over all
blocks divided by B (docs/DESIGN.md section 1). Positives come only from comparing ids (DESIGN.md
section 7), so the same function serves the diagonal block, off-diagonal ring steps and
duplicate pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softplus(u: jax.Array) -> jax.Array:
  """log(1 + exp(u)) without overflow: max(u, 0) + log1p(exp(-|u|))."""
  return jnp.maximum(u, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(u)))


def logits(x, y, log_t, bias):
  """t * x @ y.T + b with float32 accumulation (bf16 operands stay bf16 on the matmul unit)."""
  sim = jnp.einsum("nd,md->nm", x, y, preferred_element_type=jnp.float32)
  return jnp.exp(log_t.astype(jnp.float32)) * sim + bias.astype(jnp.float32)


def block_loss_sum(x, y, x_ids, y_ids, log_t, bias) -> jax.Array:
  """Sum over the (n, m) block of -log sigmoid(z * logits), as a float32 scalar."""
  z = jnp.where(x_ids[:, None] == y_ids[None, :], 1.0, -1.0)
  return jnp.sum(softplus(-z * logits(x, y, log_t, bias)))


def block_loss_sum_and_grads(x, y, x_ids, y_ids, log_t, bias):
  """The block loss sum and its gradients w.r.t. (x, y, log_t, bias), by autodiff."""
  f = lambda x, y, log_t, bias: block_loss_sum(x, y, x_ids, y_ids, log_t, bias)
  return jax.value_and_grad(f, argnums=(0, 1, 2, 3))(x, y, log_t, bias)


def sigmoid_loss_dense(x, y, log_t, bias, pair_ids=None) -> jax.Array:
  """Mean SigLIP loss of one (B, D) batch, materialising the B x B logits."""
  ids = jnp.arange(x.shape[0], dtype=jnp.int32) if pair_ids is None else pair_ids
  return block_loss_sum(x, y, ids, ids, log_t, bias) / x.shape[0]

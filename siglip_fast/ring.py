"""The machinery every implementation shares: the ring driver and the custom-VJP shell.

The ring (paper section 3.3, docs/DESIGN.md section 2): called inside ``shard_map`` over a
named mesh axis, each device keeps its image chunk while text chunks (with their pair ids)
travel around the ring by ``lax.ppermute``, and each device adds the loss of the (b x b)
block it can see at every step. Nothing of size B x B, nor anything that grows with the
device count, is ever held. The block computation is pluggable (``BlockOps``): the XLA
reference (``siglip_fast.reference.ring``, the oracle of the distributed kernels) or a
Pallas kernel's blocks. Whole-ring kernels (``siglip_fast.kernels.tpu_ring``) replace the
driver but share the shell.

The gradient is a custom VJP rather than autodiff through the loop, because autodiff through
a loop of permutes keeps every step's travelling chunk (and, without remat, its logits) for
the backward pass: the memory growth big_vision and open_clip report. Here the forward pass
under ``jax.grad`` computes the loss and all gradients in one trip around the ring (6 B^2 D
FLOPs with the XLA block; 6 or 8 with a kernel block), the text gradient travelling with its
chunk and sent home at the end, and the backward pass only scales them by the cotangent. A
call without ``grad`` runs the loss-only trip (2 B^2 D FLOPs). With ``axis_name=None`` the
ring has one device and this is the dense loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from siglip_fast import vma

SCHEDULES = ("unidirectional", "bidirectional")


@dataclasses.dataclass(frozen=True)
class Accumulate:
  """A block's gradients added into a trip's running ones, kept in the implementation's own
  layout (e.g. a kernel's float32 partials): the driver never rounds them per block nor
  reads them back between blocks.

  block(x, y, x_ids, y_ids, log_t, bias, dx_acc, dy_acc)
      -> (float32 loss sum, (dx_acc, dy_acc, dlog_t, dbias)), the block's gradients added
      (None for either accumulator: start from zero without reading one; the driver
      starts every trip's dX and every chunk's dY that way)
  finish(dx_acc, dy_acc, x, y, log_t) -> (dx, dy): float32, x's and y's shapes

  dy_acc travels with its chunk; the driver adds the two copies' dy_acc of a chunk under the
  bidirectional schedule, so it must be linear in them.
  """

  block: Callable
  finish: Callable


@dataclasses.dataclass(frozen=True)
class BlockOps:
  """How one implementation computes a block; see ``siglip_fast.reference.dense.block_loss_sum`` for the contract.

  loss_sum(x, y, x_ids, y_ids, log_t, bias) -> float32 scalar
  loss_sum_and_grads(...) -> (float32 scalar, (dx, dy, dlog_t, dbias))
  accumulate: an ``Accumulate``, or None for float32 sums of loss_sum_and_grads' gradients
  unroll: the driver unrolls the ring's rounds (the TPU block kernels). In a while loop
      XLA's TPU scheduler kept each round's permutes inside the round, and the hop whose
      chunk left with the round's dY had no block call to hide behind; unrolled, every hop
      overlaps a call. Off for XLA's own blocks, whose (b, b) temporaries XLA:CPU keeps
      more of the more rounds are unrolled, and for the GPU kernels until a multi-GPU
      schedule has been looked at.

  dx and dy have the dtypes of x and y; dlog_t and dbias are float32 scalars.
  """

  name: str
  loss_sum: Callable
  loss_sum_and_grads: Callable
  accumulate: Accumulate | None = None
  unroll: bool = False

  def accumulator(self) -> Accumulate:
    """``accumulate``, or float32 sums of ``loss_sum_and_grads``' gradients."""
    if self.accumulate is not None:
      return self.accumulate
    return Accumulate(
      block=functools.partial(add_grads, self.loss_sum_and_grads),
      finish=lambda dx_acc, dy_acc, *_: (dx_acc, dy_acc),
    )


def _f32_zeros(a):
  return jnp.zeros(jnp.shape(a), jnp.float32)


def add_grads(loss_sum_and_grads, x, y, x_ids, y_ids, log_t, bias, dx_acc, dy_acc):
  """``Accumulate.block`` from a ``BlockOps.loss_sum_and_grads``: its gradients added in
  float32 to running ones of x's and y's shapes (None: zero)."""
  loss, (dx, dy, dlt, db) = loss_sum_and_grads(x, y, x_ids, y_ids, log_t, bias)
  f32 = lambda a: a.astype(jnp.float32)
  add = lambda acc, g: f32(g) if acc is None else acc + f32(g)
  return loss, (add(dx_acc, dx), add(dy_acc, dy), f32(dlt), f32(db))


def _shift(tree, axis_name, n_dev, shift):
  """Send every device's value to device (i + shift) mod n_dev."""
  perm = [(i, (i + shift) % n_dev) for i in range(n_dev)]
  return lax.ppermute(tree, axis_name, perm)


def _axis_size(axis_name):
  return 1 if axis_name is None else lax.axis_size(axis_name)


def _trip(x, y, x_ids, y_ids, log_t, bias, with_grads, *, axis_name, schedule, ops):
  """One trip around the ring: this device's loss sum, and its float32 grads if asked for.

  The text gradient of a chunk travels with the chunk (None on a loss-only trip) and is
  sent home once the chunk has been seen by every device.
  """
  n_dev = _axis_size(axis_name)
  if axis_name is not None:
    # Marked varying, the replicated scalars get per-device block gradients, summed once
    # at the end; left replicated, autodiff in every block would all-reduce them per step.
    log_t, bias = vma.pvary(log_t, {axis_name}), vma.pvary(bias, {axis_name})
  if with_grads and n_dev == 1:  # one block: nothing to accumulate, no layout to undo
    return add_grads(ops.loss_sum_and_grads, x, y, x_ids, y_ids, log_t, bias, None, None)
  grads = ops.accumulator()
  # acc: the loss sum, or (loss sum, dx so far, dlog_t, dbias) when with_grads; the first
  # block starts the running gradients (None: from zero).
  acc = _f32_zeros(0.0)
  if with_grads:
    acc = (acc, None, _f32_zeros(log_t), _f32_zeros(bias))

  def step(acc, chunk):
    y_c, ids_c, dy_c = chunk
    if not with_grads:
      return acc + ops.loss_sum(x, y_c, x_ids, ids_c, log_t, bias), chunk
    loss, (dx_acc, dy_c, dlt, db) = grads.block(x, y_c, x_ids, ids_c, log_t, bias, acc[1], dy_c)
    return (acc[0] + loss, dx_acc, acc[2] + dlt, acc[3] + db), (y_c, ids_c, dy_c)

  def hop(chunk, shift):
    return _shift(chunk, axis_name, n_dev, shift)

  def first_hop(shift):
    # A copy's first hop carries the chunk and its ids only: its dY starts at the next
    # device (None: the block starts it from zero). The own block's dY stays home, so the
    # first hops wait for no block and hide behind the own one.
    return hop((y, y_ids), shift) + (None,)

  acc, own = step(acc, (y, y_ids, None))
  dy_home = own[2]
  unroll = ops.unroll

  if schedule == "unidirectional":
    # Chunk j sits on device j + s at step s; after the last step it is one hop from home.
    def body(_, carry):
      acc, chunk = carry
      return step(acc, hop(chunk, 1))

    if n_dev > 1:
      acc, chunk = step(acc, first_hop(1))
      acc, chunk = lax.fori_loop(0, n_dev - 2, body, (acc, chunk), unroll=unroll)
      dy_home = dy_home + hop(chunk[2], 1) if with_grads else None
  elif schedule == "bidirectional":
    # Two copies of each chunk travel, one each way, so both directions of every link are
    # busy and each round covers two new chunks: ceil((n_dev - 1) / 2) rounds instead of
    # n_dev - 1. With an even device count the last round meets the chunk n_dev / 2 away,
    # which only the rightward copy computes.
    rounds = (n_dev - 1) // 2

    def body(_, carry):
      acc, right, left = carry
      acc, right = step(acc, hop(right, 1))
      acc, left = step(acc, hop(left, -1))
      return acc, right, left

    right = left = None
    if rounds:
      acc, right = step(acc, first_hop(1))
      acc, left = step(acc, first_hop(-1))
      acc, right, left = lax.fori_loop(1, rounds, body, (acc, right, left), unroll=unroll)
    if with_grads and rounds:
      # Sent home before the even ring's extra block, which it can hide behind.
      dy_home = dy_home + hop(left[2], rounds)
    right_hops = rounds
    if n_dev % 2 == 0:
      acc, right = step(acc, hop(right, 1) if rounds else first_hop(1))
      right_hops += 1
    if with_grads and right_hops:
      dy_home = dy_home + hop(right[2], -right_hops)
  else:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")

  if not with_grads:
    return acc
  loss, dx_acc, dlt, db = acc
  dx, dy = grads.finish(dx_acc, dy_home, x, y, log_t)
  return loss, (dx, dy, dlt, db)


def _psum(v, axis_name):
  return v if axis_name is None else lax.psum(v, axis_name)


# ------------------------------------------------------------------------------------------
# The custom-VJP shell every implementation shares.
#
# A trip returns this device's loss SUM (its image rows against every text row) and, asked
# for gradients, d(global sum)/d(its x), d(global sum)/d(its y) and its own partial sums of
# d/dlog_t and d/dbias. The custom VJP covers only that per-device sum; the psum over the
# ring and the 1/B stay outside it, as ordinary JAX operations. JAX then transposes them
# with its own rules, so the gradients are what autodiff of the same loss written with
# standard collectives gives under every set-up: shard_map with check_vma=True or False,
# grad inside or outside shard_map, pmap. Inside the VJP the cotangent is the same on every
# device (it comes through the psum), which is what lets one device's gradient of y collect
# the other devices' contributions.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _local_sum(trip, x, y, x_ids, y_ids, log_t, bias):
  return trip(x, y, x_ids, y_ids, log_t, bias, False)


def _local_sum_fwd(trip, x, y, x_ids, y_ids, log_t, bias):
  # The loss is a scalar: the forward pass makes every gradient now; the backward scales.
  total, grads = trip(x, y, x_ids, y_ids, log_t, bias, True)
  # Empty arrays carry the primals' dtypes (residuals must be arrays).
  dtypes = tuple(jnp.zeros((0,), jnp.result_type(p)) for p in (x, y, log_t, bias))
  return total, (tuple(g.astype(jnp.float32) for g in grads), dtypes)


def _local_sum_bwd(trip, res, ct):
  del trip
  grads, dtypes = res
  dx, dy, dlt, db = ((g * ct).astype(dt.dtype) for g, dt in zip(grads, dtypes))
  return dx, dy, None, None, dlt, db


_local_sum.defvjp(_local_sum_fwd, _local_sum_bwd)


def local_sum(trip: Callable, x, y, x_ids, y_ids, log_t, bias):
  """This device's loss sum, differentiable through ``trip``'s gradients (see above)."""
  return _local_sum(trip, x, y, x_ids, y_ids, log_t, bias)


def block_trip(*, axis_name, schedule, ops: BlockOps) -> Callable:
  """The reference ring over ``ops``' blocks, as a trip for ``global_mean``."""
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  return functools.partial(_trip, axis_name=axis_name, schedule=schedule, ops=ops)


def global_mean(trip: Callable, x, y, x_ids, y_ids, log_t, bias, axis_name):
  """The mean loss over the ring: psum of ``trip``'s per-device sums over the global batch.

  ``trip(x, y, x_ids, y_ids, log_t, bias, with_grads)`` is a static callable with the
  contract above; log_t and bias are float32 scalars, replicated.
  """
  if axis_name is not None:
    # Varying before the VJP, so the per-device dlog_t, dbias it returns are typed as such,
    # and the transpose of this cast (a psum) adds them up.
    log_t, bias = vma.pvary(log_t, {axis_name}), vma.pvary(bias, {axis_name})
  local = local_sum(trip, x, y, x_ids, y_ids, log_t, bias)
  return _psum(local, axis_name) / (x.shape[0] * _axis_size(axis_name))

"""The machinery every implementation shares: the ring driver and the custom-VJP shell.

The ring (paper section 3.3, docs/DESIGN.md section 2): called inside ``shard_map`` over a
named mesh axis, each device keeps its image chunk while text chunks (with their pair ids)
travel around the ring by ``lax.ppermute``, and each device adds the loss of the (b x b)
block it can see at every step. Nothing of size B x B is ever held, nor anything that grows
with the device count but the pair ids the gradient trip gathers (an int32 a row). The block computation is pluggable (``BlockOps``): the XLA
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
  finish_dx(dx_acc, x, log_t) -> float32 dx of x's shape
  finish_dy(dy_acc, y, log_t) -> float32 dy of y's shape (y: the rows the blocks saw)

  dy_acc travels with its rows and is finished apart from the dY of the rows' own block.
  """

  block: Callable
  finish_dx: Callable
  finish_dy: Callable


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
      finish_dx=lambda dx_acc, *_: dx_acc,
      finish_dy=lambda dy_acc, *_: dy_acc,
    )


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
  """One trip around the ring: this device's loss sum, and its float32 grads if asked for."""
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  if axis_name is not None:
    # Marked varying, the replicated scalars get per-device block gradients, summed once
    # at the end; left replicated, autodiff in every block would all-reduce them per step.
    log_t, bias = vma.pvary(log_t, {axis_name}), vma.pvary(bias, {axis_name})
  if not with_grads:
    return _loss_trip(x, y, x_ids, y_ids, log_t, bias, axis_name, schedule, ops)
  if _axis_size(axis_name) == 1:  # one block: nothing to accumulate, no layout to undo
    return add_grads(ops.loss_sum_and_grads, x, y, x_ids, y_ids, log_t, bias, None, None)
  return _grad_trip(x, y, x_ids, y_ids, log_t, bias, axis_name, schedule, ops)


def _loss_trip(x, y, x_ids, y_ids, log_t, bias, axis_name, schedule, ops):
  """The loss sum: whole chunks travel; under the bidirectional schedule a copy of each
  goes each way, so every round sees two new chunks (ceil((n - 1) / 2) rounds). With an
  even device count the last round meets the chunk n / 2 away, which only the rightward
  copy computes."""
  n_dev = _axis_size(axis_name)
  block = lambda y_c, ids_c: ops.loss_sum(x, y_c, x_ids, ids_c, log_t, bias)
  hop = lambda chunk, shift: _shift(chunk, axis_name, n_dev, shift)
  loss = block(y, y_ids)
  if n_dev == 1:
    return loss
  if schedule == "unidirectional":

    def body(_, carry):
      loss, chunk = carry
      chunk = hop(chunk, 1)
      return loss + block(*chunk), chunk

    return lax.fori_loop(0, n_dev - 1, body, (loss, (y, y_ids)), unroll=ops.unroll)[0]

  def body(_, carry):
    loss, right, left = carry
    right, left = hop(right, 1), hop(left, -1)
    return loss + block(*right) + block(*left), right, left

  rounds = (n_dev - 1) // 2
  loss, right, _ = lax.fori_loop(0, rounds, body, (loss, (y, y_ids), (y, y_ids)), unroll=ops.unroll)
  if n_dev % 2 == 0:
    loss = loss + block(*hop(right, 1))
  return loss


def _parts(n_rows, schedule):
  """The row ranges of a chunk that travel, each with its direction: the whole chunk
  rightwards, or under the bidirectional schedule its first half rightwards and the rest
  leftwards (a one-row chunk travels whole)."""
  if schedule == "unidirectional" or n_rows < 2:
    return ((0, n_rows, 1),)
  half = (n_rows + 1) // 2
  return ((0, half, 1), (half, n_rows, -1))


def _grad_trip(x, y, x_ids, y_ids, log_t, bias, axis_name, schedule, ops):
  """The loss sum and float32 gradients in one trip (n >= 2 devices).

  Each part of the own text chunk (``_parts``) goes all the way round in its direction:
  n - 1 hops, each device adding its block of that part, then one more hop, home, with the
  part's dY, which has travelled with it from the first device after home. Every hop is to
  a ring neighbour. (Copies of whole chunks, each going half way round as the loss-only trip
  sends them, would bring their dY home from n / 2 devices away at the end: a permute that
  crosses n / 2 links, with every device's in flight at once.) Under the bidirectional
  schedule both directions of every link carry half a chunk and its dY per round, for n - 1
  rounds of one block's compute each.

  The own block is computed first and its dY stays home; the parts' first hops carry no dY
  (it starts at the next device, from None: zero), so they wait for no block and hide
  behind the own one. The parts' pair ids do not travel: they are all-gathered up front.
  """
  n_dev = _axis_size(axis_name)
  grads = ops.accumulator()
  hop = lambda tree, shift: _shift(tree, axis_name, n_dev, shift)
  loss, (dx_acc, dy_own, dlt, db) = grads.block(x, y, x_ids, y_ids, log_t, bias, None, None)
  acc = (loss, dx_acc, dlt, db)

  ways = _parts(y.shape[0], schedule)
  # Every device's pair ids, gathered once (4 bytes a row of the global batch): sent with
  # each hop, they were permutes of their own that XLA's TPU scheduler left with no block
  # call across them (v4, D = 1152).
  all_ids = lax.all_gather(y_ids, axis_name)
  me = lax.axis_index(axis_name)

  def round_(acc, parts, h):
    """Round h: each part (rows, dY so far) came from h devices upstream in its direction."""
    out = []
    for (y_c, dy_c), (lo, hi, d) in zip(parts, ways):
      ids_c = lax.dynamic_index_in_dim(all_ids, (me - d * h) % n_dev, keepdims=False)[lo:hi]
      loss, (dx_acc, dy_c, dlt, db) = grads.block(x, y_c, x_ids, ids_c, log_t, bias, acc[1], dy_c)
      acc = (acc[0] + loss, dx_acc, acc[2] + dlt, acc[3] + db)
      out.append((y_c, dy_c))
    return acc, tuple(out)

  acc, parts = round_(acc, tuple((hop(y[lo:hi], d), None) for lo, hi, d in ways), 1)

  def body(h, carry):
    acc, parts = carry
    moved = tuple((hop(y_c, d), hop(dy_c, d)) for (y_c, dy_c), (_, _, d) in zip(parts, ways))
    return round_(acc, moved, h)

  acc, parts = lax.fori_loop(2, n_dev, body, (acc, parts), unroll=ops.unroll)
  homes = [hop(dy_c, d) for (_, dy_c), (_, _, d) in zip(parts, ways)]
  loss, dx_acc, dlt, db = acc
  dy = grads.finish_dy(dy_own, y, log_t)
  dy = dy + jnp.concatenate(
    [grads.finish_dy(h, y[lo:hi], log_t) for h, (lo, hi, _) in zip(homes, ways)]
  )
  return loss, (grads.finish_dx(dx_acc, x, log_t), dy, dlt, db)


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
  """The ring over ``ops``' blocks, as a trip for ``global_mean``."""
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

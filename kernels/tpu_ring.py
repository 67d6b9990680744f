"""The SigLIP ring inside one Pallas TPU kernel: text chunks travel by remote DMA while the
MXU works on the chunk that has already arrived (DESIGN.md section 2, paper section 3.3).

Same contract as ``siglip_fast.reference.ring_loss`` (the oracle): called inside
``shard_map`` over ``axis_name`` with this device's (b, D) chunks, it returns the global mean
loss, replicated, and is differentiable w.r.t. x, y, log_t and bias.

One ``pallas_call`` per trip around the ring. Each device keeps its image chunk X_k in HBM;
travelling text chunks (with their pair ids) and their f32 dY land in double-buffered HBM
slots (outputs of the call used as scratch, so every device has them at the same address
for the remote copies). Streams: the right copy of every chunk (+1), and under the
bidirectional schedule also the left copy (-1), interleaved hop by hop.

Hop h of a stream, on every device:
  1. wait for chunk h in slot h % 2 (sent by the upstream neighbour during its hop h - 1),
     and start sending it on to slot (h + 1) % 2 of the downstream neighbour: the copy runs
     during all of this hop's compute;
  2. sweep A, row tiles outer: the loss sums and dX (local, f32, accumulated over hops);
  3. with gradients, sweep B, column tiles outer: recompute each logits tile for dY. Each
     dY tile starts from the dY that came with the chunk (tile-wise remote copies sent by
     upstream during its previous hop, so long since arrived) and, when finished, goes from
     VMEM straight to the downstream neighbour's dY slot, or home to the chunk's owner after
     the stream's last hop, while the next tile computes.
The logits tiles never leave VMEM and nothing is kept per hop: value and gradients cost
8 b^2 D FLOPs per block (6 if the two sweeps shared the logits, which would need a
read-modify-write of a dY tile per row tile), a loss-only trip 2 b^2 D.

Handshake. A remote write may only land in a slot its owner is done with. Both slots are
free at entry, once a barrier on the collective barrier semaphore has shown that the
neighbours are inside the kernel. From then on a device *grants a credit* (a remote
``semaphore_signal`` to its upstream neighbour) for each slot it frees, and upstream waits
for it before writing there again:
  - the chunk slot of hop h, at the end of hop h (both sweeps read it; our send from it has
    completed); upstream waits before its hop h + 1 send, which brings our hop h + 2 chunk;
  - the dY slot of hop h, after sweep B of hop h; upstream waits before sweep B of its hop
    h + 1, whose tiles land there.
Every credit granted is waited for and every copy is waited for at both ends (the sender
for its send semaphore, the receiver for its receive semaphore), so all semaphores are zero
at kernel exit: TPU interpret mode checks that (tests/test_kernel_tpu_ring.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from siglip_fast.reference import vma
from siglip_fast.reference.ring import SCHEDULES, global_mean

_DTYPES = (jnp.float32, jnp.bfloat16)
_COLLECTIVE_ID = 7
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Largest tile of the per-hop (b x b) block: ``block_rows`` image rows x ``block_cols``
  text rows, each a multiple of 8 (float32) or 16 (bfloat16), the sublanes of a vreg.

  The tile used is the largest multiple of the sublane count, between half and all of the
  given size, that divides the local batch b; failing that, b is padded up to a multiple
  of the tile and the padding masked out. Each sweep keeps two buffers of an image tile
  and of a text tile, two f32 gradient tiles (all D wide) and a few (rows x cols) f32
  temporaries in VMEM.
  """

  block_rows: int = 256
  block_cols: int = 256

  @classmethod
  def get_default(cls, dim: int, dtype) -> "BlockSizes":
    # 512 x 512 tiles at D = 1152 need ~17 MiB with gradients: fine on v5e/v5p/v6e (64-128
    # MiB VMEM per core), not on v4 (16 MiB). Where the chip is unknown (CPU, interpret
    # mode, some compile-only set-ups) use the size that fits all of them.
    size = 512 if (_vmem_capacity() or 0) >= 64 * 2**20 else 256
    if _vmem_bytes(size, size, dim, jnp.dtype(dtype).itemsize, True) > 24 * 2**20:
      size = 256
    return cls(size, size)


def _vmem_capacity() -> int | None:
  try:
    return int(pltpu.get_tpu_info().vmem_capacity_bytes)
  except Exception:  # Not a TPU, or an API this jax lacks: fall back to the safe size.
    return None


def _vmem_bytes(tm, tn, dim, itemsize, with_grads):
  """VMEM scratch of the kernel: double-buffered operand and id tiles, the f32 gradient
  tiles, and an allowance for the (tm, tn) f32 temporaries of the tile math."""
  tiles = 2 * (tm + tn) * dim * itemsize + 2 * (tm * 128 + 8 * max(tn, 128)) * 4
  grads = 2 * max(tm, tn) * dim * 4 if with_grads else 0
  temps = 8 * tm * max(tn, 128) * 4 + 8 * max(tn, 128) * 4
  return tiles + grads + temps


def _sublanes(dtype):
  return 8 * (4 // jnp.dtype(dtype).itemsize)


def _round_up(a, m):
  return -(-a // m) * m


def _fit_tile(b, tile, sub):
  """The tile for a local batch b and a largest tile ``tile`` (see ``BlockSizes``)."""
  if b <= tile:
    return _round_up(b, sub)
  for t in range(tile, tile // 2 - 1, -sub):
    if b % t == 0:
      return t
  return tile


def _check_inputs(x, y, x_ids, y_ids, log_t, bias, block_sizes):
  for arg, a in (("x", x), ("y", y)):
    if getattr(a, "ndim", None) != 2:
      raise ValueError(f"{arg} must be a (b, D) array, got shape {getattr(a, 'shape', None)}")
    if a.dtype not in _DTYPES:
      raise TypeError(f"{arg} must be float32 or bfloat16, got {a.dtype}")
  if x.shape != y.shape or x.dtype != y.dtype:
    raise ValueError(f"x and y must have the same shape and dtype, got {x.shape} {x.dtype} "
                     f"and {y.shape} {y.dtype}")
  b, dim = x.shape
  if b == 0 or dim == 0:
    raise ValueError(f"x and y must be non-empty, got shape {x.shape}")
  for arg, a in (("x_ids", x_ids), ("y_ids", y_ids)):
    if getattr(a, "shape", None) != (b,) or a.dtype != jnp.int32:
      raise ValueError(f"{arg} must be int32 of shape ({b},), got "
                       f"{getattr(a, 'dtype', None)} {getattr(a, 'shape', None)}")
  for arg, a in (("log_t", log_t), ("bias", bias)):
    if jnp.shape(a) not in ((), (1,)):
      raise ValueError(f"{arg} must be a scalar, got shape {jnp.shape(a)}")
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(dim, x.dtype)
  if not all(isinstance(getattr(block_sizes, f, None), int)
             for f in ("block_rows", "block_cols")):
    raise TypeError(f"block_sizes must be a tpu_ring.BlockSizes, got {block_sizes!r}")
  sub = _sublanes(x.dtype)
  for arg in ("block_rows", "block_cols"):
    t = getattr(block_sizes, arg)
    if t <= 0 or t % sub:
      raise ValueError(f"block_sizes.{arg} must be a positive multiple of {sub} for "
                       f"{x.dtype} inputs (the sublanes of a vreg), got {t}")
  return block_sizes


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static shape of one trip: sizes, schedule and what each stream does."""

  n_dev: int
  b: int  # the local batch, padded to a multiple of both tiles
  b_valid: int  # the local batch; rows and columns past it are masked out
  dim: int
  tm: int
  tn: int
  dtype: jnp.dtype
  with_grads: bool
  hops: tuple  # per stream (right, then left if bidirectional): number of hops H_d
  # First hop whose dY a stream carries: the right copy carries the own block's (hop 0),
  # the left copy starts empty and carries from hop 1.
  first_dy: tuple

  @property
  def ni(self):
    return self.b // self.tm

  @property
  def nj(self):
    return self.b // self.tn

  @property
  def directions(self):
    return (1, -1)[:len(self.hops)]


def _make_plan(n_dev, schedule, b, b_valid, dim, tm, tn, dtype, with_grads):
  if schedule == "unidirectional" or n_dev == 1:
    hops = (n_dev - 1,)
  else:
    # As reference.ring: ceil((n - 1) / 2) rounds; with an even count the last round meets
    # the chunk n / 2 away, which only the right copy computes.
    rounds = (n_dev - 1) // 2
    hops = (rounds + (n_dev % 2 == 0), rounds)
    if rounds == 0:  # Two devices: the only other chunk comes by the right copy.
      hops = hops[:1]
  return _Plan(n_dev, b, b_valid, dim, tm, tn, jnp.dtype(dtype), with_grads, hops,
               (0, 1)[:len(hops)])


def _precision(a):
  # A TPU's default f32 matmul rounds the operands to bf16; f32 inputs ask for f32 products.
  return lax.Precision.HIGHEST if a.dtype == jnp.float32 else None


def _remote_copy(kind, src, dst, send_sem, recv_sem, device_id):
  """A remote DMA to ``device_id`` (a {axis: index} dict). ``kind`` names the traffic
  ("y", "y_ids", "dy", "dy_home"); the tests hook this to check where copies are placed."""
  del kind
  return pltpu.make_async_remote_copy(src, dst, send_sem, recv_sem, device_id=device_id,
                                      device_id_type=pl.DeviceIdType.MESH)


def _take_credit(sem):
  """Wait for (and consume) one credit: the downstream neighbour has freed a slot."""
  pl.semaphore_wait(sem, 1)


def _tile(x, y, xid, yid, t, bias, valid=None):
  """Loss, and (g, t * s) for the gradients, of one (tm, tn) logits tile, all f32.

  ``valid``: None, or a (tm, tn) bool mask of the pairs that are not batch padding.
  """
  ts = t * lax.dot_general(x, y, _NT, precision=_precision(x),
                           preferred_element_type=jnp.float32)
  logits = ts + bias
  pos = xid == yid  # (tm, 1) == (1, tn)
  # softplus(-z * l) with z = +1 on positives: u = -l there, +l elsewhere; |u| = |l|.
  e = jnp.exp(-jnp.abs(logits))
  u = jnp.where(pos, -logits, logits)
  loss = jnp.maximum(u, 0.0) + jnp.log1p(e)
  sig = jnp.where(logits >= 0, 1.0, e) / (1.0 + e)
  g = sig - pos.astype(jnp.float32)
  if valid is not None:
    loss, g = jnp.where(valid, loss, 0.0), jnp.where(valid, g, 0.0)
  return loss, g, ts


@dataclasses.dataclass(frozen=True)
class _Acc:
  """The f32 gradient tile a sweep accumulates for each tile of its outer operand."""

  rows: int
  out: Callable  # (outer index, VMEM tile) -> [(start, wait)]: the copies that take it away
  src: Callable | None = None  # outer index -> the HBM tile it continues; None: from zero
  ready: Callable | None = None  # outer index -> wait until that HBM tile has arrived
  first: Any = True  # (maybe traced) bool: start from zero after all, src unread


def _ring_kernel(plan: _Plan, axis_name, params_ref, me_ref, x_ref, xid_ref, y_ref, yid_ref,
                 *rest):
  n_streams, grads, n = len(plan.hops), plan.with_grads, plan.n_dev
  n_buf = n_streams if n > 1 else 0
  ni, nj, tm, tn = plan.ni, plan.nj, plan.tm, plan.tn
  sums_ref, rest = rest[0], rest[1:]
  if grads:
    dx_ref, rest = rest[0], rest[1:]
    home_refs, rest = rest[:n_streams], rest[n_streams:]
  ybufs, rest = rest[:n_buf], rest[n_buf:]
  idbufs, rest = rest[:n_buf], rest[n_buf:]
  if grads:
    dybufs, rest = rest[:n_buf], rest[n_buf:]
  xv, yv, xidv, yidv, tile_sems, y_sems, dy_sems, credits = rest[:8]
  accv = rest[8] if grads else None
  t, bias = params_ref[0], params_ref[1]
  if n > 1:
    me = me_ref[0]  # (lax.axis_index inside the kernel trips interpret mode's vma checks)
    device = lambda off: {axis_name: lax.rem(me + off + n, n)}
  sums_ref[...] = jnp.zeros_like(sums_ref)

  def rows(ref, size, k):
    return ref.at[pl.ds(pl.multiple_of(k * size, size), size)]

  def valid(i, j):
    """Which pairs of tile (i, j) are real (None when the batch needed no padding)."""
    if plan.b_valid == plan.b:
      return None
    r = i * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
    c = j * tn + lax.broadcasted_iota(jnp.int32, (tm, tn), 1)
    return jnp.logical_and(r < plan.b_valid, c < plan.b_valid)

  # ---- The two sweeps over one (b x b) block, as a hand-written tile pipeline. ----
  # Tiles are DMA'd from HBM into double-buffered VMEM: the operand of the outer loop once
  # per outer step, the inner one every step, each prefetched a step ahead. The f32 gradient
  # tile of the outer operand accumulates in VMEM over the inner loop, starting from zero or
  # from the HBM tile it continues, and leaves (for HBM here, or straight for a neighbour)
  # while the next outer step runs.

  x_tiles = ((lambda i: rows(x_ref, tm, i), xv), (lambda i: rows(xid_ref, tm, i), xidv))

  def y_tiles(y_blk, yid_blk):
    return ((lambda j: rows(y_blk, tn, j), yv), (lambda j: yid_blk.at[j], yidv))

  def sweep(n_outer, n_inner, outer, inner, compute, acc: _Acc | None = None):
    n_steps = n_outer * n_inner

    def fetches(ops, k, slot, kind):
      return [pltpu.make_async_copy(src(k), buf.at[slot], tile_sems.at[kind + a, slot])
              for a, (src, buf) in enumerate(ops)]

    if acc is not None:
      acc_tile = lambda slot: accv.at[slot, pl.ds(0, acc.rows)]
      acc_in = lambda o, slot: pltpu.make_async_copy(acc.src(o), acc_tile(slot),
                                                     tile_sems.at[4, slot])
      reads_in = acc.src is not None and acc.first is not True
      not_first = jnp.logical_not(acc.first)

      def send_out(o, slot):
        for start, _ in acc.out(o, acc_tile(slot)):
          start()

      def wait_out(o, slot):
        for _, wait in acc.out(o, acc_tile(slot)):
          wait()

    def start_outer(o):
      slot = lax.rem(o, 2)
      for c in fetches(outer, o, slot, 0):
        c.start()
      if acc is not None and reads_in:
        @pl.when(not_first)
        def _():
          if acc.ready is not None:
            acc.ready(o)
          acc_in(o, slot).start()

    start_outer(0)
    for c in fetches(inner, 0, 0, 2):
      c.start()

    def step(c, carry):
      o, q = c // n_inner, lax.rem(c, n_inner)
      so, si = lax.rem(o, 2), lax.rem(c, 2)
      last_q = q == n_inner - 1
      if acc is not None:
        # The VMEM slot the next outer step accumulates into is free once its copies left.
        pl.when(jnp.logical_and(last_q, o >= 1))(lambda: wait_out(o - 1, 1 - so))

      @pl.when(c + 1 < n_steps)
      def _():
        for cp in fetches(inner, lax.rem(c + 1, n_inner), 1 - si, 2):
          cp.start()
        pl.when(last_q)(lambda: start_outer(o + 1))

      for cp in fetches(inner, q, si, 2):
        cp.wait()

      @pl.when(q == 0)
      def _():
        for cp in fetches(outer, o, so, 0):
          cp.wait()
        if acc is not None and reads_in:
          pl.when(not_first)(lambda: acc_in(o, so).wait())

      contrib = compute(o, q, [buf.at[so] for _, buf in outer],
                        [buf.at[si] for _, buf in inner])
      if acc is None:
        return carry
      tile = acc_tile(so)

      @pl.when(q == 0)
      def _():
        tile[...] = (jnp.where(acc.first, 0.0, tile[...]) if reads_in else 0.0) + contrib

      @pl.when(q != 0)
      def _():
        tile[...] += contrib

      pl.when(last_q)(lambda: send_out(o, so))
      return carry

    lax.fori_loop(0, n_steps, step, 0)
    if acc is not None:
      wait_out(n_outer - 1, (n_outer - 1) % 2)

  def local_out(ref, size):
    """The gradient tile goes to ``ref``'s tile in this device's HBM."""
    def out(o, tile):
      c = lambda: pltpu.make_async_copy(tile, rows(ref, size, o), tile_sems.at[5, 0])
      return [(lambda: c().start(), lambda: c().wait())]
    return out

  def sweep_rows(y_blk, yid_blk, first):
    """Loss sums and, with gradients, dX += t * G @ Y over the block, row tiles outer."""

    def compute(i, j, outer, inner):
      (x_t, xid_t), (y_t, yid_t) = outer, inner
      y_val = y_t[...]
      loss, g, ts = _tile(x_t[...], y_val, xid_t[...], yid_t[...], t, bias, valid(i, j))
      sums_ref[0:1, :] += jnp.sum(loss, axis=0, keepdims=True)
      if not grads:
        return None
      sums_ref[1:2, :] += jnp.sum(g * ts, axis=0, keepdims=True)
      sums_ref[2:3, :] += jnp.sum(g, axis=0, keepdims=True)
      return jnp.dot((g * t).astype(y_val.dtype), y_val, precision=_precision(y_val),
                     preferred_element_type=jnp.float32)

    acc = None
    if grads:
      src = None if first else (lambda i: rows(dx_ref, tm, i))
      acc = _Acc(tm, local_out(dx_ref, tm), src=src, first=first)
    sweep(ni, nj, x_tiles, y_tiles(y_blk, yid_blk), compute, acc)

  def sweep_cols(y_blk, yid_blk, acc):
    """dY = (incoming dY) + t * G^T @ X over the block, column tiles outer, recomputing the
    logits tile; each finished dY tile leaves as ``acc.out`` says."""

    def compute(j, i, outer, inner):
      (y_t, yid_t), (x_t, xid_t) = outer, inner
      x_val = x_t[...]
      _, g, _ = _tile(x_val, y_t[...], xid_t[...], yid_t[...], t, bias, valid(i, j))
      return lax.dot_general((g * t).astype(x_val.dtype), x_val, _TN,
                             precision=_precision(x_val), preferred_element_type=jnp.float32)

    sweep(nj, ni, y_tiles(y_blk, yid_blk), x_tiles, compute, acc)

  # ---- Copies between devices. ----

  def copy(kind, src, dst, send, recv, off):
    return _remote_copy(kind, src, dst, send, recv, device(off))

  def y_copies(s, d, src_y, src_id, slot):
    """The chunk (and its ids) to the downstream neighbour's ``slot``."""
    return (copy("y", src_y, ybufs[s].at[slot], y_sems.at[s, 0, 0, slot],
                 y_sems.at[s, 0, 1, slot], d),
            copy("y_ids", src_id, idbufs[s].at[slot], y_sems.at[s, 1, 0, slot],
                 y_sems.at[s, 1, 1, slot], d))

  def dy_tile_copy(s, d, src, j, slot):
    """dY tile j to the downstream neighbour's dY ``slot`` (tile-wise semaphores)."""
    return copy("dy", src, rows(dybufs[s].at[slot], tn, j), dy_sems.at[s, 0, slot, j],
                dy_sems.at[s, 1, slot, j], d)

  def home_tile_copy(s, d, src, j):
    """dY tile j to the chunk's owner, -d * hops away, once the copy's trip is over."""
    return copy("dy_home", src, rows(home_refs[s], tn, j), dy_sems.at[s, 2, 0, j],
                dy_sems.at[s, 3, 0, j], -d * plan.hops[s])

  def remote_out(s, d, h):
    """Where hop h's dY tiles go: downstream while the trip goes on, home after the last."""
    n_hops, other = plan.hops[s], 1 - lax.rem(h, 2)

    def out(j, tile):
      fwd = lambda: dy_tile_copy(s, d, tile, j, other)
      home = lambda: home_tile_copy(s, d, tile, j)
      return [(lambda: pl.when(h < n_hops)(lambda: fwd().start()),
               lambda: pl.when(h < n_hops)(lambda: fwd().wait_send())),
              (lambda: pl.when(h == n_hops)(lambda: home().start()),
               lambda: pl.when(h == n_hops)(lambda: home().wait_send()))]
    return out

  def credit(s, kind):
    return credits.at[s, kind]

  def grant(s, d, kind):
    pl.semaphore_signal(credit(s, kind), 1, device_id=device(-d),
                        device_id_type=pl.DeviceIdType.MESH)

  def dy_sweep(s, d, h, y_blk, id_blk, first):
    """Sweep B of hop h of stream s: dY of the chunk, continuing the dY that came with it
    (unless ``first``), its tiles sent on as they finish."""
    n_hops, f = plan.hops[s], plan.first_dy[s]
    slot = lax.rem(h, 2)

    # Downstream must have read (hop h - 1's sweep B) the dY slot our tiles land in.
    @pl.when(jnp.logical_and(h >= f + 2, h < n_hops))
    def _():
      _take_credit(credit(s, 1))

    def ready(j):  # tile j of the incoming dY (sent during upstream's hop h - 1) is here
      dy_tile_copy(s, d, rows(dybufs[s].at[slot], tn, j), j, slot).wait_recv()

    src = None if first is True else (lambda j: rows(dybufs[s].at[slot], tn, j))
    sweep_cols(y_blk, id_blk, _Acc(tn, remote_out(s, d, h), src=src, ready=ready, first=first))

    @pl.when(jnp.logical_and(h >= f + 1, h <= n_hops - 2))
    def _():
      grant(s, d, 1)  # upstream may now send hop h + 1's dY tiles into our slot `slot`

  def hop(s, h):
    """Hop h >= 1 of stream s (traced h): the chunk from -d * h devices away."""
    d, n_hops, f = plan.directions[s], plan.hops[s], plan.first_dy[s]
    slot = lax.rem(h, 2)
    other = 1 - slot
    y_blk, id_blk = ybufs[s].at[slot], idbufs[s].at[slot]
    for c in y_copies(s, d, y_blk, id_blk, slot):
      c.wait_recv()
    sends = lambda: y_copies(s, d, y_blk, id_blk, other)

    @pl.when(h < n_hops)
    def _():
      @pl.when(h >= 2)
      def _():
        _take_credit(credit(s, 0))  # downstream has freed its slot `other`
      for c in sends():
        c.start()

    sweep_rows(y_blk, id_blk, first=False)
    if grads:
      dy_sweep(s, d, h, y_blk, id_blk, first=False if f == 0 else h == f)

    @pl.when(h < n_hops)
    def _():
      for c in sends():
        c.wait_send()

    @pl.when(jnp.logical_and(h >= 1, h <= n_hops - 2))
    def _():
      grant(s, d, 0)  # upstream may now send hop h + 1's chunk into our slot `slot`

  # ---- Hop 0: the own chunk, then the ring. ----

  if n > 1:
    barrier = pltpu.get_barrier_semaphore()
    neighbours = sorted({-d for d in plan.directions})  # who writes to us first
    for off in neighbours:
      pl.semaphore_signal(barrier, 1, device_id=device(off),
                          device_id_type=pl.DeviceIdType.MESH)
    pl.semaphore_wait(barrier, len(neighbours))

  first_sends = []
  for s, d in enumerate(plan.directions):
    if plan.hops[s] >= 1:
      first_sends += y_copies(s, d, y_ref, yid_ref, 1)
  for c in first_sends:
    c.start()
  sweep_rows(y_ref, yid_ref, first=True)
  if grads:
    if n == 1:
      sweep_cols(y_ref, yid_ref, _Acc(tn, local_out(home_refs[0], tn)))
    else:  # The right copy carries the own block's dY.
      dy_sweep(0, 1, 0, y_ref, yid_ref, first=True)
  for c in first_sends:
    c.wait_send()

  if len(plan.hops) == 1:
    if plan.hops[0] >= 1:
      lax.fori_loop(1, plan.hops[0] + 1, lambda h, c: (hop(0, h), c)[1], 0)
  else:
    def round_(h, carry):
      hop(0, h)
      hop(1, h)
      return carry

    lax.fori_loop(1, plan.hops[1] + 1, round_, 0)
    if plan.hops[0] > plan.hops[1]:
      hop(0, plan.hops[0])

  # Every dY tile sent to us as its owner has landed before we exit.
  if grads and n > 1:
    for s, d in enumerate(plan.directions):
      def wait_home(j, carry, s=s, d=d):
        home_tile_copy(s, d, rows(home_refs[s], tn, j), j).wait_recv()
        return carry
      lax.fori_loop(0, nj, wait_home, 0)


def _trip(x, y, x_ids, y_ids, log_t, bias, axis_name, schedule, interpret, block_sizes,
          with_grads):
  """This device's loss sum and, if asked for, its float32 (dx, dy, dlog_t, dbias)."""
  n_dev = 1 if axis_name is None else lax.axis_size(axis_name)
  b_valid, dim = x.shape
  sub = _sublanes(x.dtype)
  tm = _fit_tile(b_valid, block_sizes.block_rows, sub)
  tn = _fit_tile(b_valid, block_sizes.block_cols, sub)
  b = _round_up(b_valid, math.lcm(tm, tn))
  if b != b_valid:  # Zero rows, masked out in the kernel; their ids never matter.
    pad = lambda a: jnp.pad(a, [(0, b - b_valid)] + [(0, 0)] * (a.ndim - 1))
    x, y, x_ids, y_ids = map(pad, (x, y, x_ids, y_ids))
  plan = _make_plan(n_dev, schedule, b, b_valid, dim, tm, tn, x.dtype, with_grads)
  n_streams = len(plan.hops)
  f32 = jnp.float32
  params = jnp.stack([jnp.exp(jnp.reshape(log_t, ()).astype(f32)),
                      jnp.reshape(bias, ()).astype(f32)])
  xid = x_ids.reshape(b, 1)
  yid = y_ids.reshape(b // tn, 1, tn)
  me = jnp.zeros((1,), jnp.int32)
  if axis_name is not None:
    me = lax.axis_index(axis_name).astype(jnp.int32).reshape(1)
    # Under shard_map with check_vma the kernel's operands must all vary over the axis.
    params, me, xid, yid = (vma.pvary(a, {axis_name}) for a in (params, me, xid, yid))

  hbm = pl.BlockSpec(memory_space=pl.ANY)
  x_axes = vma.varying_axes(x)
  sums = vma.shape_struct((8, tn), f32, x_axes)
  out_shape, out_specs = [sums], [pl.BlockSpec(memory_space=pltpu.VMEM)]
  bd = lambda dt, lead=(): vma.shape_struct(lead + (b, dim), dt, x_axes)
  if with_grads:
    out_shape += [bd(f32)] + [bd(f32)] * n_streams
  # The travelling slots (none on one device).
  n_buf = n_streams if n_dev > 1 else 0
  out_shape += [bd(x.dtype, (2,))] * n_buf
  out_shape += [vma.shape_struct((2,) + yid.shape, jnp.int32, x_axes)] * n_buf
  if with_grads:
    out_shape += [bd(f32, (2,))] * n_buf
  out_specs += [hbm] * (len(out_shape) - 1)

  isz = x.dtype.itemsize
  blocks = n_dev
  flops = (8 if with_grads else 2) * b * b * dim * blocks
  # Sweep A streams Y once per row tile and X once; sweep B the converse, plus the f32
  # gradient tiles in and out.
  per_block = (b * dim * isz) * (1 + b // tm)
  if with_grads:
    per_block += (b * dim * isz) * (1 + b // tn) + 3 * b * dim * 4
  wire = (b * dim * isz + 4 * b + (4 * b * dim if with_grads else 0)) * max(n_dev - 1, 0)
  cost = dict(flops=flops, transcendentals=(5 if with_grads else 2) * b * b * blocks,
              bytes_accessed=per_block * blocks + wire)
  if "remote_bytes_transferred" in {f.name for f in dataclasses.fields(pl.CostEstimate)}:
    cost["remote_bytes_transferred"] = wire
  vmem = _vmem_bytes(tm, tn, dim, isz, with_grads)
  vmem_limit = int(min(max(vmem * 3 // 2 + 2 * 2**20, 16 * 2**20), 100 * 2**20))

  if interpret is True:
    interpret = pltpu.InterpretParams()
  outs = pl.pallas_call(
      functools.partial(_ring_kernel, plan, axis_name),
      out_shape=out_shape,
      in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM)] * 2 + [hbm] * 4,
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((2, tm, dim), x.dtype), pltpu.VMEM((2, tn, dim), x.dtype),
                      pltpu.VMEM((2, tm, 1), jnp.int32), pltpu.VMEM((2, 1, tn), jnp.int32),
                      # Local tile copies: (operand or gradient kind, slot).
                      pltpu.SemaphoreType.DMA((6, 2)),
                      # Chunk copies: (stream, y or ids, send or receive, slot).
                      pltpu.SemaphoreType.DMA((n_streams, 2, 2, 2)),
                      # dY tile copies: (stream, send/receive on/home, slot, tile).
                      pltpu.SemaphoreType.DMA((n_streams, 4, 2, b // tn)),
                      # Credits: (stream, y slot or dY slot freed).
                      pltpu.SemaphoreType.REGULAR((n_streams, 2))]
      + ([pltpu.VMEM((2, max(tm, tn), dim), f32)] if with_grads else []),
      compiler_params=pltpu.CompilerParams(
          collective_id=_COLLECTIVE_ID if n_dev > 1 else None,
          vmem_limit_bytes=vmem_limit),
      cost_estimate=pl.CostEstimate(**cost),
      interpret=interpret or False,
      name=f"siglip_ring_{'fwd_bwd' if with_grads else 'fwd'}",
  )(params, me, x, xid, y, yid)
  sums = outs[0]
  loss = jnp.sum(sums[0])
  if not with_grads:
    return loss
  dx, homes = outs[1][:b_valid], outs[2:2 + n_streams]
  dy = functools.reduce(jnp.add, homes)[:b_valid]
  return loss, (dx, dy, jnp.sum(sums[1]), jnp.sum(sums[2]))


def _checked_trip(x, y, x_ids, y_ids, log_t, bias, with_grads, *, axis_name, schedule,
                  interpret, block_sizes):
  block_sizes = _check_inputs(x, y, x_ids, y_ids, log_t, bias, block_sizes)
  return _trip(x, y, x_ids, y_ids, log_t, bias, axis_name, schedule, interpret, block_sizes,
               with_grads)


def ring_trip(*, axis_name, schedule="bidirectional", interpret=False,
              block_sizes: BlockSizes | None = None):
  """This kernel as a trip for ``siglip_fast.reference.ring.global_mean``: per device, the
  loss sum and d(global sum)/d(local inputs); the psum and 1/B stay outside its VJP."""
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  return functools.partial(_checked_trip, axis_name=axis_name, schedule=schedule,
                           interpret=interpret, block_sizes=block_sizes)


def ring_loss(x, y, x_ids, y_ids, log_t, bias, *, axis_name=None, schedule="bidirectional",
              interpret=False, block_sizes: BlockSizes | None = None):
  """Mean SigLIP loss over the ring on ``axis_name`` (one device when None), in one kernel.

  x, y: this device's (b, D) image and text chunks (float32 or bfloat16). x_ids, y_ids:
  their (b,) int32 pair ids, compared across devices. log_t, bias: float32 scalars,
  replicated. interpret: False, True or a ``pltpu.InterpretParams`` (TPU interpret mode).
  Returns the float32 global mean loss, replicated; differentiable w.r.t. x, y, log_t, bias.
  """
  trip = ring_trip(axis_name=axis_name, schedule=schedule, interpret=interpret,
                   block_sizes=block_sizes)
  return global_mean(trip, x, y, x_ids, y_ids, log_t, bias, axis_name)

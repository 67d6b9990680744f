"""The SigLIP ring inside one Pallas TPU kernel: text or image chunks travel by neighbour
remote DMA while the MXU works on the chunk that has already arrived (paper section 3.3).

Same contract as ``siglip_fast.reference.ring_loss`` (the oracle): called inside
``shard_map`` over ``axis_name`` with this device's (b, D) chunks, it returns the global mean
loss, replicated, and is differentiable w.r.t. x, y, log_t and bias.

One kernel, run as one or two trips round the ring. Each device *owns* an operand A (its
local (b, D) chunk, read from its own HBM) while the other operand B travels, with its pair
ids, from neighbour to neighbour. At each hop the device computes the (b x b) block of
(A_local, B_visiting) tile by tile in VMEM and accumulates into outputs that stay local:
the loss sum, the statistics sum G * S and sum G (dlog_t and dbias), and dA.
  - Loss only: one trip (A = x, B = y), 2 b^2 D FLOPs per block.
  - Value and gradients, one trip (``BlockSizes.fuse_dy``, the default where this device's
    f32 (b, D) dX fits VMEM): each tile is computed once, 6 b^2 D per block. dX stays
    resident in VMEM for the whole kernel; each text tile's f32 dY accumulates in VMEM over
    the image tiles and then travels on with the chunk: the next device adds its share, and
    the device after the last hop sends it home to the chunk's owner. Per hop the wire
    carries the chunk, its ids and its f32 dY.
  - Value and gradients, two trips (where dX does not fit): (A = x, B = y) for the loss, the
    statistics and dX = t G @ Y, then the transposed block (A = y, B = x with the ids
    swapped) for dY = t G^T @ X, the same logits tiles x @ y.T with the visiting x as the
    row operand, so every logit is the same number in both trips. 4 b^2 D FLOPs per block
    per trip, 8 b^2 D in all (the logits computed twice); per hop the wire carries one
    chunk and its ids, no gradient.
Nothing of size b x b leaves VMEM, and copies only ever go to a ring neighbour. Every plan
accumulates G @ Y and G^T @ X; t multiplies the (b, D) gradients once, after the kernel.

Streams: the right copy of every chunk (+1) and, under the bidirectional schedule, also the
left copy (-1). In the two-trip plan each copy goes half way round; in the one-trip plan a
chunk's dY must come home by neighbour hops, so each direction carries half of every
chunk's text tiles all the way round (n - 1 hops, then its dY one hop home). Both streams'
hop h forms round h: the round first waits for both chunks, then starts both sends on to
the neighbours, computes both blocks, and waits for both sends at its end, so both link
directions are busy during all of the round's compute.

Handshake. Each stream's chunks land in two HBM slots per device (outputs of the call used as
scratch, so every device has them at the same place for the remote copies): hop h's chunk in
slot h % 2. A remote write may only land in a slot its owner is done with. Both slots are
free at entry, once a barrier on the collective barrier semaphore has shown that the
upstream neighbours are inside the kernel. From then on a device *grants a credit* (a remote
``semaphore_signal`` to its upstream neighbour) when it has finished hop h (1 <= h <= H - 2),
and upstream takes that credit before its hop h + 1 send, which lands in the slot hop h
read. Every credit granted is taken and every copy is waited for at both ends (the sender
for its send semaphore, the receiver for its receive semaphore), so all semaphores are zero
at kernel exit: TPU interpret mode checks that (tests/test_kernel_tpu_ring.py).

The one-trip plan's dY tiles land in two more HBM slots per stream, on the same credits: a
neighbour's hop-h dY tiles go to the slot its hop-h chunk went to. A DMA semaphore counts
bytes, not copies, so a block waits for all of its arriving dY tiles at once (after its
first column of tiles, see ``_fused_sweep``) rather than tile by tile.

Semaphores, whatever b: 12 DMA semaphores for the local tile pipeline, 8 per stream for the
chunk copies (chunk or ids, send or receive, slot), one credit per stream and the barrier;
the one-trip plan adds 3 for its dY sends and local copies and 3 per stream for its dY
arrivals (slot 0, slot 1, home).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from siglip_fast import validate
from siglip_fast.kernels import mosaic_common as mc
from siglip_fast.kernels import tpu
from siglip_fast import vma
from siglip_fast.ring import SCHEDULES, global_mean

_COLLECTIVE_ID = 7
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Largest tile of the per-hop (b x b) block: ``block_rows`` image rows x ``block_cols``
  text rows, each a multiple of 8 (float32) or 16 (bfloat16), the sublanes of a vreg.

  The larger of the two tiles used is the largest multiple of the sublane count, between
  half and all of the given size, that divides the local batch b (failing that, b is padded
  up to a multiple of the tile and the padding masked out); the smaller is the largest
  multiple of the sublanes up to its given size that divides that (padded) b. The text
  tile (the logits' lanes) then narrows to a multiple of 128 where one from half its size up
  divides b (``_lane_tile``). A trip keeps
  two buffers of an image tile and of a text tile, with gradients two f32 gradient tiles
  (all D wide), and a few (rows x cols) f32 temporaries in VMEM.

  fuse_dy: value-and-grad as one trip that computes each block once (6 b^2 D FLOPs per
  block) with this device's float32 (b, D) dX resident in VMEM while the text chunks travel
  with their float32 dY; False: two trips (8 b^2 D, each logit computed twice) that keep
  only tiles in VMEM. None: one trip where the resident dX fits the chip's VMEM budget
  (``fused_vmem_bytes``; the smallest chip's, v4's 16 MiB, where no chip is known).

  strip_rows: the tile body of the trips that make the loss (the loss alone, the one-trip
  plan, the first of two trips) in row strips of this many image rows (a multiple of 128
  that divides the image tile; otherwise, and for None, the whole tile), each strip's
  gradient matmuls and sums beside the next strip's elementwise work, as the block
  kernels' ``tpu.BlockSizes.strip_rows``. The transposed dY trip keeps whole tiles.
  Default: v6e's wide tiles take v6e's 256.
  """

  block_rows: int = 256
  block_cols: int = 256
  fuse_dy: bool | None = None
  strip_rows: int | None = None

  @classmethod
  def get_default(
    cls,
    dim: int,
    dtype,
    *,
    batch: int | None = None,
    with_grads: bool = True,
    fuse_dy: bool | None = None,
  ) -> "BlockSizes":
    """The tiles a call without ``block_sizes`` runs at feature dim ``dim``, input
    ``dtype`` and local batch ``batch`` (None: one tile's worth), with or without
    gradients; ``fuse_dy`` forces a value-and-grad plan, as the field does, and is kept in
    the result. Traced inside shard_map over a compile-only TPU mesh, get_tpu_info()
    describes the target chip, not the host (tests/test_kernel_tpu_ring.py checks v4, v5e
    and v6e)."""
    generation, vmem = _chip()
    itemsize = jnp.dtype(dtype).itemsize
    # 512 x 512 tiles at D = 1152 need ~18 MiB with gradients: fine on v5e/v5p/v6e (64-128
    # MiB VMEM per core), not on v4 (16 MiB). Where no chip is known (CPU, interpret mode)
    # the size that fits all of them.
    size = 512 if (vmem or 0) >= 64 * 2**20 else 256
    if _vmem_bytes(size, size, dim, itemsize, True) > 24 * 2**20:
      size = 256
    square = cls(size, size, fuse_dy)
    wide = _WIDE_TILES.get(generation)
    if wide is None or itemsize != 2:
      return square
    strip = tpu._STRIP_ROWS.get(generation)
    loss_tiles, grad_tiles = wide
    if not with_grads:
      return cls(*loss_tiles, fuse_dy, strip)
    wide = cls(*grad_tiles, fuse_dy, strip)
    if fuse_dy is not None:
      return wide
    # The one-trip plan (6 b^2 D) wherever it fits, in the wide tiles or else the square
    # ones (the smaller text tile leaves more VMEM to the resident dX), in strips either way
    # (square: -1.3% a trip at b = 16384, D = 1152): giving it up for two trips (8 b^2 D)
    # costs far more than the wide tiles save. Two trips: wide tiles.
    sub, lanes, b = mc.sublanes(dtype), _lanes(generation), batch or size
    for tiles in (wide, cls(size, size, fuse_dy, strip)):
      tm, tn, b_pad = _fit_tiles(b, tiles, sub, lanes)
      if _fuses(tiles, b_pad, tm, tn, dim, itemsize):
        return tiles
    return wide


# Tiles wider than the square default, per generation, for bf16 inputs: (the loss alone,
# with gradients), image rows x text rows. v6e's MXUs leave the per-element vector work to
# decide; a wider text tile halves the passes per image row and a taller image tile gives
# the row strips room (static profile, bf16, a hop at b = 4096, D = 768 / 1152, against
# 512 x 512: the one-trip value-and-grad -6.0% / -4.5%, the two trips in 256-row strips
# -14% / -12%; the loss alone at 1024 x 1024 in strips -11% / -9% against 512 x 1024 whole;
# docs/PERFORMANCE.md section 5). Larger tiles gain a few % more and compile several times
# longer (two trips at 1024 x 2048: 4 min in the profiler, against 45 s). On v5e the wide
# tiles gain 0.6-4.7% and double the compile time: not taken.
_WIDE_TILES = {"v6e": ((1024, 1024), (512, 1024))}

# The one-trip plan's VMEM budget where no chip is known: the smallest chip's.
_SMALLEST_VMEM = min(mc.VMEM_CAPACITY.values())


def _chip() -> tuple[str | None, int | None]:
  """(generation, VMEM bytes) of the TPU being traced for: ("v6e", 128 MiB); (None, None)
  off TPU or on a jax that cannot say."""
  try:
    info = pltpu.get_tpu_info()
  except Exception:  # Not a TPU, or an API this jax lacks: fall back to the safe size.
    return None, None
  version = getattr(info, "chip_version", None)
  return getattr(version, "value", None), int(info.vmem_capacity_bytes)


def _vmem_bytes(tm, tn, dim, itemsize, with_grads):
  """VMEM scratch of the kernel: double-buffered operand and id tiles, the f32 gradient
  tiles, and an allowance for the (tm, tn) f32 temporaries of the tile math (which also
  holds a trip's two strips of logits, ``_Plan.logits_buffer``)."""
  tiles = 2 * (tm + tn) * dim * itemsize + 2 * (tm * 128 + 8 * max(tn, 128)) * 4
  grads = 2 * max(tm, tn) * dim * 4 if with_grads else 0
  temps = 8 * tm * max(tn, 128) * 4 + 8 * max(tn, 128) * 4
  return tiles + grads + temps


def fused_vmem_bytes(b, tm, tn, dim, itemsize):
  """VMEM of the one-trip value-and-grad plan at local batch b (padded): the resident f32
  (b, D) dX, two f32 dY tiles being accumulated and one arriving, and the tile pipeline."""
  return b * dim * 4 + 3 * tn * dim * 4 + _vmem_bytes(tm, tn, dim, itemsize, False)


def _fuses(block_sizes, b, tm, tn, dim, itemsize) -> bool:
  if block_sizes.fuse_dy is not None:
    return block_sizes.fuse_dy
  budget = mc.VMEM_BUDGET * (_chip()[1] or _SMALLEST_VMEM)
  return fused_vmem_bytes(b, tm, tn, dim, itemsize) <= budget


def _fit_tile(b, tile, sub):
  """The tile for a local batch b and a largest tile ``tile`` (see ``BlockSizes``)."""
  if b <= tile:
    return mc.round_up(b, sub)
  for t in range(tile, tile // 2 - 1, -sub):
    if b % t == 0:
      return t
  return tile


def _fit_tiles(b_valid, block_sizes, sub, lanes=mc.LANES) -> tuple[int, int, int]:
  """(tm, tn, b): the image and text tiles for local batch b_valid and the batch padded to
  a multiple of both. The larger tile is fitted first and the smaller one to divide the
  batch it pads to, so tiles that do not nest (e.g. 336 and 1008 for 512 x 1024 at
  b = 1000) never pad b to their least common multiple (32256 there). The text tile, the
  logits tile's lanes, is then narrowed to whole multiples of ``lanes`` (None: not) where
  that still divides b (``_lane_tile``)."""
  rows, cols = block_sizes.block_rows, block_sizes.block_cols
  big = _fit_tile(b_valid, max(rows, cols), sub)
  b = mc.round_up(b_valid, big)
  small = min(rows, cols)
  small = next(t for t in range(min(small, b), 0, -sub) if b % t == 0)
  tm, tn = (big, small) if rows > cols else (small, big)
  return tm, _lane_tile(tn, b, lanes), b


def _lane_tile(tn, b, lanes):
  """The text tile: ``tn``, or where that leaves the last vreg of every row of the logits
  tile partly empty, the widest multiple of ``lanes`` (128) from tn / 2 up that divides b.
  A tile of 448 at b = 1792 computes 512 lanes a row; 256 wastes none (static profile, a
  trip of the ring kernel: v5e and v5p 0.6-13% fewer cycles at b = 1792, 10-16% at 4352
  (272 -> 256), v4 8-9% at 1152 (192 -> 128)). Where none divides b, one tile spans b, or
  ``lanes`` is None, tn stays."""
  if lanes is None or tn % lanes == 0 or tn >= b:
    return tn
  fits = (t for t in range(tn - tn % lanes, tn // 2 - 1, -lanes) if t and b % t == 0)
  return next(fits, tn)


def _lanes(generation) -> int | None:
  """The text tile's alignment: a vreg's lanes; none on v6e, whose wide text tiles gained
  nothing narrowed (static profile, D = 768 / 1152: to 128 lanes, 576 -> 384 at b = 1152,
  +1.9% / -1.0% a trip; to its MXU's 256, 896 -> 512 at 3584, +1.5% / 0.0%)."""
  return None if generation == "v6e" else mc.LANES


def _check_inputs(x, y, x_ids, y_ids, log_t, bias, block_sizes, with_grads):
  """The shared validator's checks, plus the ring's own: one (b, D) shape on every device
  and tiles that are whole vregs. Returns the int32 ids, the float32 scalars and the
  block sizes (defaults filled in for the trip, with or without gradients)."""
  checked = validate.check_block_inputs(x, y, x_ids, y_ids, log_t, bias)
  if x.shape != y.shape:
    raise ValueError(
      f"x and y must have the same shape (b, D) in the ring, got {x.shape} and {y.shape}"
    )
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(
      x.shape[1], x.dtype, batch=x.shape[0], with_grads=with_grads
    )
  if not isinstance(block_sizes, BlockSizes):
    raise TypeError(
      f"block_sizes must be a siglip_fast.kernels.tpu_ring.BlockSizes, got {block_sizes!r}"
    )
  if block_sizes.fuse_dy not in (None, True, False):
    raise TypeError(f"block_sizes.fuse_dy must be True, False or None, got {block_sizes.fuse_dy!r}")
  strip = block_sizes.strip_rows
  if strip is not None and (not isinstance(strip, int) or strip <= 0 or strip % mc.LANES):
    raise ValueError(
      f"block_sizes.strip_rows must be a positive multiple of {mc.LANES} or None, got {strip!r}"
    )
  sub = mc.sublanes(x.dtype)
  for arg in ("block_rows", "block_cols"):
    t = getattr(block_sizes, arg)
    if not isinstance(t, int) or t <= 0 or t % sub:
      raise ValueError(
        f"block_sizes.{arg} must be a positive multiple of {sub} for "
        f"{x.dtype} inputs (the sublanes of a vreg), got {t}"
      )
  return checked, block_sizes


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static shape of one trip: sizes, schedule, and what the trip accumulates.

  A trip's block at a hop is (A_local x B_visiting). ``transposed`` says which side of the
  logits the owned operand A is: False, A holds the image rows (A = x, B = y); True, A
  holds the text rows (A = y, B = x), and the trip computes the same (tm, tn) logits tiles
  x @ y.T as the first, with the visiting x as the row operand, and reduces over the rows.
  """

  n_dev: int
  b: int  # the local batch, padded to a multiple of both tiles
  b_valid: int  # the local batch; rows and columns past it are masked out
  dim: int
  tm: int  # image-row tile
  tn: int  # text-row tile
  dtype: jnp.dtype
  stats: int  # sums rows kept: 0, 1 (loss) or 3 (loss, sum G * S, sum G)
  grad: bool  # accumulate dA / t = G @ B (or G^T @ B when transposed) in float32
  transposed: bool
  hops: tuple  # per stream (right, then left if bidirectional): number of hops H_s
  # Image-row strip of the trips that make the loss (``BlockSizes.strip_rows``; tm: whole
  # tiles); the transposed dY trip runs whole tiles whatever it says.
  strip: int
  # The one-trip value-and-grad (``BlockSizes.fuse_dy``): stream s carries text tiles
  # [q0, q0 + nq) of every chunk, parts[s] = (q0, nq), with their dY partial sums.
  fused: bool = False
  parts: tuple = ()

  @property
  def logits_buffer(self) -> bool:
    """A trip that makes dX in image-row strips passes each strip's logits through a
    two-slot f32 VMEM buffer (``mosaic_common.through_vmem``): v6e's dX trip 7-8% shorter
    a hop, its one trip 0-2% (static profile, bf16, b = 1024 and 4096 a chip, D = 768 /
    1152)."""
    return self.grad and not self.transposed and self.strip < self.tm

  @property
  def ta(self):  # rows of an A tile
    return self.tn if self.transposed else self.tm

  @property
  def tb(self):  # rows of a B tile
    return self.tm if self.transposed else self.tn

  @property
  def directions(self):
    return (1, -1)[: len(self.hops)]


def _ring_hops(n_dev, schedule):
  """Hops per stream of the two-trip plan: the right copy (+1), then under bidirectional
  the left copy (-1)."""
  if schedule == "unidirectional" or n_dev <= 2:
    return (n_dev - 1,) if n_dev > 1 else ()
  # As siglip_fast.ring: ceil((n - 1) / 2) rounds; with an even count the last round meets
  # the chunk n / 2 away, which only the right copy brings.
  rounds = (n_dev - 1) // 2
  return (rounds + (n_dev % 2 == 0), rounds)


def _fused_streams(n_dev, schedule, n_tiles):
  """(hops, parts) of the one-trip plan. A chunk's dY partial sum travels with it and must
  come home, which a copy sent halfway round one way cannot do by neighbour hops: so under
  bidirectional each direction carries half of every chunk's text tiles all the way round
  (n - 1 hops, then its dY one more hop home), both directions busy in every round."""
  if n_dev == 1:
    return (), ((0, n_tiles),)
  if schedule == "unidirectional" or n_dev == 2 or n_tiles == 1:
    return (n_dev - 1,), ((0, n_tiles),)
  half = (n_tiles + 1) // 2
  return (n_dev - 1,) * 2, ((0, half), (half, n_tiles - half))


def _remote_copy(kind, offset, src, dst, send_sem, recv_sem, device_id):
  """A remote DMA to ``device_id`` (a {axis: index} dict), ``offset`` (a Python int)
  places away in the ring; ``src`` may be an ``_Either``. ``kind`` names the traffic
  ("chunk", "chunk_ids"); the tests hook this to check where copies are placed and that
  they only go to a neighbour."""
  del kind, offset
  return _either_copy(
    lambda s: pltpu.make_async_remote_copy(
      s, dst, send_sem, recv_sem, device_id=device_id, device_id_type=pl.DeviceIdType.MESH
    ),
    src,
  )


@dataclasses.dataclass(frozen=True)
class _Either:
  """The ref ``first`` where ``cond`` holds at run time, else ``then`` (the same shape).
  A hop reads and sends its chunk from the own input at hop 0 and from a landing slot
  after: with the source picked at run time, one traced hop (its tile bodies are most of
  the kernel's compile time) serves every hop."""

  cond: Any
  first: Any
  then: Any

  @property
  def at(self):
    return _EitherAt(self)


@dataclasses.dataclass(frozen=True)
class _EitherAt:
  ref: _Either

  def __getitem__(self, idx):
    return _Either(self.ref.cond, self.ref.first.at[idx], self.ref.then.at[idx])


def _either(cond, first, then):
  """``first`` or ``then``, as a Python choice where ``cond`` is known while tracing."""
  if isinstance(cond, bool):
    return first if cond else then
  return _Either(cond, first, then)


@dataclasses.dataclass(frozen=True)
class _OneOf:
  """The copies ``make`` builds from an ``_Either``'s two refs: the same shape, semaphores
  and destination, so starting the one its condition picks and waiting on either is the
  same. Each descriptor is made where it is used (jax logs a descriptor never started or
  waited on as an error)."""

  make: Any
  src: _Either

  def start(self):
    pl.when(self.src.cond)(lambda: self.make(self.src.first).start())
    pl.when(jnp.logical_not(self.src.cond))(lambda: self.make(self.src.then).start())

  def wait(self):
    self.make(self.src.then).wait()

  def wait_send(self):
    self.make(self.src.then).wait_send()

  def wait_recv(self):
    self.make(self.src.then).wait_recv()


def _either_copy(make, src):
  """``make(src)``, or for an ``_Either`` the ``_OneOf`` of ``make`` on its two refs."""
  if isinstance(src, _Either):
    return _OneOf(make, src)
  return make(src)


def _take_credit(sem):
  """Wait for (and consume) one credit: the downstream neighbour has freed a slot."""
  pl.semaphore_wait(sem, 1)


def _tile(x, y, pos, params, valid=None, with_loss=True, via=None):
  """Loss terms (those of ``mosaic_common.tile_terms``), G and the similarity s of one
  (tm, tn) logits tile, all f32. ``pos``: None (no positive pair in the tile) or the (tm, tn)
  bool mask of positives; ``valid``: None, or a (tm, tn) bool mask of the pairs that are not
  batch padding; ``with_loss=False``: G alone (the loss terms None); ``via``: None, or the
  VMEM ref the similarity goes through (``mosaic_common.through_vmem``)."""
  s = lax.dot_general(
    x, y, _NT, precision=mc.precision(x.dtype), preferred_element_type=jnp.float32
  )
  if via is not None:
    s = mc.through_vmem(via, s)
  v = params[0] * s + params[1]
  loss, g = mc.tile_terms(v, params[3], pos=pos, valid=valid, with_loss=with_loss, with_grad=True)
  return loss, g, s


@dataclasses.dataclass(frozen=True)
class _Refs:
  """The kernel's refs by name, in ``pallas_call`` order (inputs, outputs, scratch); the
  one-trip plan's own refs (``fused``), then the logits buffer, last, None otherwise."""

  params: Any  # SMEM (4,): the kernel scalars (mosaic_common.kernel_scalars)
  me: Any  # SMEM (1,): this device's ring index
  a_rng: Any  # SMEM (2, b / ta): [min id, max id] of each A tile
  b_rng: Any  # SMEM (2 n_dev, b / tb): the same for each B tile of every device's chunk
  a: Any  # HBM (b, D): the owned operand
  a_ids: Any  # HBM ids of A: (b, 1) as rows, (b / tn, 1, tn) as columns
  b: Any  # HBM (b, D): this device's chunk of the travelling operand
  b_ids: Any
  sums: Any  # VMEM (8, tn) f32, or None
  da: Any  # HBM (b, D) f32, or None
  slots: tuple  # per stream: HBM (2, rows, D), where visiting B chunks (or parts) land
  id_slots: tuple  # per stream: their ids
  a_tile: Any  # VMEM (2, ta, D) double buffers of the tile pipeline
  b_tile: Any
  a_id_tile: Any
  b_id_tile: Any
  tile_sems: Any  # DMA (6, 2): local tile copies, (kind, slot)
  ring_sems: Any  # DMA (streams, 2, 2, 2): (stream, chunk or ids, send or recv, slot)
  credits: Any  # REGULAR (streams,): slots freed by the downstream neighbour
  acc: Any = None  # VMEM (2, ta, D) f32: the dA tile being accumulated (two-trip plan)
  db: Any = None  # HBM (b, D) f32: dY of this device's text chunk, brought home last
  db_slots: tuple = ()  # per stream: HBM (2, rows, D) f32, the visiting parts' dY so far
  da_all: Any = None  # VMEM (b, D) f32: this device's dX, resident for the whole trip
  db_acc: Any = None  # VMEM (2, tn, D) f32: dY tiles being accumulated / sent
  db_in: Any = None  # VMEM (tn, D) f32: the arriving dY tile
  db_sems: Any = None  # DMA (3,): sends from db_acc slot 0, 1; the local db_in copy
  db_ring_sems: Any = None  # DMA (streams, 3): receives into db slot 0, 1; home into db
  pending: Any = None  # SMEM (2,) int32: a send from db_acc slot k is not yet waited for
  logits: Any = None  # VMEM (2, strip, tn) f32: strips' logits (``_Plan.logits_buffer``)

  @classmethod
  def unpack(cls, plan: _Plan, refs):
    refs = list(refs)
    take = lambda k: [refs.pop(0) for _ in range(k)]
    named = dict(zip(("params", "me", "a_rng", "b_rng", "a", "a_ids", "b", "b_ids"), take(8)))
    named["sums"] = take(1)[0] if plan.stats else None
    named["da"] = take(1)[0] if plan.grad else None
    if plan.fused:
      named["db"] = take(1)[0]
    n_buf = len(plan.hops)
    named["slots"], named["id_slots"] = tuple(take(n_buf)), tuple(take(n_buf))
    if plan.fused:
      named["db_slots"] = tuple(take(n_buf))
    scratch = ("a_tile", "b_tile", "a_id_tile", "b_id_tile", "tile_sems", "ring_sems", "credits")
    named.update(zip(scratch, take(len(scratch))))
    if plan.fused:
      extra = ("da_all", "db_acc", "db_in", "db_sems", "db_ring_sems", "pending")
      named.update(zip(extra, take(len(extra))))
    elif plan.grad:
      named["acc"] = take(1)[0]
    if plan.logits_buffer:
      named["logits"] = take(1)[0]
    assert not refs, refs
    return cls(**named)


def _and(a, b):
  """a and b, where either may be a Python bool known while tracing."""
  if isinstance(b, bool):
    return a if b else False
  if isinstance(a, bool):
    return b if a else False
  return jnp.logical_and(a, b)


def _when(cond, body):
  """``pl.when`` that also takes a Python bool (a hop number known while tracing)."""
  if isinstance(cond, bool):
    if cond:
      body()
  else:
    pl.when(cond)(body)


def _rows(ref, size, k):
  return ref.at[pl.ds(pl.multiple_of(k * size, size), size)]


def _id_rows(ref, size, k, as_rows):
  """Tile k of an id array: (size, 1) of the (b, 1) row layout, or (1, size) of the
  (b / size, 1, size) column layout."""
  return _rows(ref, size, k) if as_rows else ref.at[k]


def _column(row):
  """(1, n) int32 -> (n, 1). The travelling ids keep the lane-dense (b / t, 1, t) layout: as
  (b, 1) they would be padded to 128 lanes in HBM and on the wire. One (128, n) transpose
  per tile is small beside the tile's (tm x tn x D) matmuls."""
  n = row.shape[1]
  return jnp.transpose(jnp.broadcast_to(row, (128, n)))[:, :1]


def _valid(plan: _Plan, i, j, strip=None, k=0):
  """Which pairs of logits tile (i, j) are real (None when the batch needed no padding);
  with ``strip``, those of the tile's row strip k of that many rows."""
  if plan.b_valid == plan.b:
    return None
  strip = strip or plan.tm
  first = i * plan.tm + k * strip if k else i * plan.tm
  r = first + lax.broadcasted_iota(jnp.int32, (strip, plan.tn), 0)
  c = j * plan.tn + lax.broadcasted_iota(jnp.int32, (strip, plan.tn), 1)
  return jnp.logical_and(r < plan.b_valid, c < plan.b_valid)


def _add_stats(plan: _Plan, r: _Refs, loss, g, s):
  """Column sums of a tile into the sums rows: the loss, and G * S and G for the scalars'
  gradients."""
  if plan.stats:
    sp, e, one_plus_e = loss
    ln1p = mc.ln1p_sum(e, one_plus_e, r.params[3])
    r.sums[0:1, :] += jnp.sum(sp, axis=0, keepdims=True) + mc.LOG2_E * jnp.sum(
      ln1p, axis=0, keepdims=True
    )
  if plan.stats > 1:
    r.sums[1:2, :] += jnp.sum(g * s, axis=0, keepdims=True)
    r.sums[2:3, :] += jnp.sum(g, axis=0, keepdims=True)


def _may_meet(plan: _Plan, r: _Refs, src, o, q):
  """Whether A tile o and B tile q (of device src's chunk) can share an id or hold padding:
  such a pair runs the full tile body, any other the lean one."""
  lo_b, hi_b = r.b_rng[2 * src, q], r.b_rng[2 * src + 1, q]
  full = (r.a_rng[0, o] <= hi_b) & (lo_b <= r.a_rng[1, o])
  if plan.b_valid != plan.b:
    full = full | ((o + 1) * plan.ta > plan.b_valid) | ((q + 1) * plan.tb > plan.b_valid)
  return full


def _fetches(r: _Refs, ops, k, slot, kind):
  """The local copies of tile k of each (source, VMEM double buffer) in ``ops`` into
  ``slot``, on tile semaphores kind, kind + 1, ..."""
  return [
    _either_copy(
      lambda s, buf=buf, a=a: pltpu.make_async_copy(
        s, buf.at[slot], r.tile_sems.at[kind + a, slot]
      ),
      src(k),
    )
    for a, (src, buf) in enumerate(ops)
  ]


def _sweep(plan: _Plan, r: _Refs, b_blk, b_ids_blk, src, first):
  """One (b x b) block (A_local x B_visiting) as a hand-written tile pipeline; ``src`` is
  the ring index of the device whose chunk B is.

  A tiles outer, B tiles inner: tiles come from HBM into double-buffered VMEM, each
  prefetched one step ahead, so the inner loop's copies hide behind the tile math. A tile
  pair whose id ranges cannot meet and that holds no padding (almost every pair off the
  diagonal) runs a lean body without the id compare, the positive selects and the mask.
  The sums stay in VMEM; the f32 dA tile accumulates in VMEM over the inner loop, starting
  from zero on the trip's first block (``first``) or from its HBM tile, and goes back to
  HBM while the next A tile computes.
  """
  ta, tb, tr = plan.ta, plan.tb, plan.transposed
  n_outer, n_inner = plan.b // ta, plan.b // tb
  n_steps = n_outer * n_inner
  outer = (
    (lambda o: _rows(r.a, ta, o), r.a_tile),
    (lambda o: _id_rows(r.a_ids, ta, o, not tr), r.a_id_tile),
  )
  inner = (
    (lambda q: _rows(b_blk, tb, q), r.b_tile),
    (lambda q: _id_rows(b_ids_blk, tb, q, False), r.b_id_tile),
  )

  fetches = functools.partial(_fetches, r)
  grad = plan.grad
  if grad:
    acc_tile = lambda slot: r.acc.at[slot]
    acc_in = lambda o, slot: pltpu.make_async_copy(
      _rows(r.da, ta, o), acc_tile(slot), r.tile_sems.at[4, slot]
    )
    # One semaphore for the outgoing dA tiles: at most one is in flight.
    acc_out = lambda o, slot: pltpu.make_async_copy(
      acc_tile(slot), _rows(r.da, ta, o), r.tile_sems.at[5, 0]
    )

  def start_outer(o):
    slot = lax.rem(o, 2)
    for c in fetches(outer, o, slot, 0):
      c.start()
    if grad and not first:
      acc_in(o, slot).start()

  start_outer(0)
  for c in fetches(inner, 0, 0, 2):
    c.start()

  def compute(o, q, so, a_bufs, b_bufs, full):
    (a_t, a_id), (b_t, b_id) = a_bufs, b_bufs
    strip = plan.strip
    n = 1 if tr else ta // strip
    # A whole tile loads A before B: the order the other chips' schedules were checked in.
    a_val = a_t[...] if n == 1 else None
    b_val = b_t[...]
    prec = mc.precision(b_val.dtype)
    if tr:  # A = y (text rows o), B = x (image rows q): dA tile / t = G^T @ X, whole
      pos = valid = None
      if full:
        pos, valid = _column(b_id[...]) == a_id[...], _valid(plan, q, o)
      loss, g, s = _tile(b_val, a_val, pos, r.params, valid, with_loss=bool(plan.stats))
      _add_stats(plan, r, loss, g, s)
      gc = g.astype(b_val.dtype)
      dy = lax.dot_general(gc, b_val, _TN, precision=prec, preferred_element_type=jnp.float32)
      acc_tile(so)[...] += dy
      return
    # A = x: in row strips of the image tile (``mc.in_row_strips``; one strip: the tile).
    rows = lambda k: pl.ds(k * strip, strip)

    def logits_terms(k):
      a_strip = a_val if n == 1 else a_t[rows(k), :]
      pos = valid = None
      if full:
        pos = (a_id[...] if n == 1 else a_id[rows(k), :]) == b_id[...]
        valid = _valid(plan, o, q, strip, k)
      via = r.logits.at[k % 2] if plan.logits_buffer else None
      return _tile(a_strip, b_val, pos, r.params, valid, bool(plan.stats), via)

    def stats_and_gradient(k, loss, g, s):
      _add_stats(plan, r, loss, g, s)
      if grad:  # dA strip = G @ Y (t applied to the whole gradient after the trip)
        gc = g.astype(b_val.dtype)
        dx = jnp.dot(gc, b_val, precision=prec, preferred_element_type=jnp.float32)
        acc = acc_tile(so)
        (acc if n == 1 else acc.at[rows(k)])[...] += dx

    mc.in_row_strips(n, logits_terms, stats_and_gradient)

  def step(c, carry):
    o, q = c // n_inner, lax.rem(c, n_inner)
    so, si = lax.rem(o, 2), lax.rem(c, 2)
    last_q = q == n_inner - 1
    if grad:
      # The VMEM slot the next A tile accumulates into is free once its last copy left.
      @pl.when(jnp.logical_and(last_q, o >= 1))
      def _():
        acc_out(o - 1, 1 - so).wait()

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
      if grad and not first:
        acc_in(o, so).wait()

    if grad and first:
      # The trip's first block starts the dA tiles from zero (later blocks from HBM).
      @pl.when(q == 0)
      def _():
        acc_tile(so)[...] = jnp.zeros((ta, plan.dim), jnp.float32)

    def tile_step(full):
      compute(o, q, so, [buf.at[so] for _, buf in outer], [buf.at[si] for _, buf in inner], full)

    full = _may_meet(plan, r, src, o, q)
    pl.when(full)(lambda: tile_step(True))
    pl.when(jnp.logical_not(full))(lambda: tile_step(False))
    if grad:
      pl.when(last_q)(lambda: acc_out(o, so).start())
    return carry

  lax.fori_loop(0, n_steps, step, 0)
  if grad:
    acc_out(n_outer - 1, (n_outer - 1) % 2).wait()


def _fused_sweep(plan: _Plan, r: _Refs, part, b_blk, b_ids_blk, src, db_io):
  """One block of the one-trip plan: A_local x the visiting part ``b_blk`` (text tiles
  part = (q0, nq) of device src's chunk), each tile computed once for the loss, the
  statistics, dX and dY (6 tn tm D FLOPs a tile).

  B tiles outer, A tiles inner: the (tn, D) f32 dY tile accumulates in VMEM over the A
  tiles; dX rows go straight into the VMEM-resident dX. When a B tile is done the dY so far
  of that tile (sent by the upstream neighbour during its previous hop; none on the chunk's
  first block) is added and the tile leaves at once for the downstream neighbour (or home),
  so the dY traffic overlaps the rest of the block. ``db_io`` (from ``_Ring``): arrival,
  None or (a remote copy of one arriving tile, to wait on, q -> the local copy of tile q
  into VMEM, and whether anything arrives: a Python or a run-time bool); departure(q, k),
  which sends dY slot k as tile q; wait_departed(k).
  """
  q0, nq = part
  tm, tn, n_a = plan.tm, plan.tn, plan.b // plan.tm
  n_steps = nq * n_a
  arrival, departure, wait_departed = db_io
  outer = (
    (lambda q: _rows(b_blk, tn, q), r.b_tile),
    (lambda q: b_ids_blk.at[q], r.b_id_tile),
  )
  inner = (
    (lambda o: _rows(r.a, tm, o), r.a_tile),
    (lambda o: _id_rows(r.a_ids, tm, o, True), r.a_id_tile),
  )
  fetches = functools.partial(_fetches, r)
  for c in fetches(outer, 0, 0, 0) + fetches(inner, 0, 0, 2):
    c.start()

  def tile_step(o, q, so, sq, full):
    # In row strips of the image tile (``mc.in_row_strips``).
    strip = plan.strip
    y_val = r.b_tile[sq]
    prec = mc.precision(y_val.dtype)

    def logits_terms(k):
      rs = pl.ds(k * strip, strip)
      x_val = r.a_tile[so, rs, :]
      pos = valid = None
      if full:
        pos = r.a_id_tile[so, rs, :] == r.b_id_tile[sq]
        valid = _valid(plan, o, q0 + q, strip, k)
      via = r.logits.at[k % 2] if plan.logits_buffer else None
      return (x_val, *_tile(x_val, y_val, pos, r.params, valid, via=via))

    def gradients_and_sums(k, x_val, loss, g, s):
      gc = g.astype(x_val.dtype)
      dx = _rows(r.da_all, tm, o).at[pl.ds(k * strip, strip)]
      dx[...] += jnp.dot(gc, y_val, precision=prec, preferred_element_type=jnp.float32)
      r.db_acc[sq] += lax.dot_general(
        gc, x_val, _TN, precision=prec, preferred_element_type=jnp.float32
      )
      # After the matmuls, as in the block kernel: v5p's steps came out 6-7% shorter than
      # with the sums first, v5e's 1-4% longer (static profile).
      _add_stats(plan, r, loss, g, s)

    mc.in_row_strips(tm // strip, logits_terms, gradients_and_sums)

  def step(c, carry):
    q, o = c // n_a, lax.rem(c, n_a)
    sq, so = lax.rem(q, 2), lax.rem(c, 2)
    last_o = o == n_a - 1

    @pl.when(c + 1 < n_steps)
    def _():
      for cp in fetches(inner, lax.rem(c + 1, n_a), 1 - so, 2):
        cp.start()

      @pl.when(last_o)
      def _():
        for cp in fetches(outer, q + 1, 1 - sq, 0):
          cp.start()

    for cp in fetches(inner, o, so, 2):
      cp.wait()

    @pl.when(o == 0)
    def _():
      for cp in fetches(outer, q, sq, 0):
        cp.wait()

      # dY slot sq is free once the tile it sent two B tiles ago has left.
      @pl.when(r.pending[sq] == 1)
      def _():
        wait_departed(sq)
        r.pending[sq] = 0

      r.db_acc[sq] = jnp.zeros((tn, plan.dim), jnp.float32)
      if arrival is not None:
        _when(_and(q >= 1, arrival[2]), lambda: arrival[1](q).start())

    full = _may_meet(plan, r, src, o, q0 + q)
    pl.when(full)(lambda: tile_step(o, q, so, sq, True))
    pl.when(jnp.logical_not(full))(lambda: tile_step(o, q, so, sq, False))

    def arrive(q, sq):
      @pl.when(q == 0)
      def _():
        # A DMA semaphore counts bytes, not copies: with several tiles in flight to one
        # semaphore, a tile's worth of bytes does not say which tile has landed. So wait
        # for all of them, once, here: the last left upstream at the end of its previous
        # block, about when this block began, and has had this first column to land.
        lax.fori_loop(0, nq, lambda _, c: (arrival[0].wait_recv(), c)[1], 0)
        arrival[1](q).start()

      arrival[1](q).wait()
      r.db_acc[sq] += r.db_in[...]

    @pl.when(last_o)
    def _():
      if arrival is not None:
        _when(arrival[2], lambda: arrive(q, sq))
      departure(q, sq)
      r.pending[sq] = 1

    return carry

  lax.fori_loop(0, n_steps, step, 0)


class _Ring:
  """The travelling B chunks: neighbour copies only, double-buffered slots, credits."""

  def __init__(self, plan: _Plan, r: _Refs, axis_name):
    self.plan, self.r, self.axis_name = plan, r, axis_name

  def device(self, off):
    n = self.plan.n_dev
    # (lax.axis_index inside the kernel trips interpret mode's vma checks: me is an input.)
    return {self.axis_name: lax.rem(self.r.me[0] + off + n, n)}

  def copies(self, s, src, src_ids, slot):
    """Chunk and ids from ``src`` to the downstream neighbour's ``slot`` of stream s."""
    d, r = self.plan.directions[s], self.r
    sem = lambda k, end: r.ring_sems.at[s, k, end, slot]
    return (
      _remote_copy("chunk", d, src, r.slots[s].at[slot], sem(0, 0), sem(0, 1), self.device(d)),
      _remote_copy(
        "chunk_ids", d, src_ids, r.id_slots[s].at[slot], sem(1, 0), sem(1, 1), self.device(d)
      ),
    )

  def enter(self):
    """A device's slots may be written once it is inside the kernel (before that the
    buffers may still belong to an earlier program): each device tells its upstream
    neighbours, who write to it, that it has entered, and waits for the same word from
    its downstream neighbours before its first send."""
    barrier = pltpu.get_barrier_semaphore()
    upstream = sorted({-d for d in self.plan.directions})
    for off in upstream:
      pl.semaphore_signal(
        barrier, 1, device_id=self.device(off), device_id_type=pl.DeviceIdType.MESH
      )
    pl.semaphore_wait(barrier, len(upstream))

  def grant(self, s):
    """Tell stream s's upstream neighbour that one of our slots is free again."""
    upstream = self.device(-self.plan.directions[s])
    pl.semaphore_signal(
      self.r.credits.at[s], 1, device_id=upstream, device_id_type=pl.DeviceIdType.MESH
    )

  def own(self, s):
    """Stream s's part of this device's chunk (in the two-trip plan the whole chunk) and
    its ids: what hop 0 computes and sends."""
    plan, r = self.plan, self.r
    if plan.fused:
      return r.b.at[_part_rows(plan, s)], r.b_ids.at[pl.ds(*plan.parts[s])]
    return r.b, r.b_ids

  def round_(self, h, streams):
    """Hop h of each stream in ``streams``: the chunk from -d * h devices away, at hop 0
    this device's own.

    Hop h >= 1's chunk sits in slot h % 2 (sent by upstream during its hop h - 1). All the
    streams' chunks are received, then all their sends to the downstream neighbours' other
    slot start, so both link directions are busy during all of the round's compute; the
    sends are waited for at the round's end. ``h`` may be a run-time value: the one
    trip's loop runs hop 0 too, reading and sending the own chunk where the later hops use
    a slot (``_Either``), so the kernel traces its tile bodies for one round, not two.
    """
    r, hops = self.r, self.plan.hops
    slot = h % 2 if isinstance(h, int) else lax.rem(h, 2)
    # Only the one trip's loop meets hop 0 at run time; the two trips' loop starts at 1.
    first = h == 0 if isinstance(h, int) or self.plan.fused else False
    landed = lambda s: (r.slots[s].at[slot], r.id_slots[s].at[slot])
    chunk = lambda s: tuple(_either(first, o, l) for o, l in zip(self.own(s), landed(s)))
    # A chunk has landed at every hop but hop 0.
    later = (not first) if isinstance(first, bool) else h >= 1
    if later is not False:  # no descriptors for a wait that is never traced
      for s in streams:
        for c in self.copies(s, *landed(s), slot):
          _when(later, c.wait_recv)
    sends = lambda s: self.copies(s, *chunk(s), 1 - slot)

    def start(s):
      # Downstream's slot 1 - slot last held its hop h - 1 chunk (h >= 2); hops 0 and 1
      # write its slots for the first time.
      _when(h >= 2, lambda: _take_credit(r.credits.at[s]))
      for c in sends(s):
        c.start()

    for s in streams:
      _when(h < hops[s], functools.partial(start, s))
    for s in streams:
      # The chunk from -d * h devices away. At hop 0 the two-trip plan computes the own
      # (whole) chunk once, as stream 0 (``run`` traces that hop apart).
      if isinstance(h, int) and h == 0 and s and not self.plan.fused:
        continue
      src = lax.rem(r.me[0] - self.plan.directions[s] * h + 2 * self.plan.n_dev, self.plan.n_dev)
      self.sweep(s, h, *chunk(s), src)

    def wait_sends(s):
      for c in sends(s):
        c.wait_send()

    for s in streams:
      _when(h < hops[s], functools.partial(wait_sends, s))
    for s in streams:
      # Upstream's hop h + 1 send lands in our slot h % 2, the one this hop just read.
      _when((h >= 1) & (h <= hops[s] - 2), functools.partial(self.grant, s))

  def sweep(self, s, h, chunk, chunk_ids, src):
    """Stream s's block of hop h: ``chunk`` (the whole chunk, or the stream's part of it in
    the one-trip plan) from device src."""
    plan, r = self.plan, self.r
    if not plan.fused:
      _sweep(plan, r, chunk, chunk_ids, src, first=isinstance(h, int) and h == 0)
      return
    _fused_sweep(plan, r, plan.parts[s], chunk, chunk_ids, src, self.db_io(s, h))

  def db_io(self, s, h):
    """The dY traffic of stream s's hop h in the one-trip plan (see ``_fused_sweep``): the
    dY so far of each visiting tile arrives in db slot h % 2 (none at hop 0), leaves for
    the downstream neighbour's other slot, and after the last hop (H = n - 1) for home,
    the chunk's owner, one hop further on."""
    plan, r = self.plan, self.r
    tn, (q0, _) = plan.tn, plan.parts[s]
    slot = h % 2 if isinstance(h, int) else lax.rem(h, 2)
    home = lambda q: _rows(r.db, tn, q0 + q)
    if plan.n_dev == 1:
      local = lambda q, k: pltpu.make_async_copy(r.db_acc.at[k], home(q), r.db_sems.at[k])
      return None, lambda q, k: local(q, k).start(), self.wait_departed
    d = plan.directions[s]
    send = lambda k, dst, sem: _remote_copy(
      "dy", d, r.db_acc.at[k], dst, r.db_sems.at[k], sem, self.device(d)
    )
    to_slot = lambda q, k: send(
      k, _rows(r.db_slots[s].at[1 - slot], tn, q), r.db_ring_sems.at[s, 1 - slot]
    )

    def departure(q, k):
      last = plan.hops[s]
      _when(h < last, lambda: to_slot(q, k).start())
      _when(h == last, lambda: send(k, home(q), r.db_ring_sems.at[s, 2]).start())

    arrival = None
    if not (isinstance(h, int) and h == 0):
      here = lambda q: _rows(r.db_slots[s].at[slot], tn, q)
      arrival = (
        send(0, here(0), r.db_ring_sems.at[s, slot]),
        lambda q: pltpu.make_async_copy(here(q), r.db_in, r.db_sems.at[2]),
        h >= 1,  # a Python True, or at run time: nothing arrives at hop 0
      )
    return arrival, departure, self.wait_departed

  def wait_departed(self, k):
    """Wait for the dY tile sent from ``db_acc`` slot k (a semaphore per slot: one at a time)."""
    plan, r = self.plan, self.r
    tile = _rows(r.db, plan.tn, 0)
    if plan.n_dev == 1:
      pltpu.make_async_copy(r.db_acc.at[k], tile, r.db_sems.at[k]).wait()
    else:
      _remote_copy(
        "dy", 1, r.db_acc.at[k], tile, r.db_sems.at[k], r.db_ring_sems.at[0, 2], self.device(1)
      ).wait_send()

  def finish_fused(self):
    """The end of the one-trip plan: this device's dY tiles home from every stream, every
    dY tile sent gone, and the resident dX out to HBM."""
    plan, r = self.plan, self.r
    # Our own departures first: the neighbours' last receives wait on them.
    for k in range(2):
      pl.when(r.pending[k] == 1)(functools.partial(self.wait_departed, k))
    for s, (_, nq) in enumerate(plan.parts[: len(plan.hops)]):
      d = plan.directions[s]
      tile = _rows(r.db, plan.tn, 0)
      arrived = _remote_copy(
        "dy", d, r.db_acc.at[0], tile, r.db_sems.at[0], r.db_ring_sems.at[s, 2], self.device(d)
      )
      lax.fori_loop(0, nq, lambda q, c: (arrived.wait_recv(), c)[1], 0)
    out = pltpu.make_async_copy(r.da_all, r.da, r.tile_sems.at[4, 0])
    out.start()
    out.wait()

  def run(self):
    plan, r = self.plan, self.r
    streams = tuple(range(len(plan.hops)))
    if not streams:  # one device: its own block, no ring
      self.sweep(0, 0, *self.own(0), r.me[0])
    else:
      self.enter()
      # Hop 0 (every stream's chunk or part leaves for hop 1 while the own block computes)
      # and the rounds in which every stream has a hop. The one-trip plan runs hop 0 in the
      # rounds' loop (each stream computes its part of the own chunk, as of every other);
      # in the two trips stream 0 alone computes the whole own chunk at hop 0, traced apart
      # (in the loop it would be a stream that skips its block, which the static profile
      # could not tell from one that computes it).
      first = 0 if plan.fused else 1
      if first:
        self.round_(0, streams)
      both = plan.hops[-1]
      lax.fori_loop(first, both + 1, lambda h, c: (self.round_(h, streams), c)[1], 0)
      if plan.hops[0] > both:  # the right copy's extra hop (even device count)
        self.round_(plan.hops[0], (0,))
    if plan.fused:
      self.finish_fused()


def _part_rows(plan: _Plan, s):
  q0, nq = plan.parts[s]
  return pl.ds(q0 * plan.tn, nq * plan.tn)


def _ring_kernel(plan: _Plan, axis_name, *refs):
  r = _Refs.unpack(plan, refs)
  if plan.stats:
    r.sums[...] = jnp.zeros_like(r.sums)
  if plan.fused:
    r.da_all[...] = jnp.zeros_like(r.da_all)
    r.pending[0] = 0
    r.pending[1] = 0
  _Ring(plan, r, axis_name).run()


def _cost(plan: _Plan):
  """Per device, one trip: n_dev blocks, each (b x b) logits at 2 D FLOPs (and 2 D more for
  dA); the owned A read once per block, B once per A tile; the dA tile read and written
  back at every block but the first; one chunk with its ids received per hop."""
  b, dim, isz, n = plan.b, plan.dim, plan.dtype.itemsize, plan.n_dev
  if plan.fused:
    return _fused_cost(plan)
  flops = (4 if plan.grad else 2) * b * b * dim * n
  trans = _transcendentals(plan, with_g=plan.grad or plan.stats > 1)
  per_block = b * dim * isz * (1 + b // plan.ta) + 4 * b * (1 + b // plan.ta)
  da = 2 * b * dim * 4 * n - b * dim * 4 if plan.grad else 0
  wire = (b * dim * isz + 4 * b) * (n - 1)
  cost = dict(flops=flops, transcendentals=trans, bytes_accessed=per_block * n + da + wire)
  if "remote_bytes_transferred" in {f.name for f in dataclasses.fields(pl.CostEstimate)}:
    cost["remote_bytes_transferred"] = wire
  return pl.CostEstimate(**cost)


def _transcendentals(plan: _Plan, with_g: bool):
  """Per device and trip, over the (tm, tn) tiles of n_dev blocks."""
  logits = plan.b * plan.b * plan.n_dev
  return mc.transcendentals(logits, plan.tm, plan.tn, with_loss=bool(plan.stats), with_g=with_g)


def _fused_cost(plan: _Plan):
  """Per device, the one-trip plan: n_dev blocks at 6 D FLOPs a logit; A read once per B
  tile, B once per block; dY tiles written to the wire at every block and read from a
  landing slot at all but the first; dX written once. Per hop a chunk (or its parts) with
  ids and, one block behind, its f32 dY; n hops of dY (the last one home)."""
  b, dim, isz, n = plan.b, plan.dim, plan.dtype.itemsize, plan.n_dev
  per_block = b * dim * isz * (1 + b // plan.tn) + 4 * b * (1 + b // plan.tn) + 2 * b * dim * 4
  wire = (b * dim * isz + 4 * b) * (n - 1) + b * dim * 4 * (n if n > 1 else 0)
  cost = dict(
    flops=6 * b * b * dim * n,
    transcendentals=_transcendentals(plan, with_g=True),
    bytes_accessed=per_block * n + b * dim * 4 + wire,
  )
  if "remote_bytes_transferred" in {f.name for f in dataclasses.fields(pl.CostEstimate)}:
    cost["remote_bytes_transferred"] = wire
  return pl.CostEstimate(**cost)


def _ring_call(
  plan: _Plan, params, me, a_rng, b_rng, a, a_ids, bm, b_ids, *, axis_name, interpret, name
):
  """One trip of the kernel: (sums or None, dA or None, dB or None); dB (dY) from the
  one-trip plan only."""
  f32, dim, b = jnp.float32, plan.dim, plan.b
  axes = vma.varying_axes(a)
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  out_shape, out_specs = [], []
  if plan.stats:
    out_shape.append(vma.shape_struct((8, plan.tn), f32, axes))
    out_specs.append(pl.BlockSpec(memory_space=pltpu.VMEM))
  n_grads = plan.grad + plan.fused
  out_shape += [vma.shape_struct((b, dim), f32, axes)] * n_grads
  out_specs += [hbm] * n_grads
  # The landing slots (outputs used as scratch: every device has them at the same place,
  # which the remote copies need). None on one device. Each stream's slot holds a whole
  # chunk, or in the one-trip plan the stream's part of it.
  n_buf = len(plan.hops)
  rows = [plan.tn * nq for _, nq in plan.parts[:n_buf]] if plan.fused else [b] * n_buf
  slot = lambda r_, tail, dt: vma.shape_struct((2, r_) + tail, dt, axes)
  out_shape += [slot(r_, (dim,), bm.dtype) for r_ in rows]
  out_shape += [slot(r_ // plan.tb, b_ids.shape[1:], jnp.int32) for r_ in rows]
  if plan.fused:
    out_shape += [slot(r_, (dim,), f32) for r_ in rows]
  out_specs += [hbm] * (len(out_shape) - len(out_specs))

  ta, tb, tr = plan.ta, plan.tb, plan.transposed
  id_tile = lambda size, as_rows: (size, 1) if as_rows else (1, size)
  scratch = [
    pltpu.VMEM((2, ta, dim), a.dtype),
    pltpu.VMEM((2, tb, dim), bm.dtype),
    pltpu.VMEM((2,) + id_tile(ta, not tr), jnp.int32),
    pltpu.VMEM((2,) + id_tile(tb, False), jnp.int32),
    pltpu.SemaphoreType.DMA((6, 2)),
    pltpu.SemaphoreType.DMA((max(n_buf, 1), 2, 2, 2)),
    pltpu.SemaphoreType.REGULAR((max(n_buf, 1),)),
  ]
  if plan.fused:
    scratch += [
      pltpu.VMEM((b, dim), f32),
      pltpu.VMEM((2, plan.tn, dim), f32),
      pltpu.VMEM((plan.tn, dim), f32),
      pltpu.SemaphoreType.DMA((3,)),
      pltpu.SemaphoreType.DMA((max(n_buf, 1), 3)),
      pltpu.SMEM((2,), jnp.int32),
    ]
    vmem = fused_vmem_bytes(b, plan.tm, plan.tn, dim, a.dtype.itemsize)
  else:
    if plan.grad:
      scratch.append(pltpu.VMEM((2, ta, dim), f32))
    vmem = _vmem_bytes(plan.tm, plan.tn, dim, a.dtype.itemsize, plan.grad)
  if plan.logits_buffer:
    scratch.append(pltpu.VMEM((2, plan.strip, plan.tn), f32))
  vmem_limit = mc.vmem_limit(vmem, _chip()[1])
  if interpret is True:
    interpret = pltpu.InterpretParams()
  outs = pl.pallas_call(
    functools.partial(_ring_kernel, plan, axis_name),
    out_shape=out_shape,
    in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM)] * 4 + [hbm] * 4,
    out_specs=out_specs,
    scratch_shapes=scratch,
    compiler_params=pltpu.CompilerParams(
      collective_id=_COLLECTIVE_ID if n_buf else None, vmem_limit_bytes=vmem_limit
    ),
    cost_estimate=_cost(plan),
    interpret=interpret or False,
    name=name,
  )(params, me, a_rng, b_rng, a, a_ids, bm, b_ids)
  outs = list(outs)
  sums = outs.pop(0) if plan.stats else None
  da = outs.pop(0) if plan.grad else None
  db = outs.pop(0) if plan.fused else None
  return sums, da, db


def _tile_ranges(ids, b_valid, size, axis_name):
  """``mosaic_common.tile_id_ranges`` of the local chunk, (2, b / size), and of every device's
  chunk, (2 n_dev, b / size) (rows 2 k and 2 k + 1: device k)."""
  local = mc.tile_id_ranges(ids, size, b_valid)
  if axis_name is None:
    return local, local
  return local, lax.all_gather(local, axis_name).reshape(-1, local.shape[1])


def _trip(x, y, x_ids, y_ids, log_t, bias, axis_name, schedule, interpret, block_sizes, with_grads):
  """This device's loss sum and, if asked for, its float32 (dx, dy, dlog_t, dbias): dx, dy
  the gradients of the global loss sum w.r.t. the local chunks, dlog_t and dbias this
  device's partial sums (not summed over the ring)."""
  n_dev = 1 if axis_name is None else lax.axis_size(axis_name)
  b_valid, dim = x.shape
  sub = mc.sublanes(x.dtype)
  tm, tn, b = _fit_tiles(b_valid, block_sizes, sub, _lanes(_chip()[0]))
  if b != b_valid:  # Zero rows, masked out in the kernel; their ids never matter.
    pad = lambda a: jnp.pad(a, [(0, b - b_valid)] + [(0, 0)] * (a.ndim - 1))
    x, y, x_ids, y_ids = map(pad, (x, y, x_ids, y_ids))
  t, params = mc.kernel_scalars(log_t, bias)
  # Per tile id ranges (a few int32 per tile, gathered over the ring before the kernel): the
  # kernel runs its lean tile body where an A tile's and a B tile's ranges cannot meet.
  x_rng, x_rng_all = _tile_ranges(x_ids, b_valid, tm, axis_name)
  y_rng, y_rng_all = _tile_ranges(y_ids, b_valid, tn, axis_name)
  # Image ids as rows of a logits tile, text ids as its columns; ids that travel (the image
  # ids in the transposed trip) lane-dense, as the text ids.
  xid = x_ids.reshape(b, 1)
  xid_t = x_ids.reshape(b // tm, 1, tm)
  yid = y_ids.reshape(b // tn, 1, tn)
  me = jnp.zeros((1,), jnp.int32)
  if axis_name is not None:
    me = lax.axis_index(axis_name).astype(jnp.int32).reshape(1)
    # Under shard_map with check_vma the kernel's operands must all vary over the axis.
    params, me, xid, xid_t, yid, x_rng, x_rng_all, y_rng, y_rng_all = (
      vma.pvary(a, {axis_name})
      for a in (params, me, xid, xid_t, yid, x_rng, x_rng_all, y_rng, y_rng_all)
    )
  hops = _ring_hops(n_dev, schedule)
  strip = tpu._strip(tm, block_sizes.strip_rows)
  plan = functools.partial(_Plan, n_dev, b, b_valid, dim, tm, tn, x.dtype, hops=hops, strip=strip)
  call = functools.partial(
    _ring_call, params=params, me=me, axis_name=axis_name, interpret=interpret
  )
  # The first trip owns x while the text chunks travel.
  text_travels = dict(a_rng=x_rng, b_rng=y_rng_all, a=x, a_ids=xid, bm=y, b_ids=yid)
  if not with_grads:
    sums, _, _ = call(
      plan(stats=1, grad=False, transposed=False), **text_travels, name="siglip_ring_fwd"
    )
    return jnp.sum(sums[0]) * mc.LN_2
  if _fuses(block_sizes, b, tm, tn, dim, x.dtype.itemsize):
    # One trip: each block once, dY travelling with the text chunks.
    fused_hops, parts = _fused_streams(n_dev, schedule, b // tn)
    sums, dx, dy = call(
      plan(stats=3, grad=True, transposed=False, fused=True, parts=parts, hops=fused_hops),
      **text_travels,
      name="siglip_ring_fwd_bwd",
    )
  else:
    sums, dx, _ = call(
      plan(stats=3, grad=True, transposed=False), **text_travels, name="siglip_ring_fwd_bwd_dx"
    )
    # The transposed block: y owned, x travelling with its ids; the same logits tiles.
    _, dy, _ = call(
      plan(stats=0, grad=True, transposed=True),
      a_rng=y_rng,
      b_rng=x_rng_all,
      a=y,
      a_ids=yid,
      bm=x,
      b_ids=xid_t,
      name="siglip_ring_fwd_bwd_dy",
    )
  # The kernel sums softplus / ln 2 and G * s, and its gradients are G @ Y and G^T @ X:
  # d logits / dx = t y, and d/dlog_t of t s is t s. t is applied here, once per element of
  # the (b, D) gradients rather than once per logit in the tile math (the ring kernels on
  # v6e, whose vector units bind, then take one vector op fewer per logit).
  return jnp.sum(sums[0]) * mc.LN_2, (
    t * dx[:b_valid],
    t * dy[:b_valid],
    t * jnp.sum(sums[1]),
    jnp.sum(sums[2]),
  )


def _checked_trip(
  x, y, x_ids, y_ids, log_t, bias, with_grads, *, axis_name, schedule, interpret, block_sizes
):
  (x_ids, y_ids, log_t, bias), block_sizes = _check_inputs(
    x, y, x_ids, y_ids, log_t, bias, block_sizes, with_grads
  )
  return _trip(
    x, y, x_ids, y_ids, log_t, bias, axis_name, schedule, interpret, block_sizes, with_grads
  )


# Megacore chips (two TensorCores per jax device): the smallest local batch at which the
# public API runs the block kernels under the shared driver (runs_by_default).
_MEGACORE = {"v4": 2048, "v5p": 1664}


def runs_by_default(target, batch: int) -> bool:
  """Whether ``sigmoid_loss(..., implementation="pallas_tpu", axis_name=...)`` without
  ``block_sizes`` runs this kernel for ``target`` (a ``siglip_fast.target.Target``) at local
  batch ``batch``, rather than the block kernels of ``siglip_fast.kernels.tpu`` under the
  shared ring driver.

  Everywhere but on megacore chips: v5p from b = 1664, v4 from 2048. This kernel has no
  grid for Mosaic to split, so there one TensorCore computes while the other idles; a block
  kernel call splits its block over both, and XLA overlaps the driver's permutes with the
  calls. Below some b the driver's wire and its calls' fixed costs outweigh the second core.
  ``benchmarks/crossover.py`` compiled the public API's value-and-grad both ways on 8 chips
  (bf16, D = 768 and 1152) and modelled each step from the static profile, the ICI links
  and HBM (docs/PERFORMANCE.md section 5): driver over ring kernel on v5p 1.36-1.37 at
  b = 1024, 1.01-1.04 at 1536, 0.84-0.95 at 1664, 0.89-0.95 at 1792, 0.83-0.84 at 2048
  (since a row tile that meets one column tile writes its dX once: the driver's calls
  there); on v4 1.05-1.44 at 1024, 1.13-1.51 at 1536, 0.93 (D = 1152) but 1.26 (D = 768)
  at 1792, 0.72-0.79 at 2048. Since ln1p_sum's product took G's 1 + e, the closest b
  re-run: v5p at 1536 0.95 / 1.08 (D = 768 / 1152), v4 at 1792 1.32 / 0.93; with the
  profiler's lean tile body (the ring kernel's trip at D = 1152 12% longer) v5p at 1536 0.95 /
  0.97; since the ring kernel applies t after its trips, 0.90 / 1.11 (its lean bodies +5.7% /
  -13%, the second below its MXU-ideal: at the MXUs' peak both trips are as before, about
  0.91 / 0.97). Where the two are level (within the 5% that op order alone moves these
  schedules), or between the b modelled, the ring kernel keeps it: it holds less memory
  (v5p, b = 1536, D = 1152: 34 against 43 MiB of temporaries)."""
  threshold = _MEGACORE.get(tpu.tpu_generation(target))
  return threshold is None or batch < threshold


def ring_trip(
  *, axis_name, schedule="bidirectional", interpret=False, block_sizes: BlockSizes | None = None
):
  """This kernel as a trip for ``siglip_fast.ring.global_mean``: per device, the
  loss sum and d(global sum)/d(local inputs); the psum and 1/B stay outside its VJP."""
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  return functools.partial(
    _checked_trip,
    axis_name=axis_name,
    schedule=schedule,
    interpret=interpret,
    block_sizes=block_sizes,
  )


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
  interpret=False,
  block_sizes: BlockSizes | None = None,
):
  """Mean SigLIP loss over the ring on ``axis_name`` (one device when None), in one kernel.

  x, y: this device's (b, D) image and text chunks (float32 or bfloat16). x_ids, y_ids:
  their (b,) int32 pair ids, compared across devices. log_t, bias: float32 scalars,
  replicated. interpret: False, True or a ``pltpu.InterpretParams`` (TPU interpret mode).
  Returns the float32 global mean loss, replicated; differentiable w.r.t. x, y, log_t, bias.
  """
  trip = ring_trip(
    axis_name=axis_name, schedule=schedule, interpret=interpret, block_sizes=block_sizes
  )
  return global_mean(trip, x, y, x_ids, y_ids, log_t, bias, axis_name)

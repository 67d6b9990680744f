"""Pallas Mosaic TPU kernels for the SigLIP block loss sum, forward and backward.

One kernel body serves every pass. It owns a tile of rows of ``a`` and streams tiles of rows
of ``b`` (the grid's last, sequential axis); for each (a tile, b tile) pair it computes the
logits tile ``t * a @ b.T + bias`` on the MXU in float32, the stable softplus / sigmoid on the
VPU and EUP, and folds what it needs into output blocks that stay resident in VMEM while the
``b`` axis runs. No logits tile ever leaves VMEM.

Passes (FLOPs for an n x m block with feature dim D):
  forward      a = x, b = y: loss partial sums                                 2 n m D
  fused        a = x, b = y: loss, dX, sum G*S, sum G, and dY = t G^T X       6 n m D
               accumulated in float32, resident in VMEM, a super-block of y at a time
  two-kernel   dX pass (a = x, b = y): loss, dX = t G Y, sum G*S, sum G       4 n m D
               dY pass (a = y, b = x): the tile recomputed, transposed         4 n m D
The forward pass pays for no gradient work. Value-and-grad is the fused 6 n m D kernel by
default (``BlockSizes.fuse_dy``), the two-kernel 8 n m D design where asked or where the
fused one's super-blocks would be too short to stay compute bound.

Why dY is the hard part: a Pallas TPU output block survives only *consecutive* grid steps, and
with row tiles outermost dX_i is consecutive but dY_j is revisited once per row tile. The fused
kernel therefore keeps dY in VMEM in float32, for a super-block of y's rows at a time: y is
split into ``splits`` super-blocks, each of which runs every row tile of x against its own
columns, keeps its (m / splits, D) dY resident and writes it once. Successive super-blocks are
successive kernel calls, chained through a float32 dX updated in place (input and output
alias): each call starts every row tile's accumulator from the previous call's partial, so
the sum costs no extra pass over HBM, only that partial's read and write inside a
compute-bound pipeline; the last call writes dX in x's dtype. On megacore chips (v4, v5p) each call has a leading parallel axis of 2: each
TensorCore takes half of the call's columns, with its own half of dY and its own partial dX
(the two summed afterwards). All of dY is m * D * 4 bytes (72 MiB at m = 16384, D = 1152), so
one call serves v5e up to there (v6e's larger tiles leave less room) and a ring step's block
almost anywhere; more split the rest. The alternatives were a read-modify-write of dY tiles in HBM at every grid step
(``RevisitMode.ANY`` single-buffers it, serialising that DMA with the compute) or a
hand-written DMA pipeline; the two-kernel design (``fuse_dy=False``, or where super-blocks
would be so short that a call's x and partial-dX traffic would make it HBM bound) recomputes
the tile instead, 2 n m D FLOPs more.

Positives are pairs with equal ids (docs/DESIGN.md section 1), so the same kernel serves the
diagonal block, any ring step, duplicate pairs, and padding (padded rows and columns are masked
by position, whatever their ids). Most tiles hold neither a positive nor padding: the kernel
gets each tile's id range (SMEM) and runs a lean body, without the id compare and the mask,
wherever a row tile's and a column tile's ranges cannot share an id and neither is padded.

Numerics, all in float32 (``mosaic_common``, shared with the ring kernel): the logits are
computed in base-2 units (t and the bias pre-scaled by log2(e)), so that exp is the EUP's
exp2; the softplus's ln(1 + e) is summed as the log of a product, one logarithm per 32 row
groups of a column (``mosaic_common.ln1p_sum``), which also keeps confident negatives at full
relative accuracy without a log1p; the loss sum is scaled by ln 2 once, outside.
bf16 inputs stay bf16 on the MXU (the gradient matmul takes G rounded to bf16, as flash
attention does with P); float32 inputs use precision=HIGHEST, because the TPU's default f32
matmul goes through bf16 passes.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from siglip_fast import target as target_lib
from siglip_fast.kernels import mosaic_common as mc
from siglip_fast import validate
from siglip_fast import ring as ring_lib
from siglip_fast import vma

_LANES, _SUBLANES, _MiB = mc.LANES, mc.SUBLANES, mc.MiB

VMEM_CAPACITY = mc.VMEM_CAPACITY

# Candidate (block_rows, block_cols) per generation, best first; the default is the first whose
# modelled VMEM (``vmem_bytes``, calibrated against Mosaic by benchmarks/tpu_compile.py) fits
# in ``mc.VMEM_BUDGET`` of the chip. The owned tile (rows) sets the arithmetic intensity: the
# forward pass reads a (cols, D) tile per 2 * rows * cols * D FLOPs, i.e. `rows` FLOP per byte
# of bf16, against a ridge (peak / HBM bandwidth) of about 220 (v4), 240 (v5e), 190 (v5p) and
# 560 (v6e) FLOP/byte; the value-and-grad kernels do twice the FLOPs per byte. On v6e the
# vector work per pair decides, so wider column tiles (fewer, longer elementwise passes per
# row tile) come first: per pair, 1024 x 1024 takes 6% fewer forward bundles than 1024 x 512,
# and 1024 x 2048 3-6% fewer than 1024 x 1024, in the steady step of the static profile
# (docs/PERFORMANCE.md section 5). Wider tiles put more pairs in the tiles that hold the
# diagonal (the full tile body), so the gain shows at large B.
#
# v5e and v5p from 1024 x 1024: per pair, in the static profile's steady step (bf16, B = 4096
# and 16384), the forward takes 4-10% fewer cycles than with 512 x 512 (MXU-issue floor
# 1.11-1.17x -> 1.02-1.04x) and the two value-and-grad kernels 3-8% fewer (v5e D = 768 /
# 1152: -3% / -8%; v5p: -4% / -7%): a larger tile reloads the MXU's weights less often. A
# third number caps the feature dim a value-and-grad candidate serves: v5p's 64 MiB no
# longer holds 1024 x 1024 for both kernels at D = 1536, and what fits there lost to
# 512 x 512 (fused +6.3%, two kernels at 512 x 1024 +0.7%; B = 4096).
_CANDIDATE_TILES = {
  "v4": ((512, 256), (256, 256), (256, 128), (128, 128)),
  "v5e": ((1024, 1024), (512, 1024), (512, 512), (512, 256), (256, 256), (128, 128)),
  "v5p": ((1024, 1024, 1152), (512, 1024, 1152), (512, 512), (512, 256), (256, 256), (128, 128)),
  "v6e": ((1024, 2048), (1024, 1024), (1024, 512), (512, 512), (512, 256), (256, 256), (128, 128)),
}
# The fused value-and-grad's candidates. On v6e from 1024 x 1024, since 1024 x 2048, which
# pays for the forward's vector work, spills more under three matmuls a tile and needs more
# super-blocks (static profile, B = 16384: 1024 x 1024 3-6% ahead at D = 768 and 1152; 1.5%
# behind at B = 4096, D = 768). On v5e from 512 x 512: 1024 x 1024 takes more steady cycles
# at every D profiled but 768 (B = 4096: D = 512 +3.7%, 768 -6.5%, 1024 +3.0%, 1152 +1.1%,
# 1536 +10.2%; at 16k and D = 1152 it needs a second super-block). v5p gains 2-4% from its
# list up to D = 1152.
_FUSED_TILES = dict(
  _CANDIDATE_TILES, v5e=_CANDIDATE_TILES["v5e"][2:], v6e=_CANDIDATE_TILES["v6e"][1:]
)
# The forward kernel alone (the loss without gradients) holds no gradient blocks, so on v4
# its candidates start larger: per pair, in the static profile's steady step with the tiles
# that hold the diagonal on the full body (B = 4096, bf16), 512 x 1024 takes 13% (D = 768)
# and 17% (D = 1152) fewer cycles than 512 x 256; on v5p its tiles serve every D (the cap is
# the gradient kernels').
_FORWARD_TILES = dict(
  _CANDIDATE_TILES,
  v4=((512, 1024), (512, 512)) + _CANDIDATE_TILES["v4"],
  v5p=tuple(c[:2] for c in _CANDIDATE_TILES["v5p"]),
)

# The row strips of the kernels whose tile makes the loss (the forward, the fused and dX
# kernels; ``BlockSizes.strip_rows``, ``mc.in_row_strips``). v6e's vector work per pair is
# close to its MXU work, and whole-tile bodies ran the two in separate phases: in 256-row
# strips (its MXU's width) the steady step is shorter by 8.6% / 3.5% for the forward, 4.2% /
# 3.8% for the fused kernel and 3.3% / 5.3% for the dX kernel (static profile, B = 4096,
# bf16, D = 768 / 1152); 128-row strips lose (forward +57% / +54%, fused +11% / +8%), and so
# does v6e's dY kernel (+0.5%). v4, v5e and v5p are MXU bound with room on the VPU:
# 256-row strips cost their fused kernels 4.5-6.5% at D = 768 (nothing at 1152) and their
# forwards up to 5.4%.
_STRIP_ROWS = {"v6e": 256}

# TensorCores per jax device (megacore): they split the fused kernel's super-blocks.
TENSORCORES = {"v4": 2, "v5p": 2}
# Peak bf16 FLOP/s over HBM bytes/s (the ridges quoted above): the fused kernel is split into
# more calls only while each call stays compute bound with the traffic a split adds (per row
# tile, x's tile read, y's columns streamed again and the float32 partial dX read and
# written).
_HBM_RIDGE = {"v4": 220, "v5e": 240, "v5p": 190, "v6e": 560}
# The share of that peak the fused kernel reaches: 1 / its steady step's distance from the
# MXU floor, the best measured (static profile, bf16, D = 768 and 1152; docs/PERFORMANCE.md
# section 5). A call is compute bound when its HBM time stays under its compute time at the
# rate it runs, not at the peak: v4's fused calls at D = 1152 (219 FLOP per byte against a
# ridge of 220) take 1.3x longer to compute than to move their bytes (alone; in the megacore
# ring driver, with the driver's own traffic, about as long).
# (v6e: 1.14 since its row strips, was 1.24; all four since ln1p_sum's product took G's
# 1 + e, were 1.45, 1.07, 1.06, 1.14. Neither moved a plan: B = 1k-64k in steps of 64,
# D = 256-2048, bf16 and float32, every chip. v6e 1.09 since the strips' logits went
# through VMEM, was 1.12: of 30270 such cases two float32 ones, D = 1408 at B = 4544 and
# 4608, now take two kernels rather than three fused super-blocks.)
_FUSED_RATE = {"v4": 1 / 1.41, "v5e": 1 / 1.03, "v5p": 1 / 1.02, "v6e": 1 / 1.09}
# Interpret mode (CPU) runs one Python-level step per grid point: fewer, larger tiles.
_INTERPRET_TILES = (256, 256)

_DEVICE_KINDS = {
  "TPU v4": "v4",
  "TPU v5 lite": "v5e",
  "TPU v5e": "v5e",
  "TPU v5": "v5p",
  "TPU v5p": "v5p",
  "TPU v6 lite": "v6e",
  "TPU v6e": "v6e",
}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the kernels. They change speed and VMEM use, not the result.

  block_rows, block_cols: rows of x owned per grid step, rows of y streamed, in the forward
    and dX kernels. block_rows_dy, block_cols_dy: rows of y owned and rows of x streamed in
    the dY kernel (default: the same two numbers). All multiples of 128; inputs smaller than a
    tile shrink it (to a multiple of 128).
  generation: the TPU generation the tiles were chosen for ("v4", "v5e", "v5p", "v6e"), which
    caps the VMEM limit at its VMEM; None leaves the cap to the compiler.
  vmem_limit_bytes: overrides the VMEM limit the kernels compile with (default: the modelled
    use, ``vmem_bytes``, plus headroom).
  fuse_dy: value-and-grad in one kernel (6 n m D FLOPs) that keeps a float32 dY resident in
    VMEM, for one super-block of y's rows at a time, rather than two kernels (8 n m D).
    None: fuse when ``generation`` is set and its VMEM holds the resident dY of super-blocks
    long enough to keep each call compute bound (``dy_splits``).
  dy_splits: the fused kernel's super-blocks of y's rows, one resident at a time (a kernel
    call each, or a pair per call on v4/v5p, one per TensorCore; at most one per column
    tile). None: the fewest whose resident dY fits the VMEM budget, a multiple of the
    TensorCores so that both have work; 1 where no generation is known.
  strip_rows: the tile body of the kernels that make the loss (the forward, the fused and
    dX kernels) in row strips of this many rows (a multiple of 128 that divides the row
    tile; otherwise, and for None, the whole tile), each strip's logits matmul and gradient
    matmuls beside its neighbours' elementwise work. The generations' defaults: 256 on v6e,
    None elsewhere (``_STRIP_ROWS``).
  """

  block_rows: int = 512
  block_cols: int = 512
  block_rows_dy: int | None = None
  block_cols_dy: int | None = None
  generation: str | None = None
  vmem_limit_bytes: int | None = None
  fuse_dy: bool | None = None
  dy_splits: int | None = None
  strip_rows: int | None = None

  def __post_init__(self):
    for name in ("block_rows", "block_cols", "block_rows_dy", "block_cols_dy", "strip_rows"):
      v = getattr(self, name)
      if v is None and (name.endswith("_dy") or name == "strip_rows"):
        continue
      if not isinstance(v, int) or v <= 0 or v % _LANES:
        raise ValueError(f"BlockSizes.{name} must be a positive multiple of {_LANES}, got {v!r}")
    if self.dy_splits is not None and (
      not isinstance(self.dy_splits, int) or isinstance(self.dy_splits, bool) or self.dy_splits < 1
    ):
      raise ValueError(
        f"BlockSizes.dy_splits must be a positive int or None, got {self.dy_splits!r}"
      )
    if self.generation is not None and self.generation not in VMEM_CAPACITY:
      raise ValueError(
        f"BlockSizes.generation must be one of {tuple(VMEM_CAPACITY)} or None, "
        f"got {self.generation!r}"
      )

  @property
  def dy_tiles(self) -> tuple[int, int]:
    return (self.block_rows_dy or self.block_rows, self.block_cols_dy or self.block_cols)

  @classmethod
  def for_generation(cls, generation: str, dim: int = 1536, dtype=jnp.bfloat16) -> "BlockSizes":
    """The largest candidate tiles of a TPU generation ("v4", "v5e", "v5p", "v6e") whose
    kernels fit its VMEM for feature dim ``dim`` and input ``dtype``."""
    return _first_fit(_CANDIDATE_TILES, generation, dim, dtype, with_grad=(False, True))


def _tiles(candidates, generation: str, dim: int) -> list[tuple[int, int]]:
  """``candidates[generation]``'s (rows, cols) that serve feature dim ``dim``."""
  return [c[:2] for c in candidates[generation] if len(c) == 2 or dim <= c[2]]


def _first_fit(candidates, generation, dim, dtype, *, with_grad) -> BlockSizes:
  """The first of ``candidates[generation]`` whose kernels (with and / or without a
  gradient, ``with_grad``) fit the VMEM budget of ``generation`` at (dim, dtype)."""
  if generation not in candidates:
    raise ValueError(f"generation must be one of {tuple(candidates)}, got {generation!r}")
  budget = mc.VMEM_BUDGET * VMEM_CAPACITY[generation]
  for rows, cols in _tiles(candidates, generation, dim):
    need = max(vmem_bytes(rows, cols, dim, dtype, with_grad=g, n_stats=3) for g in with_grad)
    if need <= budget:
      return BlockSizes(rows, cols, generation=generation, strip_rows=_STRIP_ROWS.get(generation))
  raise ValueError(
    f"no tiles fit a {generation} TensorCore's VMEM at dim={dim} "
    f"({jnp.dtype(dtype).name}); pass BlockSizes explicitly"
  )


def tpu_generation(device_or_target=None) -> str | None:
  """ "v4", "v5e", "v5p" or "v6e" for a TPU device or a ``siglip_fast.target.Target``
  (default: the devices jax would run on), else None."""
  d = device_or_target if device_or_target is not None else target_lib.target_of()
  if d.platform != "tpu":
    return None
  return _DEVICE_KINDS.get(d.device_kind)


def default_block_sizes(
  generation: str | None = None, *, dim: int = 1536, dtype=jnp.bfloat16, interpret: bool = False
) -> BlockSizes:
  """Tiles for ``generation`` at (dim, dtype). No generation (interpret mode, a TPU without
  tuned tiles) gives small tiles and no VMEM cap."""
  if generation is None:
    return BlockSizes(*(_INTERPRET_TILES if interpret else (256, 256)))
  return BlockSizes.for_generation(generation, dim, dtype)


def forward_block_sizes(
  generation: str | None, *, dim: int = 1536, dtype=jnp.bfloat16, interpret: bool = False
) -> BlockSizes:
  """Default tiles of the forward kernel (``loss_sum``): the first of its candidates
  (``_FORWARD_TILES``) whose forward alone fits the VMEM budget of ``generation``."""
  if generation is None:
    return default_block_sizes(None, interpret=interpret)
  return _first_fit(_FORWARD_TILES, generation, dim, dtype, with_grad=(False,))


# ------------------------------------------------------------------------------------------
# VMEM accounting and cost estimates


def vmem_bytes(
  rows: int,
  cols: int,
  dim: int,
  dtype,
  *,
  with_grad: bool,
  n_stats: int = 1,
  resident_rows: int = 0,
  chained: bool = False,
) -> int:
  """Modelled VMEM of one kernel: double-buffered blocks plus float32 tile temporaries.

  rows, cols: the owned and streamed tile heights; dim: the feature dimension (padded to
  lanes, as VMEM stores it). ``with_grad``: the kernel accumulates a (rows, dim) float32
  gradient; ``resident_rows``: rows of the float32 dY the fused kernel keeps resident (one
  buffer), plus G's transpose for it; ``chained``: the gradient comes out as float32
  partials, or continues from a previous call's (copied in by DMA, one buffer). The
  temporaries (logits, exp, softplus or sigmoid, G and its cast) are what Mosaic keeps live
  for the elementwise chain; they are counted for a whole tile, which also covers a tile in
  row strips (a strip's temporaries and the gradient kernels' two strips of logits).
  A model, conservative against the compiler's own figures (benchmarks/tpu_compile.py
  records both; for v6e's 1024 x 1024 tiles by about 25 MiB).
  """
  isz = jnp.dtype(dtype).itemsize
  d = mc.round_up(dim, _LANES)
  blocks = 2 * (rows + cols) * d * isz  # owned and streamed embedding tiles
  blocks += 2 * rows * _LANES * 4 + 2 * _SUBLANES * cols * 4  # (rows, 1) and (1, cols) ids
  blocks += 2 * n_stats * _SUBLANES * _LANES * 4  # partial-sum outputs
  if with_grad:
    blocks += 2 * rows * d * isz  # gradient output block
    blocks += rows * d * 4 if isz != 4 else 0  # its float32 accumulator
  # The forward keeps under one f32 tile live beyond its blocks (Mosaic, bf16, D = 768-1536:
  # v4 512 x 1024 1.3-2.0 MiB of a 2 MiB tile, v5e 1024 x 1024 1.4-2.8 MiB of 4 MiB); two
  # leave headroom.
  temps = (6 if with_grad else 2) * rows * cols * 4
  if resident_rows:
    blocks += resident_rows * d * 4
    temps += rows * cols * 4
  if chained:  # the gradient block in float32, its accumulator, the previous partial's copy
    blocks += 2 * rows * d * (4 - isz) + (rows * d * 4 if isz == 4 else 0) + rows * d * 4
  if isz == 4:
    # precision=HIGHEST splits float32 operands into bf16 parts: more temporaries. Fitted
    # (conservatively) to Mosaic's figures for D = 768 and 1536.
    temps += (3.5 if with_grad else 2.5) * (rows + cols) * d * 4
  return int(blocks + temps)


def _vmem_limit(est: int, generation: str | None, override: int | None) -> int:
  if override is not None:
    return override
  if generation is None:
    return mc.vmem_limit(est)
  cap = VMEM_CAPACITY[generation]
  if est > cap:
    raise ValueError(
      f"the kernel tiles need about {est / _MiB:.1f} MiB of VMEM but a "
      f"{generation} TensorCore has {cap / _MiB:.0f} MiB; use smaller BlockSizes"
    )
  return mc.vmem_limit(est, cap)


# ------------------------------------------------------------------------------------------
# The kernel


def _fold(v, rows, cols):
  """Sum a (rows, cols) float32 tile down to one (8, 128) vreg, with VPU adds only."""
  v = v.reshape(rows // _SUBLANES, _SUBLANES, cols).sum(axis=0)
  out = v[:, :_LANES]
  for k in range(1, cols // _LANES):
    out = out + v[:, k * _LANES : (k + 1) * _LANES]
  return out


def _tile_kernel(
  scal_ref,
  a_rng_ref,
  b_rng_ref,
  a_ids_ref,
  b_ids_ref,
  a_ref,
  b_ref,
  *refs,
  rows,
  cols,
  n_a,
  n_b,
  na_pad,
  nb_pad,
  with_loss,
  with_scalar_grads,
  with_grad,
  with_db,
  with_da_in,
  with_db_in,
  da_partial,
  one_col,
  col_start,
  precision,
  strip,
):
  """One grid step: (a tile i, b tile j), or with a resident gradient of b (core c, a tile
  i, b tile j), where core c takes the c-th share of this call's b tiles, from b tile
  ``col_start`` on.

  refs: with_da_in, the float32 partial gradients of a that the previous call left, in HBM
  (cores, rows of a, D) (this row tile's is copied in while the row's tiles are computed,
  and added at its end); with_db_in, the whole float32 gradient of b so far
  in HBM (this call's share of it is where core c's resident gradient starts); then the
  outputs, as requested: stats (1, k, 8, 128)
  holding [loss] + [sum G*S, sum G]; the gradient of a: a (rows, D) block in a's dtype, or
  with da_partial core c's float32 (1, rows, D) partial, without the factor t; with_db, core
  c's share of this call's float32 gradient of b (without t), resident for the call. Then a
  float32 (rows, D) accumulator for a's gradient where its block is a partial or not float32
  (otherwise the block accumulates in place); with_da_in, a float32 (rows, D) buffer for
  its copy; where a tile in strips makes a gradient, a float32 (2, strip, cols) buffer for
  its strips' logits (``logits_terms``); a DMA semaphore for each of da_in, db_in.

  ``one_col``: each row tile meets a single column tile (a driver's half chunk on two
  TensorCores, say). Then a's gradient is written once, straight from the tile's matmul
  (plus the previous partial, a pipelined block here): no accumulator to zero, fill and copy
  out, passes over a (rows, D) float32 tile that otherwise fall in every step.

  ``strip``: the tile body's row strip (``tile_body``); ``rows`` for none.
  """
  if with_db:
    c, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    col_tile = col_start + c * pl.num_programs(2) + j
  else:
    i, j = pl.program_id(0), pl.program_id(1)
    col_tile = j
  last_j = pl.num_programs(2 if with_db else 1) - 1
  refs = list(refs)
  da_in_ref = refs.pop(0) if with_da_in else None
  db_in_ref = refs.pop(0) if with_db_in else None
  db_sem = refs.pop() if with_db_in else None
  da_sem = refs.pop() if with_da_in and not one_col else None
  stats_ref = refs.pop(0) if (with_loss or with_scalar_grads) else None
  da_ref = refs.pop(0) if with_grad else None
  db_ref = refs.pop(0) if with_db else None
  logits_buf = refs.pop() if strip < rows and with_grad else None
  da_in_buf = refs.pop() if with_da_in and not one_col else None
  acc_ref = (refs.pop(0) if refs else da_ref) if with_grad and not one_col else None

  def da_in_copy():
    start = pl.multiple_of(i * rows, rows)
    src = da_in_ref.at[c if with_db else 0, pl.ds(start, rows)]
    return pltpu.make_async_copy(src, da_in_buf, da_sem)

  def _write_da(acc, rs=pl.ds(0, rows)):
    if da_partial:  # the next call, or the sum over TensorCores, applies t
      da_ref[0, rs, :] = acc
    else:
      # d logits / d a = t * b: apply t once per row tile rather than per tile element.
      da_ref[rs, :] = (scal_ref[2] * acc).astype(da_ref.dtype)

  # Interpret mode fills fresh buffers with NaN; a TPU leaves garbage: zero accumulators.
  @pl.when(j == 0)
  def _init():
    if stats_ref is not None:
      stats_ref[...] = jnp.zeros_like(stats_ref)
    if da_in_buf is not None:
      # Read by the row's last step only: a DMA into one buffer rather than a pipelined,
      # double-buffered block, and waited for outside the tile body (a wait inside it costs
      # the v5p fused kernel 6% more bundles a step: the body splits around the branch).
      da_in_copy().start()
    if acc_ref is not None:
      acc_ref[...] = jnp.zeros_like(acc_ref)

  if db_ref is not None:

    @pl.when((i == 0) & (j == 0))
    def _init_db():
      if db_in_ref is None:
        db_ref[...] = jnp.zeros_like(db_ref)
        return
      share = db_ref.shape[0]
      start = pl.multiple_of((col_start + c * pl.num_programs(2)) * cols, cols)
      copy = pltpu.make_async_copy(db_in_ref.at[pl.ds(start, share)], db_ref, db_sem)
      copy.start()
      copy.wait()

  def tile_body(full: bool):
    """Accumulate this tile. ``full``: it may hold positives or padding, so it pays for the
    id compare and the mask; most tiles hold neither and run the lean body. In row strips
    of ``strip`` rows (``mc.in_row_strips``)."""
    b = None

    def logits_terms(k):
      nonlocal b
      # Loaded here, not before the branch: a tile read ahead of it would be held in vector
      # registers across the branch and spilled.
      rs = pl.ds(k * strip, strip)
      a = a_ref[rs, :]
      valid_rows = None
      if full and na_pad != n_a:
        iota = lax.broadcasted_iota(jnp.int32, (strip, 1), 0)
        valid_rows = i * rows + k * strip + iota < n_a
      b = b_ref[...] if b is None else b
      s = lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
      )
      if logits_buf is not None:
        s = mc.through_vmem(logits_buf.at[k % 2], s)
      v = scal_ref[0] * s + scal_ref[1]  # the logits times log2(e)
      pos = valid = None
      if full:
        pos = a_ids_ref[rs, :] == b_ids_ref[...]  # (strip, 1) == (1, cols)
        valid = valid_rows
        if nb_pad != n_b:
          col_ok = col_tile * cols + lax.broadcasted_iota(jnp.int32, (1, cols), 1) < n_b
          valid = col_ok if valid is None else valid & col_ok
      loss, g = mc.tile_terms(
        v,
        scal_ref[3],
        pos=pos,
        valid=valid,
        with_loss=with_loss,
        with_grad=with_scalar_grads or with_grad,
      )
      return a, s, loss, g

    def gradients_and_sums(k, a, s, loss, g):
      """Strip k's gradient matmuls, then its sums."""
      rs = pl.ds(k * strip, strip)
      if with_grad:
        gc = g.astype(b.dtype)
        # Loaded before the product, and added first: Mosaic scheduled the product with 10%
        # more MXU slots a step as `product + previous` (v5p, D = 1152), and v4's steps grew
        # 3% with the accumulator loaded after it (static profile).
        if one_col:
          prev = None if da_in_ref is None else da_in_ref[0, rs, :]
        else:
          prev = acc_ref[rs, :]
        da = lax.dot_general(
          gc, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
        da = da if prev is None else prev + da
        if one_col:
          _write_da(da, rs)
        else:
          acc_ref[rs, :] = da
        if db_ref is not None:
          # G^T @ a into this b tile's rows of the super-block's resident gradient of b.
          start = pl.multiple_of(j * cols, cols)
          db_ref[pl.ds(start, cols), :] += lax.dot_general(
            gc, a, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
          )
      # The sums after the gradient matmuls, in program order. Where the MXU binds (v5e,
      # v5p) the schedule moves a few percent either way with this order: with the sums
      # first the fused kernel, their default, was 3-6% shorter on v5e but 2-5% longer on
      # v5p; this way neither is more than 1% over the per-element logarithm's (static
      # profile).
      stat = 0
      if with_loss:
        sp, e, one_plus_e = loss
        ln1p = mc.ln1p_sum(e, one_plus_e, scal_ref[3])
        stats_ref[0, stat] += _fold(sp, strip, cols) + mc.LOG2_E * _fold(ln1p, _SUBLANES, cols)
        stat += 1
      if with_scalar_grads:
        stats_ref[0, stat] += _fold(g * s, strip, cols)
        stats_ref[0, stat + 1] += _fold(g, strip, cols)

    mc.in_row_strips(rows // strip, logits_terms, gradients_and_sums)

  # Positives are possible only where the tiles' id ranges (over real rows) overlap; padding
  # in every tile that reaches past the true extent (more than the last one where the
  # columns are split into super-blocks).
  full = (a_rng_ref[0, i] <= b_rng_ref[1, col_tile]) & (b_rng_ref[0, col_tile] <= a_rng_ref[1, i])
  if na_pad != n_a:
    full = full | ((i + 1) * rows > n_a)
  if nb_pad != n_b:
    full = full | ((col_tile + 1) * cols > n_b)
  pl.when(full)(lambda: tile_body(True))
  pl.when(jnp.logical_not(full))(lambda: tile_body(False))

  if with_grad and not one_col:

    @pl.when(j == last_j)
    def _finish():
      acc = acc_ref[...]
      if da_in_buf is not None:
        da_in_copy().wait()
        acc = acc + da_in_buf[...]
      _write_da(acc)


def _tile_pass(
  a,
  b,
  a_ids,
  b_ids,
  scal,
  *,
  rows,
  cols,
  with_loss,
  with_scalar_grads,
  with_grad,
  generation,
  vmem_limit_bytes,
  interpret,
  name,
  with_db=False,
  cores=1,
  col_tiles=None,
  da_in=None,
  db_in=None,
  partial_out=False,
  strip_rows=None,
):
  """Run the kernel over all (a tile, b tile) pairs of already padded inputs.

  n_a, n_b (the unpadded row counts) are the ids' lengths. ``with_db`` (needs with_grad):
  also accumulate G^T @ a, over b's tiles ``col_tiles`` = (first, count) (default: all),
  into a float32 array resident in VMEM, in ``cores`` shares (one per TensorCore; the
  leading, parallel grid axis), each with its own float32 partial gradient of a. ``da_in``:
  the previous call's partials, (cores, rows of a, D) float32, to continue from; ``db_in``:
  a float32 gradient of all of b's (padded) rows to continue from (this call reads its
  columns' rows); ``partial_out``: return a's gradient as partials even from a last call
  (without with_db: one, (1, rows of a, D), which ``da_in`` may then continue from).
  ``strip_rows``: ``BlockSizes.strip_rows``.

  Returns (stats, da, db): the (k,) float32 sums (or None); the padded (rows of a, D)
  gradient t * G @ b in a's dtype, or with partial_out, or with_db unless this is the one
  last call on one TensorCore (cores == 1 and col_tiles reaching b's end), the (cores, rows
  of a, D) float32 partials of G @ b, without t (or None); the float32 G^T @ a of the
  call's columns (or None).
  """
  n_a, n_b = a_ids.shape[0], b_ids.shape[0]
  na_pad, nb_pad = a.shape[0], b.shape[0]
  dim = a.shape[1]
  n_row_tiles, n_col_tiles = na_pad // rows, nb_pad // cols
  col_start, col_count = col_tiles or (0, n_col_tiles)
  if col_count % cores:
    raise ValueError(f"{col_count} column tiles do not split over {cores} TensorCores")
  per_core = col_count // cores
  one_col = (per_core if with_db else n_col_tiles) == 1
  da_in_by_dma = da_in is not None and not one_col  # else a pipelined block, or none
  da_partial = with_grad and (
    partial_out or (with_db and not (cores == 1 and col_start + col_count == n_col_tiles))
  )
  if with_db:
    grid = (cores, n_row_tiles, per_core)
    core, row = (lambda c, i, j: c), (lambda c, i, j: i)
    col = lambda c, i, j: col_start + c * per_core + j
    stats_block = lambda c, i, j: c * n_row_tiles + i
  else:
    # Two axes: megacore splits the leading parallel one.
    grid = (n_row_tiles, n_col_tiles)
    core, row, stats_block = (lambda i, j: 0), (lambda i, j: i), (lambda i, j: i)
    col = lambda i, j: j
  n_stats = int(with_loss) + 2 * int(with_scalar_grads)

  a_ids_col = jnp.pad(a_ids, (0, na_pad - n_a), constant_values=-1).reshape(na_pad, 1)
  b_ids_row = jnp.pad(b_ids, (0, nb_pad - n_b), constant_values=-2).reshape(1, nb_pad)
  # Per tile, [min id, max id]: the kernel runs its lean body where the ranges of a row tile
  # and a column tile cannot share an id (see _tile_kernel).
  a_rng, b_rng = mc.tile_id_ranges(a_ids_col, rows, n_a), mc.tile_id_ranges(b_ids_row, cols, n_b)
  extra = tuple(v for v in (da_in, db_in) if v is not None)
  operands, axes = vma.match_varying((scal, a_rng, b_rng, a_ids_col, b_ids_row, a, b) + extra)
  out_struct = lambda shape, dtype: vma.shape_struct(shape, dtype, axes)

  in_specs = [
    pl.BlockSpec(memory_space=pltpu.SMEM),  # mosaic_common.kernel_scalars
    pl.BlockSpec(memory_space=pltpu.SMEM),  # id range per row tile
    pl.BlockSpec(memory_space=pltpu.SMEM),  # id range per column tile
    pl.BlockSpec((rows, 1), lambda *g: (row(*g), 0)),
    pl.BlockSpec((1, cols), lambda *g: (0, col(*g))),
    pl.BlockSpec((rows, dim), lambda *g: (row(*g), 0)),
    pl.BlockSpec((cols, dim), lambda *g: (col(*g), 0)),
  ]
  if da_in_by_dma:
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))  # copied in once per row tile
  elif da_in is not None:  # one column tile: each step reads its own, prefetched
    in_specs.append(pl.BlockSpec((1, rows, dim), lambda *g: (core(*g), row(*g), 0)))
  if db_in is not None:
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))  # copied in once per core and call
  out_shape, out_specs, scratch = [], [], []
  if n_stats:
    out_shape.append(
      out_struct((n_row_tiles * (cores if with_db else 1), n_stats, _SUBLANES, _LANES), jnp.float32)
    )
    out_specs.append(
      pl.BlockSpec((1, n_stats, _SUBLANES, _LANES), lambda *g: (stats_block(*g), 0, 0, 0))
    )
  if da_partial:
    out_shape.append(out_struct((cores, na_pad, dim), jnp.float32))
    out_specs.append(pl.BlockSpec((1, rows, dim), lambda *g: (core(*g), row(*g), 0)))
  elif with_grad:
    out_shape.append(out_struct((na_pad, dim), a.dtype))
    out_specs.append(pl.BlockSpec((rows, dim), lambda *g: (row(*g), 0)))
  if not one_col and (da_partial or (with_grad and a.dtype != jnp.float32)):
    # A fixed VMEM accumulator: accumulating in a pipelined output block costs the v5p
    # fused kernel 7% more bundles a step (static profile, D = 1152).
    scratch.append(pltpu.VMEM((rows, dim), jnp.float32))
  if with_db:
    # Its block index changes only with the core: resident, written back once. One buffer.
    out_shape.append(out_struct((col_count * cols, dim), jnp.float32))
    out_specs.append(
      pl.BlockSpec((per_core * cols, dim), lambda c, i, j: (c, 0), pipeline_mode=pl.Buffered(1))
    )
  if da_in_by_dma:
    scratch.append(pltpu.VMEM((rows, dim), jnp.float32))
  strip = _strip(rows, strip_rows) if with_loss else rows
  if strip < rows and with_grad:
    scratch.append(pltpu.VMEM((2, strip, cols), jnp.float32))
  scratch += [pltpu.SemaphoreType.DMA] * (da_in_by_dma + (db_in is not None))

  isz = a.dtype.itemsize
  nb_call = col_count * cols
  tile_elems = na_pad * nb_call
  cost = pl.CostEstimate(
    flops=int(2 * tile_elems * dim * (1 + int(with_grad) + int(with_db))),
    transcendentals=mc.transcendentals(
      tile_elems, rows, cols, with_loss=with_loss, with_g=with_grad or with_scalar_grads
    ),
    # a read once per core, b once per row tile, ids, the partials in and the outputs.
    bytes_accessed=int(
      cores * na_pad * dim * isz
      + n_row_tiles * nb_call * dim * isz
      + 4 * (cores * na_pad + n_row_tiles * nb_call)
      + (cores * na_pad * dim * 4 if da_in is not None else 0)
      + (nb_call * dim * 4 if db_in is not None else 0)
      + (na_pad * dim * (4 * cores if da_partial else isz) if with_grad else 0)
      + (nb_call * dim * 4 if with_db else 0)
      + 4 * cores * n_row_tiles * n_stats * _SUBLANES * _LANES
    ),
  )
  est = vmem_bytes(
    rows,
    cols,
    dim,
    a.dtype,
    with_grad=with_grad,
    n_stats=max(n_stats, 1),
    resident_rows=per_core * cols if with_db else 0,
    chained=da_partial,
  )
  precision = mc.precision(a.dtype)
  kernel = functools.partial(
    _tile_kernel,
    rows=rows,
    cols=cols,
    n_a=n_a,
    n_b=n_b,
    na_pad=na_pad,
    nb_pad=nb_pad,
    with_loss=with_loss,
    with_scalar_grads=with_scalar_grads,
    with_grad=with_grad,
    with_db=with_db,
    with_da_in=da_in is not None,
    with_db_in=db_in is not None,
    da_partial=da_partial,
    one_col=one_col,
    col_start=col_start,
    precision=precision,
    strip=strip,
  )
  # Row tiles are independent (megacore may split them) unless they share the resident
  # gradient of b; then the cores' shares are. The column axis accumulates.
  semantics = ("parallel", "arbitrary", "arbitrary") if with_db else ("parallel", "arbitrary")
  # A partial in and a partial out: the same HBM buffer, updated in place (each row tile's
  # block is read before any step of that row tile and written after its last).
  # (da_in is operand 7, the first after the seven above.)
  aliases = {7: int(n_stats > 0)} if da_in is not None and da_partial else {}
  outs = pl.pallas_call(
    kernel,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    scratch_shapes=scratch,
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=semantics, vmem_limit_bytes=_vmem_limit(est, generation, vmem_limit_bytes)
    ),
    cost_estimate=cost,
    input_output_aliases=aliases,
    interpret=_interpret_mode() if interpret else False,
    name=name,
  )(*operands)
  outs = list(outs)
  stats = jnp.sum(outs.pop(0), axis=(0, 2, 3)) if n_stats else None
  if with_loss:  # the kernel sums softplus / ln 2
    stats = stats * jnp.array([mc.LN_2] + [1.0] * (n_stats - 1), jnp.float32)
  da = outs.pop(0) if with_grad else None
  db = outs.pop(0) if with_db else None
  return stats, da, db


def _interpret_mode():
  # TPU interpret mode (simulated VMEM/SMEM, NaN-filled fresh buffers) where this jax has it;
  # otherwise Pallas' generic interpreter.
  params = getattr(pltpu, "InterpretParams", None)
  return params() if params is not None else True


# ------------------------------------------------------------------------------------------
# Public entry points


def _tile(n: int, block: int, multiple: int = 1) -> int:
  """Rows per tile for n rows and tiles of at most ``block``: the fewest tiles that block
  allows (a multiple of ``multiple``), split evenly and rounded up to lanes, so that padding
  stays under one tile (896 rows with 512-row tiles: 2 x 512, not 4 x 512)."""
  k = mc.round_up(-(-n // block), multiple)
  return mc.round_up(-(-n // k), _LANES)


def _pad_rows(a, multiple):
  n = a.shape[0]
  return jnp.pad(a, ((0, mc.round_up(n, multiple) - n), (0, 0)))


def _common(bs, interpret):
  return dict(
    generation=bs.generation,
    vmem_limit_bytes=bs.vmem_limit_bytes,
    interpret=interpret,
    strip_rows=bs.strip_rows,
  )


def _strip(rows: int, strip_rows: int | None) -> int:
  """The tile body's row strip for a row tile of ``rows``: ``strip_rows`` where it splits
  the tile, else the whole tile."""
  return strip_rows if strip_rows and strip_rows < rows and rows % strip_rows == 0 else rows


def _generation(target, x) -> str | None:
  return tpu_generation(target if target is not None else target_lib.target_of(x))


def _check_block_sizes(block_sizes):
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError(
      f"block_sizes must be a siglip_fast.kernels.tpu.BlockSizes or None, got "
      f"{type(block_sizes).__module__}.{type(block_sizes).__name__}"
    )


def loss_sum(
  x,
  y,
  x_ids,
  y_ids,
  log_t,
  bias,
  *,
  block_sizes: BlockSizes | None = None,
  interpret: bool = False,
  target=None,
) -> jax.Array:
  """sum_ij softplus(-z_ij * (t <x_i, y_j> + bias)) as a float32 scalar; forward kernel only.

  Not differentiable (use ``block_loss_sum``). ``target``: the ``siglip_fast.target.Target``
  whose generation picks default tiles (default: that of x).
  """
  x_ids, y_ids, log_t, bias = validate.check_block_inputs(x, y, x_ids, y_ids, log_t, bias)
  _check_block_sizes(block_sizes)
  bs = block_sizes or forward_block_sizes(
    None if interpret else _generation(target, x),
    dim=x.shape[1],
    dtype=x.dtype,
    interpret=interpret,
  )
  rows, cols = _tile(x.shape[0], bs.block_rows), _tile(y.shape[0], bs.block_cols)
  _, scal = mc.kernel_scalars(log_t, bias)
  stats, _, _ = _tile_pass(
    _pad_rows(x, rows),
    _pad_rows(y, cols),
    x_ids,
    y_ids,
    scal,
    rows=rows,
    cols=cols,
    with_loss=True,
    with_scalar_grads=False,
    with_grad=False,
    name="siglip_fwd",
    **_common(bs, interpret),
  )
  return stats[0]


def _super_blocks(bs, m: int, splits: int) -> tuple[int, int, list[int]]:
  """(cols, cores, counts): the fused kernel's column tile for m rows of y, the TensorCores
  each call splits its columns over, and each call's number of column tiles (a multiple of
  cores, as even as they go: at most one super-block per column tile)."""
  cores = TENSORCORES.get(bs.generation, 1)
  cores = cores if splits % cores == 0 else 1
  cols = _tile(m, bs.block_cols, cores)
  shares = mc.round_up(-(-m // cols), cores) // cores  # column tiles per TensorCore
  calls = max(1, min(splits // cores, shares))
  return cols, cores, [cores * (shares // calls + (k < shares % calls)) for k in range(calls)]


def _fused_plan(bs, n, m, dim, dtype) -> tuple[bool, int]:
  """(fuse, splits): whether value-and-grad runs as one kernel with a resident dY (6 n m D)
  rather than two (8 n m D), and in how many super-blocks of y's rows (``BlockSizes``)."""
  if bs.fuse_dy is False or (bs.fuse_dy is None and bs.generation is None):
    return False, 1
  if bs.dy_splits is not None:
    return True, bs.dy_splits
  if bs.generation is None:
    return True, 1
  cores = TENSORCORES.get(bs.generation, 1)
  rows = _tile(n, bs.block_rows)
  budget = mc.VMEM_BUDGET * VMEM_CAPACITY[bs.generation]
  isz = jnp.dtype(dtype).itemsize
  splits = cores
  while True:
    cols, _, counts = _super_blocks(bs, m, splits)
    resident = counts[0] // cores * cols  # rows of dY a TensorCore holds (the largest share)
    need = vmem_bytes(
      rows, cols, dim, dtype, with_grad=True, n_stats=3, resident_rows=resident, chained=splits > 1
    )
    if need <= budget or len(counts) < splits // cores:  # fits, or one tile per super-block
      splits = len(counts) * cores
      break
    splits += cores
  # Each call stays compute bound with the traffic a super-block adds: per row tile, x's
  # tile read, the resident rows of y read again and the float32 partial dX read and written.
  flop_per_byte = 6 * rows * resident / ((isz + 8) * rows + isz * resident)
  ridge = _HBM_RIDGE[bs.generation] * _FUSED_RATE[bs.generation]
  worth_it = need <= budget and (splits == cores or flop_per_byte >= ridge)
  return bs.fuse_dy is True or worth_it, splits


def grad_block_sizes(
  generation: str | None, n: int, m: int, dim: int, dtype, *, interpret: bool = False
) -> BlockSizes:
  """Default value-and-grad tiles: the fused kernel (6 n m D) is chosen before the tiles:
  the largest of its candidate tiles (``_FUSED_TILES``, down to half the area of the first)
  that it runs with, in as many super-blocks as VMEM needs; two kernels (8 n m D) with
  ``for_generation``'s tiles where it runs with none (v4 from D = 1280: its 16 MiB leaves
  super-blocks too short to keep a call compute bound)."""
  base = default_block_sizes(generation, dim=dim, dtype=dtype, interpret=interpret)
  if generation is None:
    return base
  fused = _tiles(_FUSED_TILES, generation, dim)
  first_rows, first_cols = fused[0]
  for rows, cols in fused:
    if 2 * rows * cols < first_rows * first_cols:
      break
    bs = BlockSizes(rows, cols, generation=generation, strip_rows=_STRIP_ROWS.get(generation))
    if _fused_plan(bs, n, m, dim, dtype)[0]:
      return bs
  return base


@dataclasses.dataclass(frozen=True)
class _GradPlan:
  """How a value-and-grad of one block runs: the fused kernel (``fuse``: ``cores``
  TensorCores a call, ``counts`` column tiles per call) or the two kernels. Tiles: x's row
  tile ``rows`` and y's column tile ``cols`` (of the fused or the dX kernel), and the dY
  kernel's y row tile and x column tile ``dy_tiles``. ``x_rows``, ``y_rows``: the padded
  rows of the gradients' float32 layouts (``_add_block``'s running gradients)."""

  bs: BlockSizes
  fuse: bool
  rows: int
  cols: int
  x_rows: int
  y_rows: int
  cores: int = 1
  counts: tuple = ()
  dy_tiles: tuple = ()


def _grad_plan(x, y, block_sizes, interpret, target) -> _GradPlan:
  _check_block_sizes(block_sizes)
  n, m, dim = x.shape[0], y.shape[0], x.shape[1]
  bs = block_sizes or grad_block_sizes(
    None if interpret else _generation(target, x), n, m, dim, x.dtype, interpret=interpret
  )
  rows = _tile(n, bs.block_rows)
  x_rows = mc.round_up(n, rows)
  fuse, splits = _fused_plan(bs, n, m, dim, x.dtype)
  if not fuse:
    dy_tiles = (_tile(m, bs.dy_tiles[0]), _tile(n, bs.dy_tiles[1]))
    y_rows = mc.round_up(m, dy_tiles[0])
    return _GradPlan(bs, False, rows, _tile(m, bs.block_cols), x_rows, y_rows, dy_tiles=dy_tiles)
  cols, cores, counts = _super_blocks(bs, m, splits)
  return _GradPlan(bs, True, rows, cols, x_rows, cols * sum(counts), cores, tuple(counts))


def _fused_calls(
  plan: _GradPlan, x, y, x_ids, y_ids, scal, interpret, accumulate=False, dx_acc=None, dy_acc=None
):
  """The fused kernel, a call per super-block of y (or per pair of them where two
  TensorCores share a call), chained through the float32 partial dX: (stats, dx, dy).

  dx is final (x's dtype, times t) where one call on one TensorCore makes it, else the
  TensorCores' float32 partials without t, (cores, plan.x_rows, D); dy is float32 without
  t, (plan.y_rows, D). ``accumulate``: dx as partials always, and the calls start from the
  running dx_acc and dy_acc in those layouts (None: zero), so that a ring driver's gradients
  stay float32 in the kernel's own layout.
  """
  xp, yp = _pad_rows(x, plan.rows), _pad_rows(y, plan.y_rows)
  stats, dx, dys = 0.0, dx_acc, []
  for k, count in enumerate(plan.counts):
    call_stats, dx, call_dy = _tile_pass(
      xp,
      yp,
      x_ids,
      y_ids,
      scal,
      rows=plan.rows,
      cols=plan.cols,
      with_loss=True,
      with_scalar_grads=True,
      with_grad=True,
      with_db=True,
      cores=plan.cores,
      col_tiles=(sum(plan.counts[:k]), count),
      da_in=dx,
      db_in=dy_acc,
      partial_out=accumulate,
      name="siglip_fwd_dx_dy",
      **_common(plan.bs, interpret),
    )
    stats = stats + call_stats
    dys.append(call_dy)
  return stats, dx, dys[0] if len(dys) == 1 else jnp.concatenate(dys)


def _two_kernel_calls(
  plan: _GradPlan, x, y, x_ids, y_ids, scal, interpret, accumulate=False, dx_acc=None, dy_acc=None
):
  """The dX kernel and the dY kernel (the same kernel on the transposed block): (stats, dx,
  dy), padded, in x's and y's dtypes times t; ``accumulate``: float32 without t, dx as
  (1, plan.x_rows, D) and dy as (plan.y_rows, D), each kernel starting from the running
  dx_acc or dy_acc in that layout (None: zero)."""
  common = _common(plan.bs, interpret)
  rows_dy, cols_dy = plan.dy_tiles
  # x is the owned side of one kernel and the streamed side of the other: each kernel
  # gets its own padding, so neither pads to the lcm of two tiles.
  stats, dx, _ = _tile_pass(
    _pad_rows(x, plan.rows),
    _pad_rows(y, plan.cols),
    x_ids,
    y_ids,
    scal,
    rows=plan.rows,
    cols=plan.cols,
    with_loss=True,
    with_scalar_grads=True,
    with_grad=True,
    da_in=dx_acc,
    partial_out=accumulate,
    name="siglip_fwd_dx",
    **common,
  )
  _, dy, _ = _tile_pass(
    _pad_rows(y, rows_dy),
    _pad_rows(x, cols_dy),
    y_ids,
    x_ids,
    scal,
    rows=rows_dy,
    cols=cols_dy,
    with_loss=False,
    with_scalar_grads=False,
    with_grad=True,
    da_in=None if dy_acc is None else dy_acc[None],
    partial_out=accumulate,
    name="siglip_dy",
    **common,
  )
  return stats, dx, dy[0] if accumulate else dy


def _grad_calls(
  x,
  y,
  x_ids,
  y_ids,
  log_t,
  bias,
  block_sizes,
  interpret,
  target,
  accumulate=False,
  dx_acc=None,
  dy_acc=None,
):
  """Validate a block's inputs, plan its value-and-grad and run the plan's kernel calls:
  (plan, t, (stats, dx, dy)) as ``_fused_calls`` / ``_two_kernel_calls`` return them, to
  which accumulate, dx_acc and dy_acc are passed on, in the plan's layouts."""
  x_ids, y_ids, log_t, bias = validate.check_block_inputs(x, y, x_ids, y_ids, log_t, bias)
  plan = _grad_plan(x, y, block_sizes, interpret, target)
  t, scal = mc.kernel_scalars(log_t, bias)
  calls = _fused_calls if plan.fuse else _two_kernel_calls
  if accumulate:
    dx_acc = _relayout(dx_acc, x.shape[0], plan.x_rows, plan.cores if plan.fuse else 1)
    dy_acc = _relayout(dy_acc, y.shape[0], plan.y_rows)
  return plan, t, calls(plan, x, y, x_ids, y_ids, scal, interpret, accumulate, dx_acc, dy_acc)


def _relayout(acc, n: int, rows: int, cores: int | None = None):
  """A running float32 gradient of n rows in the layout of this block's plan: ``rows``
  padded rows, with ``cores`` TensorCore partials (dX) or none (dY). A ring driver's blocks
  of one trip share dX but not their text rows: the own block has all b, the travelling
  parts half, and their default plans may differ in row tile (padding) or in the split
  over TensorCores (v5p, D = 1152, b = 1792: dX padded to 2048 rows, then to 1792). Where
  they differ, the partials are summed and re-padded (one pass over dX in HBM); where they
  agree (nearly every shape), this is the accumulator itself."""
  if acc is None:
    return None
  have = acc.shape[:-1]
  want = (rows,) if cores is None else (cores, rows)
  if have == want:
    return acc
  total = acc if cores is None else _sum_cores(acc)
  total = jnp.pad(total[:n], ((0, rows - n), (0, 0)))
  return total if cores is None else jnp.pad(total[None], ((0, cores - 1), (0, 0), (0, 0)))


def loss_sum_and_grads(
  x,
  y,
  x_ids,
  y_ids,
  log_t,
  bias,
  *,
  block_sizes: BlockSizes | None = None,
  interpret: bool = False,
  target=None,
):
  """(loss sum, (dx, dy, dlog_t, dbias)); dx, dy in the dtypes of x, y, the rest float32.

  The fused kernel (6 n m D FLOPs, one call per super-block of y: ``BlockSizes.dy_splits``)
  where the chip's VMEM allows it, else two kernels (8 n m D); see ``BlockSizes.fuse_dy``.
  No (n, m) array outside VMEM either way.
  """
  plan, t, (stats, dx, dy) = _grad_calls(
    x, y, x_ids, y_ids, log_t, bias, block_sizes, interpret, target
  )
  n, m = x.shape[0], y.shape[0]
  if dx.ndim == 3:  # the TensorCores' float32 partials, without t
    dx = (t * _sum_cores(dx)).astype(x.dtype)
  if plan.fuse:  # float32, without t
    dy = (t * dy).astype(y.dtype)
  # d/dlog_t of t * s is t * s, so dlog_t = t * sum G * S; d/dbias = sum G.
  return stats[0], (dx[:n], dy[:m], t * stats[1], stats[2])


def _sum_cores(partials):
  """The TensorCores' (cores, rows, D) partials summed as elementwise adds, which XLA fuses
  into the consumer's loop (a reduce over the leading axis became its own float32 (rows, D)
  temporary: 72 MiB on v5p at B = 16384, D = 1152)."""
  return functools.reduce(operator.add, list(partials))


def _add_block(x, y, x_ids, y_ids, log_t, bias, dx_acc, dy_acc, *, block_sizes, interpret, target):
  """A block's loss sum and its gradients added into the running ones (None: zero) by the
  kernels, which start their accumulators from them."""
  _, t, (stats, dx_acc, dy_acc) = _grad_calls(
    x, y, x_ids, y_ids, log_t, bias, block_sizes, interpret, target, True, dx_acc, dy_acc
  )
  return stats[0], (dx_acc, dy_acc, t * stats[1], stats[2])


def _finish_dx(dx_acc, x, log_t):
  """The running dX (the TensorCores' float32 partials, without t) as x's float32 dx."""
  return mc.kernel_scalars(log_t, 0.0)[0] * _sum_cores(dx_acc)[: x.shape[0]]


def _finish_dy(dy_acc, y, log_t):
  """A running dY (float32, padded, without t) as y's float32 dy."""
  return mc.kernel_scalars(log_t, 0.0)[0] * dy_acc[: y.shape[0]]


def block_loss_sum(
  x, y, x_ids, y_ids, log_t, bias, *, block_sizes: BlockSizes | None = None, interpret: bool = False
) -> jax.Array:
  """The block loss sum (``reference.dense.block_loss_sum``), differentiable w.r.t. x, y,
  log_t and bias through the shared custom VJP, whose forward runs the value-and-grad
  kernels."""
  x_ids, y_ids, log_t, bias = validate.check_block_inputs(x, y, x_ids, y_ids, log_t, bias)
  ops = block_ops(interpret=interpret, block_sizes=block_sizes)
  trip = ring_lib.block_trip(axis_name=None, schedule="unidirectional", ops=ops)
  return ring_lib.local_sum(trip, x, y, x_ids, y_ids, log_t, bias)


def block_ops(
  *, interpret: bool = False, block_sizes: BlockSizes | None = None, target=None
) -> ring_lib.BlockOps:
  """This kernel family as the ring's ``BlockOps``; ``target`` (a
  ``siglip_fast.target.Target``) picks the default tiles' generation."""
  _check_block_sizes(block_sizes)
  kw = dict(block_sizes=block_sizes, interpret=bool(interpret), target=target)
  accumulate = ring_lib.Accumulate(functools.partial(_add_block, **kw), _finish_dx, _finish_dy)
  return ring_lib.BlockOps(
    "pallas_tpu",
    functools.partial(loss_sum, **kw),
    functools.partial(loss_sum_and_grads, **kw),
    accumulate,
    unroll=True,
  )

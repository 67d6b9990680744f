"""Fused SigLIP block loss for GPUs: Pallas with the Triton lowering, sized for Hopper
(H100, H200).

Two kernels share one tile body (a ``BR x BC`` logits tile ``t * x_i . y_j + b``, bf16
operands on the tensor cores with float32 accumulation over a loop of ``BK``-wide chunks of
D, then a float32 epilogue in registers, in base 2: log2(e) is folded into t and b, so the
tile's logit is one FMA and exp(-|l|) one ``ex2.approx``):

* **Forward** (``loss_sum``, 2 B^2 D FLOPs): the epilogue is the stable softplus, masked and
  summed to one float32 partial per program. Nothing else is written; no gradient work.
* **Value and grad** (``loss_sum_and_grads``, 6 B^2 D FLOPs, the minimum: every logit is
  computed once). Text rows are processed in chunks of ``C`` (``BlockSizes.grad_chunk``).
  Per chunk the kernel computes the logits tile once and writes, besides the loss,
  ``dlog_t`` and ``dbias`` partial sums, ``G_c = dloss/dlogits`` for that chunk (n x C, in
  the input dtype); two XLA matmuls then give ``dX += G_c @ Y_c`` and ``dY_c = G_c^T @ X``,
  both scaled by t at the end.

float32 inputs run every dot as bf16x3 (three bf16 tensor-core products of high and low
parts, ``_dot_bf16x3``): ~1e-5 relative, against IEEE float32 on the CUDA cores (5x
slower) or TF32 (~1e-3).

Why not a fully fused backward: ``dX_i = t * sum_j G_ij y_j`` needs an accumulator of
``BR x D`` float32 per row tile. At D = 768 or 1152 that is 192 to 590 KB for BR = 64 or
128, more than an SM's registers (256 KB), and Triton has no scratch memory; splitting D
across programs recomputes the logits D / BD times, and accumulating in HBM (atomics or
read-modify-write per tile) moves D * 4 * (1/BR + 1/BC) bytes per logit, against 6 bytes per
logit for writing G once in bf16 and reading it twice. So the gradient matmuls, 2/3 of the
FLOPs, run on XLA's own tuned GEMMs (cuBLAS or XLA-Triton), and only an n x C slab of G
(never n x m, never B x B) lives in HBM. Temp memory is that slab plus the float32 dX
accumulator (n x D): O(B * (C + D)), against 3 * 4 * B^2 bytes for XLA's dense loss. C is
sized so that the accumulator's traffic stays under the dX matmul's time and the temp stays
>= 50x below XLA dense's (``grad_plan``; docs/PERFORMANCE.md section 6 has the cost model).

Triton constraints honoured: every loaded or computed tile has power-of-two shape (the refs
are whole arrays, D only needs to be a multiple of BK), reductions are in-kernel
``fori_loop``s, and there is no scratch memory. Rows and columns are padded to the tile;
padded entries are masked out of the loss and of G (padded ids alone would not do: a padded
column would still add softplus(b) of loss).

Everything runs on CPU with ``interpret=True`` (``pallas_call(..., interpret=True)``; inside
``shard_map`` the Mosaic interpreter runs the same kernel body, see ``_tiles``); there the
PTX approximations become exact math, or (``fast_math="emulate"``, tests) their worst case.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from siglip_fast import ring as ring_lib
from siglip_fast import vma

# Triton tensor-core dots need every dimension >= 16.
_MIN_TILE = 16
# The grid's y axis (row tiles) is limited to 65535 programs by CUDA.
_MAX_GRID_YZ = 65535
# log2(e) and ln(2): the kernels work in base 2 (exp2 is one MUFU.EX2; exp is a multiply and
# an EX2), with log2(e) folded into t and b outside the kernel.
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# Sizing of the value-and-grad's G slab (n x C) against the compiled temp budget; see
# ``grad_plan`` and docs/PERFORMANCE.md ("GPU cost model").
# Dense bf16 FLOP per byte of HBM at which a GEMM turns compute-bound (the ridge), the higher
# of the two cards it is sized for: H100 SXM 989 TFLOP/s / 3.35 TB/s = 295 (H200: 206).
_RIDGE = 300
# The temp budget: XLA's dense value-and-grad keeps ~3 B x B float32 arrays (12 n m bytes);
# ours must be >= 50x below it, sized at 56x to leave room for XLA's small temporaries.
_TEMP_FACTOR = 56
# An upper bound on one G slab (device memory, and fewer, longer steps bring little).
_MAX_SLAB_BYTES = 4 << 30


def _is_pow2(v: int) -> bool:
  return v > 0 and (v & (v - 1)) == 0


def _pow2_floor(v: int) -> int:
  return 1 << (max(int(v), 1).bit_length() - 1)


def _round_up(v: int, k: int) -> int:
  return -(-v // k) * k


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling and launch parameters of the GPU kernels.

  Attributes:
    block_rows, block_cols: image rows (BR) and text rows (BC) per tile of the forward
      kernel. Powers of two, >= 16.
    block_k: width of the chunks of D the dot loops over (BK). Power of two, >= 16; D is
      zero-padded to a multiple of it.
    num_warps, num_stages: Triton launch parameters (stages pipeline the BK loop).
    fwd_group: column tiles the forward sweeps for a band of row tiles before moving on.
      Programs run in that order, so a group's text tiles and the band's image tiles stay in
      L2 (a whole row of tiles would not: Y is 75 MB at B = 32768, D = 1152).
    grad_chunk: text rows per step of the value-and-grad (C above); a multiple of the
      value-and-grad's tile columns. The G slab is n x C in the input dtype.
    grad_block_rows, grad_block_cols: the value-and-grad kernel's tile; None: the
      forward's. Its epilogue keeps more values live (G, the sigmoid, three sums), so the
      tile that suits the forward can spill there.
    grad_num_warps: the value-and-grad kernel's warps; None: ``num_warps``.
  """

  block_rows: int = 128
  block_cols: int = 128
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 3
  fwd_group: int = 32
  grad_chunk: int = 1024
  grad_block_rows: int | None = None
  grad_block_cols: int | None = None
  grad_num_warps: int | None = None

  def __post_init__(self):
    for name in ("block_rows", "block_cols", "block_k", "grad_block_rows", "grad_block_cols"):
      v = getattr(self, name)
      if v is None and name.startswith("grad_"):
        continue
      if not isinstance(v, int) or v < _MIN_TILE or not _is_pow2(v):
        raise ValueError(
          f"BlockSizes.{name} must be a power of two >= {_MIN_TILE} (Triton tiles), got {v!r}"
        )
    for name in ("num_warps", "grad_num_warps"):
      v = getattr(self, name)
      if v is None and name == "grad_num_warps":
        continue
      if not isinstance(v, int) or not _is_pow2(v) or v > 32:
        raise ValueError(f"BlockSizes.{name} must be a power of two <= 32, got {v!r}")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"BlockSizes.num_stages must be a positive int, got {self.num_stages!r}")
    if not isinstance(self.fwd_group, int) or self.fwd_group < 1:
      raise ValueError(f"BlockSizes.fwd_group must be a positive int, got {self.fwd_group!r}")
    cols = self.grad_tile[1]
    if not isinstance(self.grad_chunk, int) or self.grad_chunk < cols or self.grad_chunk % cols:
      raise ValueError(
        f"BlockSizes.grad_chunk must be a positive multiple of the "
        f"value-and-grad tile's columns ({cols}), got {self.grad_chunk!r}"
      )

  @property
  def grad_tile(self) -> tuple[int, int]:
    """(rows, cols) of the value-and-grad kernel's tile."""
    return (self.grad_block_rows or self.block_rows, self.grad_block_cols or self.block_cols)


def min_grad_chunk(d: int, dtype) -> int:
  """The fewest text rows C per value-and-grad step that keep the float32 dX accumulator's
  traffic under the dX += G_c @ Y_c matmul's time.

  Per step that update reads and writes the n x D float32 accumulator (8 n D bytes) for
  2 n C D FLOPs: C / 4 FLOP per byte. It stays compute-bound while C / 4 > ridge, i.e.
  C > 4 * ridge = 1200 bf16 text rows (H100; 824 on an H200). A float32 input's dots are
  bf16x3 (three tensor-core passes), which triples the FLOP time: C > 400.
  """
  del d
  ridge = _RIDGE if jnp.dtype(dtype) != jnp.float32 else _RIDGE // 3
  return 4 * ridge


def grad_plan(n: int, m: int, d: int, dtype, bs: BlockSizes | None = None) -> dict:
  """The value-and-grad's static memory plan for an (n, d) x (m, d) block: no arrays.

  Returns chunk (C), n_chunks, the padded shapes, the G slab's and the float32 dX
  accumulator's bytes, ``temp_bytes`` (their sum plus one chunk's float32 dY_c: what
  the steps keep live besides the inputs and outputs), XLA dense's ~12 n m bytes, and
  ``acc_over_matmul``: the dX accumulator's HBM time over the dX matmul's tensor-core time
  per step at the H100's ridge (< 1: the step stays compute-bound).
  """
  dtype = jnp.dtype(dtype)
  bs = default_block_sizes(n, m, d, dtype) if bs is None else bs
  rows, cols = bs.grad_tile
  d_pad = _round_up(d, bs.block_k)
  n_pad = _round_up(n, rows)
  n_chunks = pl.cdiv(m, bs.grad_chunk)
  chunk = _round_up(pl.cdiv(m, n_chunks), cols)
  slab = n_pad * chunk * dtype.itemsize
  acc = n_pad * d_pad * 4
  ridge = _RIDGE if dtype != jnp.float32 else _RIDGE // 3
  return dict(
    chunk=chunk,
    n_chunks=n_chunks,
    n_pad=n_pad,
    m_pad=n_chunks * chunk,
    d_pad=d_pad,
    slab_bytes=slab,
    acc_bytes=acc,
    temp_bytes=slab + acc + chunk * d_pad * 4,
    xla_dense_bytes=12 * n * m,
    slab_elements=n_pad * chunk,
    acc_over_matmul=(8 * n_pad * d_pad) / (2 * n_pad * chunk * d_pad / ridge),
  )


def default_block_sizes(n: int, m: int, d: int, dtype) -> BlockSizes:
  """Hopper (H100 / H200) defaults for an (n, d) x (m, d) block in ``dtype``.

  Tiles, chosen without a GPU from the compiled kernels (the Pallas-emitted Triton IR
  compiled for sm_90a by the triton package and ptxas: registers, spills, shared memory;
  ``benchmarks/gpu_ptxas.py``, table in ``benchmarks/results/``): the largest tiles that
  compile with no spills. bf16: forward 128 x 128, 8 warps (164 registers; 128 x 256
  spills 224 B per thread), value-and-grad 128 x 128 with 16 warps (122 registers; with 8
  warps its epilogue spills), BK = 64, 3 stages. float32: the dots are bf16x3 on the tensor
  cores (each operand split into a bf16 high and low part; three bf16 dots, lo * lo
  dropped): the splits need registers, so 64 x 128 tiles, 8 warps, BK = 32, 2 stages (a
  128 x 128 forward spills). Small blocks shrink the tiles to the next power of two.
  ``python -m benchmarks.bench_loss --tune BxD`` times variants on the device.

  The G slab (n x C in the input dtype) takes C = ``min_grad_chunk`` rounded up to the
  tile's columns (1280 bf16 text rows), so that the dX accumulator's traffic stays under
  the dX matmul's time, and C never grows past what keeps the value-and-grad's temp
  memory 56x below XLA dense's 12 n m bytes, nor the slab past 4 GiB or 2^31 elements
  (int32 indexing); see ``grad_plan``.
  """
  dtype = jnp.dtype(dtype)
  wide = dtype == jnp.float32
  fit = lambda cap, v: min(cap, max(_MIN_TILE, pl.next_power_of_2(v)))
  if wide:
    (br, bc), (gr, gc), cap_k = (fit(64, n), fit(128, m)), (fit(64, n), fit(128, m)), 32
  else:
    (br, bc), (gr, gc), cap_k = (fit(128, n), fit(128, m)), (fit(128, n), fit(128, m)), 64
  # The widest chunk that divides D (no padding); else pad D to a multiple of BK.
  divisors = [k for k in (cap_k, cap_k // 2, _MIN_TILE) if k >= _MIN_TILE and d % k == 0]
  bk = divisors[0] if divisors else fit(cap_k, d)
  warps = 8 if br * bc >= 64 * 128 else 4
  grad_warps = 8 if gr * gc >= 64 * 128 else 4
  if not wide and gr * gc >= 128 * 128:
    grad_warps = 16
  n_pad, d_pad = _round_up(n, gr), _round_up(d, bk)
  # Above the traffic floor, grow C while the temp budget allows (fewer steps).
  budget = 12 * n * m // _TEMP_FACTOR - 4 * n_pad * d_pad
  chunk = _round_up(min_grad_chunk(d, dtype), gc)
  room = min(budget, _MAX_SLAB_BYTES) // (n_pad * dtype.itemsize)
  if room > chunk:
    chunk = max(chunk, (room // gc) * gc)
  # The slab is one operand of the tile kernel, which indexes in int32.
  while chunk > gc and (n_pad * chunk * dtype.itemsize > _MAX_SLAB_BYTES or n_pad * chunk >= 2**31):
    chunk -= gc
  chunk = max(gc, min(chunk, _round_up(m, gc)))
  return BlockSizes(
    block_rows=br,
    block_cols=bc,
    block_k=bk,
    num_warps=warps,
    num_stages=2 if wide else 3,
    fwd_group=max(1, 4096 // bc),
    grad_chunk=chunk,
    grad_block_rows=gr,
    grad_block_cols=gc,
    grad_num_warps=grad_warps,
  )


# log1p(e) / e on [0, 1]: Chebyshev interpolant of degree 9 in monomial form (float64 fit;
# Horner in float32 is within 1.6e-7 relative of log1p over [0, 1], mean 3e-8, about what
# libdevice's log1pf gives). 10 FMAs and no branch, against ~35 instructions and a branch
# for __nv_log1pf: the forward's SASS for a 128 x 128 tile went from ~3400 to ~2150
# instructions per thread (64 logits each), its epilogue from ~2/3 of the tile's matmul
# time at D = 1152 to under half.
_LOG1P_UNIT = (
  0.9999999946562934,
  -0.49999892648080163,
  0.33329710499262943,
  -0.24951616265725854,
  0.19663274269437392,
  -0.15269667104466478,
  0.10543623839523661,
  -0.05637361320964374,
  0.01954252743780671,
  -0.00317605705276947,
)


def _log1p_unit(e):
  """log1p(e) for e in [0, 1] (here e = exp(-|l|)), in float32."""
  acc = jnp.full_like(e, _LOG1P_UNIT[-1])
  for c in _LOG1P_UNIT[-2::-1]:
    acc = acc * e + c
  return acc * e


# Fast-math modes of the epilogue: "ptx" (compiled: PTX approximations by inline assembly),
# "exact" (interpret mode: IEEE division and exp2), "emulate" (interpret mode, tests: the
# approximations' documented worst-case error, applied as one-sided ulp steps).
_FAST_MATH = ("ptx", "exact", "emulate")
# Worst-case error of the PTX approximations (PTX ISA): rcp.approx.f32 1 ulp;
# ex2.approx.ftz.f32 2 ulp (max relative error 2^-22 over the full range).
_RCP_ULPS, _EX2_ULPS = 1, 2


def _ulp_up(v, ulps):
  for _ in range(ulps):
    v = lax.nextafter(v, jnp.full_like(v, jnp.inf))
  return v


def _reciprocal(v, mode: str):
  """1 / v; compiled, PTX's rcp.approx.ftz.f32 (MUFU.RCP, 1 ulp), instead of the IEEE
  division Triton emits for ``/`` (a Newton iteration and a slow-path branch per element)."""
  if mode == "exact":
    return 1.0 / v
  if mode == "emulate":
    return _ulp_up(1.0 / v, _RCP_ULPS)
  (out,) = plgpu_triton.elementwise_inline_asm(
    "rcp.approx.ftz.f32 $0, $1;",
    args=[v],
    constraints="=r,r",
    pack=1,
    result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.float32)],
  )
  return out


def _exp2(v, mode: str):
  """2^v for v <= 0; compiled, PTX's ex2.approx.ftz.f32 (one MUFU.EX2; results below 2^-126
  flush to 0, which changes log1p(e) and the sigmoid by < 1e-38)."""
  if mode == "exact":
    return jnp.exp2(v)
  if mode == "emulate":
    return _ulp_up(jnp.exp2(v), _EX2_ULPS)
  (out,) = plgpu_triton.elementwise_inline_asm(
    "ex2.approx.ftz.f32 $0, $1;",
    args=[v],
    constraints="=r,r",
    pack=1,
    result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.float32)],
  )
  return out


def _split_bf16(a):
  """a = hi + lo + O(2^-17 |a|): two bf16 parts of a float32 tile."""
  hi = a.astype(jnp.bfloat16)
  lo = (a - hi.astype(jnp.float32)).astype(jnp.bfloat16)
  return hi, lo


def _dot_bf16x3(a, b, dims):
  """float32 dot as three bf16 tensor-core dots with float32 accumulation (bf16x3:
  hi*hi + hi*lo + lo*hi; lo*lo, < 2^-16 of each product, is dropped). Each float32 operand
  is kept to ~16 significant bits, so each product is within ~3 * 2^-17 relative; a sum of
  D products with random signs is within ~2^-17 of its magnitude, i.e. ~1e-5 relative
  on gradients (float32 IEEE: ~1e-7; TF32: ~1e-3). Small terms first."""
  (a_hi, a_lo), (b_hi, b_lo) = _split_bf16(a), _split_bf16(b)
  dot = lambda u, v: lax.dot_general(u, v, dims, preferred_element_type=jnp.float32)
  return dot(a_lo, b_hi) + dot(a_hi, b_lo) + dot(a_hi, b_hi)


def _tile_kernel(
  x_ref,
  y_ref,
  xid_ref,
  yid_ref,
  s_ref,
  mv_ref,
  loss_ref,
  *grad_refs,
  bs: BlockSizes,
  n: int,
  mask_cols: bool,
  group: int,
  col_tiles: int,
  with_grads: bool,
  fast_math: str,
):
  """One BR x BC tile of logits, its loss partial and (with_grads) its G tile and the
  tile's sums of G * (l - b) and of G (dlog_t and dbias).

  Works in base 2: s_ref holds (t * log2(e), b * log2(e)), so l2 = l * log2(e) is one FMA on
  the dot and exp(-|l|) = exp2(-|l2|) one MUFU.EX2; ln(2) comes back in once per sum.
  Columns outside [mv_ref[0], mv_ref[1]) are masked (the ragged or overlapping columns of a
  value-and-grad chunk, or padding).

  Grid (group, row tiles, column groups): axis 0 varies fastest, so concurrently running
  programs share a group's text tiles and a few image-row tiles in L2.
  """
  br, bc, bk = bs.block_rows, bs.block_cols, bs.block_k
  jl, i, grp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  j = grp * group + jl
  d_pad = x_ref.shape[1]
  wide = x_ref.dtype == jnp.float32
  dims = (((1,), (1,)), ((), ()))

  def body():
    r0 = pl.multiple_of(i * br, br)
    c0 = pl.multiple_of(j * bc, bc)

    def k_step(k, acc):
      k0 = pl.multiple_of(k * bk, bk)
      xa = x_ref[pl.ds(r0, br), pl.ds(k0, bk)]
      yb = y_ref[pl.ds(c0, bc), pl.ds(k0, bk)]
      if wide:  # bf16x3 on the tensor cores, not float32 FMAs on the CUDA cores
        return acc + _dot_bf16x3(xa, yb, dims)
      return acc + lax.dot_general(xa, yb, dims, preferred_element_type=jnp.float32)

    sim = lax.fori_loop(0, d_pad // bk, k_step, jnp.zeros((br, bc), jnp.float32))
    t2, b2 = s_ref[0], s_ref[1]
    l2 = t2 * sim + b2  # the logit times log2(e)
    pos = xid_ref[pl.ds(r0, br)][:, None] == yid_ref[pl.ds(c0, bc)][None, :]
    u2 = jnp.where(pos, -l2, l2)  # loss = softplus(u), u = -z * l
    e = _exp2(-jnp.abs(l2), fast_math)  # exp(-|l|); shared by softplus and sigmoid
    loss = jnp.maximum(u2, 0.0) * _LN2 + _log1p_unit(e)
    valid = None
    if n % br:
      valid = (r0 + lax.broadcasted_iota(jnp.int32, (br, bc), 0)) < n
    if mask_cols:
      # The bounds are operands: the value-and-grad's chunks share one compiled kernel.
      col = c0 + lax.broadcasted_iota(jnp.int32, (br, bc), 1)
      cols_ok = (col >= mv_ref[0]) & (col < mv_ref[1])
      valid = cols_ok if valid is None else valid & cols_ok
    if valid is not None:
      loss = jnp.where(valid, loss, 0.0)
    loss_ref[i, j] = jnp.sum(loss)
    if with_grads:
      g_ref, dlt_ref, db_ref = grad_refs
      # dloss/dl = -z * sigmoid(u); sigmoid(u) from e without cancellation on either side.
      r = _reciprocal(1.0 + e, fast_math)  # 1 + e in [1, 2]: no denormals, no zero
      sig_u = jnp.where(u2 >= 0, r, e * r)
      g = jnp.where(pos, -sig_u, sig_u)
      if valid is not None:
        g = jnp.where(valid, g, 0.0)
      g_ref[pl.ds(r0, br), pl.ds(c0, bc)] = g.astype(g_ref.dtype)
      # l - b = ln(2) * (l2 - b2): no separate t * sim tile kept live.
      dlt_ref[i, j] = jnp.sum(g * (l2 - b2)) * _LN2
      db_ref[i, j] = jnp.sum(g)

  if col_tiles % group:
    # The last column group is partial; its spare programs do nothing (their partials
    # are never written, and the caller slices them off before anything reads them).
    pl.when(j < col_tiles)(body)
  else:
    body()


def _compiler_params(bs: BlockSizes):
  return plgpu_triton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _tiles(
  xp,
  yp,
  xid,
  yid,
  scal,
  col_range,
  *,
  bs: BlockSizes,
  n: int,
  mask_cols: bool,
  with_grads: bool,
  interpret: bool,
  fast_math: str | None = None,
):
  """Run the tile kernel over padded (n_pad, d_pad) x (m_pad, d_pad) operands.

  Returns per-tile float32 partial sums of shape (row tiles, column tiles) of the loss, and
  with grads also G of shape (n_pad, m_pad) in xp.dtype and the partial sums for dlog_t
  and dbias. ``scal``: float32 (t * log2(e), b * log2(e)).
  Rows from ``n`` and, if ``mask_cols``, columns outside [col_range[0], col_range[1])
  (int32 (2,)) are masked out.
  """
  fast_math = fast_math or ("exact" if interpret else "ptx")
  if fast_math not in _FAST_MATH or (fast_math == "ptx") == bool(interpret):
    raise ValueError(
      f"fast_math {fast_math!r} with interpret={interpret!r}: 'ptx' is for "
      "compiled kernels, 'exact' and 'emulate' for interpret mode"
    )
  n_pad, d_pad = xp.shape
  m_pad = yp.shape[0]
  row_tiles, col_tiles = n_pad // bs.block_rows, m_pad // bs.block_cols
  group = col_tiles if with_grads else min(bs.fwd_group, col_tiles)
  col_groups = pl.cdiv(col_tiles, group)
  if row_tiles > _MAX_GRID_YZ or col_groups > _MAX_GRID_YZ:
    raise ValueError(
      f"a {n_pad} x {m_pad} block needs {row_tiles} row tiles and "
      f"{col_groups} column groups; CUDA allows {_MAX_GRID_YZ}: raise "
      "block_rows or fwd_group"
    )
  biggest = max(n_pad * d_pad, m_pad * d_pad, n_pad * m_pad if with_grads else 0)
  if biggest >= 2**31:
    # Element offsets inside the kernel are 32-bit.
    raise ValueError(
      f"an operand of the {n_pad} x {m_pad} x {d_pad} block has {biggest} "
      "elements; the kernel indexes with int32 (< 2**31): use a smaller "
      "grad_chunk or split the batch (e.g. over a ring)"
    )
  operands = (xp, yp, xid, yid, scal, col_range)
  operands, axes = vma.match_varying(operands)
  part = vma.shape_struct((row_tiles, col_groups * group), jnp.float32, axes)
  out_shape = [part]
  if with_grads:
    out_shape += [vma.shape_struct((n_pad, m_pad), xp.dtype, axes), part, part]
  kernel = functools.partial(
    _tile_kernel,
    bs=bs,
    n=n,
    mask_cols=mask_cols,
    group=group,
    col_tiles=col_tiles,
    with_grads=with_grads,
    fast_math=fast_math,
  )
  flops = 2 * n_pad * m_pad * d_pad
  itemsize = xp.dtype.itemsize
  bytes_accessed = (
    n_pad * d_pad * itemsize * col_groups
    + m_pad * d_pad * itemsize
    + (n_pad * m_pad * itemsize if with_grads else 0)
  )
  compiler_params = _compiler_params(bs)
  if interpret and axes:
    # Inside shard_map, jax 0.10's generic interpreter (interpret=True) fails jax's
    # varying-axes checks (it slices varying operands with invariant program ids); the
    # Mosaic interpreter runs the same kernel body and is vma-aware. Compiled kernels are
    # unaffected (tests lower them under shard_map with check_vma=True).
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top

    compiler_params, interpret = pltpu.CompilerParams(), pltpu.InterpretParams()
  outs = pl.pallas_call(
    kernel,
    grid=(group, row_tiles, col_groups),
    out_shape=tuple(out_shape),
    compiler_params=compiler_params,
    cost_estimate=pl.CostEstimate(
      flops=flops,
      transcendentals=(3 if with_grads else 2) * n_pad * m_pad,
      bytes_accessed=bytes_accessed,
    ),
    interpret=interpret,
    name="siglip_block_vg" if with_grads else "siglip_block_fwd",
  )(*operands)
  return tuple(o[:, :col_tiles] if o.shape == part.shape else o for o in outs)


# --------------------------------------------------------------------------------------
# Input checks, padding, and the two entry points.
# --------------------------------------------------------------------------------------


def _check(x, y, x_ids, y_ids, log_t, bias):
  for arg, a in (("x", x), ("y", y)):
    if not hasattr(a, "ndim") or a.ndim != 2:
      raise ValueError(
        f"{arg} must be a 2-D (rows, dim) array, got {getattr(a, 'shape', type(a).__name__)}"
      )
    if a.dtype not in (jnp.float32, jnp.bfloat16):
      raise TypeError(f"{arg} must be float32 or bfloat16, got {a.dtype}")
  if x.dtype != y.dtype:
    raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"x and y must have the same dim, got {x.shape} and {y.shape}")
  if x.shape[0] == 0 or y.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"x and y must be non-empty, got {x.shape} and {y.shape}")
  for arg, ids, rows in (("x_ids", x_ids, x.shape[0]), ("y_ids", y_ids, y.shape[0])):
    if not hasattr(ids, "dtype") or ids.dtype != jnp.int32 or ids.shape != (rows,):
      raise TypeError(
        f"{arg} must be int32 of shape ({rows},), got "
        f"{getattr(ids, 'dtype', type(ids).__name__)}"
        f"{getattr(ids, 'shape', '')}"
      )
  for arg, v in (("log_t", log_t), ("bias", bias)):
    if jnp.shape(v) != ():
      raise ValueError(f"{arg} must be a scalar, got shape {jnp.shape(v)}")
    if not jnp.issubdtype(jnp.result_type(v), jnp.floating):
      raise TypeError(f"{arg} must be a floating-point scalar, got {jnp.result_type(v)}")


def _resolve(block_sizes, x, y) -> BlockSizes:
  if block_sizes is None:
    return default_block_sizes(x.shape[0], y.shape[0], x.shape[1], x.dtype)
  if not isinstance(block_sizes, BlockSizes):
    raise TypeError(
      f"block_sizes must be a siglip_fast.kernels.gpu.BlockSizes or None, got "
      f"{type(block_sizes).__name__}"
    )
  return block_sizes


def _pad(a, rows, cols=None, value=0):
  """Zero-pad (rows[, cols]); a no-op (no copy) when already that shape."""
  pr, pc = rows - a.shape[0], (cols - a.shape[1]) if a.ndim == 2 else 0
  if pr == 0 and pc == 0:
    return a
  widths = ((0, pr), (0, pc)) if a.ndim == 2 else ((0, pr),)
  return jnp.pad(a, widths, constant_values=value)


def _scalars(log_t, bias):
  """(t * log2(e), b * log2(e)) in float32: the kernel's base-2 logit is one FMA."""
  t = jnp.exp(jnp.asarray(log_t, jnp.float32))
  return jnp.stack([t * _LOG2E, jnp.asarray(bias, jnp.float32) * _LOG2E])


def _forward(
  x, y, x_ids, y_ids, log_t, bias, bs: BlockSizes, interpret: bool, fast_math: str | None = None
):
  n, d = x.shape
  m = y.shape[0]
  d_pad = _round_up(d, bs.block_k)
  n_pad, m_pad = _round_up(n, bs.block_rows), _round_up(m, bs.block_cols)
  (loss,) = _tiles(
    _pad(x, n_pad, d_pad),
    _pad(y, m_pad, d_pad),
    _pad(x_ids, n_pad),
    _pad(y_ids, m_pad),
    _scalars(log_t, bias),
    jnp.array([0, m], jnp.int32),
    bs=bs,
    n=n,
    mask_cols=m_pad != m,
    with_grads=False,
    interpret=interpret,
    fast_math=fast_math,
  )
  return jnp.sum(loss)


def _gemm(a, b, dims, wide):
  """An XLA matmul with float32 output: bf16 on the tensor cores, or bf16x3 for float32
  (three bf16 GEMMs; not XLA:GPU's TF32 default, not IEEE float32 on the CUDA cores)."""
  if wide:
    return _dot_bf16x3(a, b, dims)
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _value_and_grads(
  x, y, x_ids, y_ids, log_t, bias, bs: BlockSizes, interpret: bool, fast_math: str | None = None
):
  """(loss sum, (dx, dy, dlog_t, dbias)), 6 n m D FLOPs; see the module docstring.

  Text rows go in n_chunks = ceil(m / grad_chunk) chunks of C = m / n_chunks rounded up to
  the tile's columns (so C <= grad_chunk). No copy of y is padded to a multiple of C:
  chunk c starts at min(c * C, m - C), so the last one may overlap the one before it; its
  columns below c * C are masked out of the loss and G, and their dY rows are kept from
  the earlier chunk.
  """
  n, d = x.shape
  m = y.shape[0]
  rows, cols = bs.grad_tile
  bs = dataclasses.replace(
    bs, block_rows=rows, block_cols=cols, num_warps=bs.grad_num_warps or bs.num_warps
  )
  d_pad = _round_up(d, bs.block_k)
  n_pad = _round_up(n, bs.block_rows)
  # As few chunks as grad_chunk allows, each as short as the tile allows.
  n_chunks = pl.cdiv(m, bs.grad_chunk)
  chunk = _round_up(pl.cdiv(m, n_chunks), bs.block_cols)
  m_y = max(m, chunk)  # y is padded only when shorter than one chunk
  xp = _pad(x, n_pad, d_pad)
  yp = _pad(y, m_y, d_pad)
  xid = _pad(x_ids, n_pad)
  yid = _pad(y_ids, m_y)
  scal = _scalars(log_t, bias)
  t = jnp.exp(jnp.asarray(log_t, jnp.float32))
  wide = x.dtype == jnp.float32
  mask_cols = m % chunk != 0 or m_y != m

  def step(carry, c):
    dx_acc, dy, loss, dlt, db = carry
    start = jnp.minimum(c * chunk, m_y - chunk)
    lo = c * chunk - start  # > 0 only for an overlapping last chunk
    hi = jnp.minimum(m - start, chunk)  # < chunk only when y itself was padded
    y_c = lax.dynamic_slice_in_dim(yp, start, chunk)
    id_c = lax.dynamic_slice_in_dim(yid, start, chunk)
    loss_p, g, dlt_p, db_p = _tiles(
      xp,
      y_c,
      xid,
      id_c,
      scal,
      jnp.stack([lo, hi]),
      bs=bs,
      n=n,
      mask_cols=mask_cols,
      with_grads=True,
      interpret=interpret,
      fast_math=fast_math,
    )
    dx_acc = dx_acc + _gemm(g, y_c, (((1,), (0,)), ((), ())), wide)
    dy_c = (t * _gemm(g, xp, (((0,), (0,)), ((), ())), wide)).astype(dy.dtype)
    if mask_cols:  # keep the rows an earlier chunk wrote
      keep = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0) < lo
      dy_c = jnp.where(keep, lax.dynamic_slice_in_dim(dy, start, chunk), dy_c)
    dy = lax.dynamic_update_slice_in_dim(dy, dy_c, start, 0)
    carry = (dx_acc, dy, loss + jnp.sum(loss_p), dlt + jnp.sum(dlt_p), db + jnp.sum(db_p))
    return carry, None

  zero = jnp.zeros((), jnp.float32)
  init = (
    jnp.zeros((n_pad, d_pad), jnp.float32),
    jnp.zeros((m_y, d_pad), y.dtype),
    zero,
    zero,
    zero,
  )
  # Under shard_map the carry varies over the mesh axes the operands vary over.
  axes = frozenset().union(*map(vma.varying_axes, (x, y, x_ids, y_ids, scal)))
  init = tuple(vma.pvary(a, axes) for a in init)
  (dx_acc, dy, loss, dlt, db), _ = lax.scan(step, init, jnp.arange(n_chunks, dtype=jnp.int32))
  dx = (t * dx_acc[:n, :d]).astype(x.dtype)
  dy = dy[:m, :d]
  return loss, (dx, dy, vma.sum_to_match(dlt, log_t), vma.sum_to_match(db, bias))


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
  fast_math: str | None = None,
) -> jax.Array:
  """The block loss sum as a float32 scalar; forward kernel only, not differentiable (use
  ``block_loss_sum``). Arguments as ``block_loss_sum``."""
  _check(x, y, x_ids, y_ids, log_t, bias)
  bs = _resolve(block_sizes, x, y)
  return _forward(x, y, x_ids, y_ids, log_t, bias, bs, interpret, fast_math)


def block_loss_sum(
  x,
  y,
  x_ids,
  y_ids,
  log_t,
  bias,
  *,
  block_sizes: BlockSizes | None = None,
  interpret: bool = False,
  fast_math: str | None = None,
) -> jax.Array:
  """Fused ``reference.dense.block_loss_sum``: float32 scalar, differentiable in x, y,
  log_t and bias through the shared custom VJP (``siglip_fast.ring.local_sum``), whose
  forward under ``grad`` runs the value-and-grad kernels (6 B^2 D FLOPs in all).

  x: (n, D), y: (m, D), float32 or bfloat16 (same dtype); x_ids: (n,), y_ids: (m,) int32;
  log_t, bias: floating scalars. ``interpret=True`` runs on CPU. ``fast_math`` (tests):
  None picks "ptx" compiled and "exact" in interpret mode; "emulate" (interpret mode) applies
  the PTX approximations' worst-case errors.
  """
  _check(x, y, x_ids, y_ids, log_t, bias)
  kw = dict(block_sizes=block_sizes, interpret=interpret, fast_math=fast_math)
  ops = ring_lib.BlockOps(
    "pallas_gpu",
    functools.partial(loss_sum, **kw),
    functools.partial(block_loss_sum_and_grads, **kw),
  )
  trip = ring_lib.block_trip(axis_name=None, schedule="unidirectional", ops=ops)
  return ring_lib.local_sum(trip, x, y, x_ids, y_ids, log_t, bias)


def block_loss_sum_and_grads(
  x,
  y,
  x_ids,
  y_ids,
  log_t,
  bias,
  *,
  block_sizes: BlockSizes | None = None,
  interpret: bool = False,
  fast_math: str | None = None,
):
  """(loss sum, (dx, dy, dlog_t, dbias)) in one pass; dx, dy in the dtypes of x, y,
  dlog_t and dbias float32 scalars (``siglip_fast.ring.BlockOps`` contract)."""
  _check(x, y, x_ids, y_ids, log_t, bias)
  bs = _resolve(block_sizes, x, y)
  return _value_and_grads(x, y, x_ids, y_ids, log_t, bias, bs, interpret, fast_math)


def block_ops(
  *, interpret: bool = False, block_sizes: BlockSizes | None = None, target=None
) -> ring_lib.BlockOps:
  """The GPU kernels as a ``BlockOps`` for ``siglip_fast.ring`` / ``siglip_fast.sigmoid_loss``.

  block_sizes=None picks ``default_block_sizes`` for each block's shape (the defaults
  depend on the shape only, not on ``target``, the ``siglip_fast.target.Target``).
  """
  del target
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError(
      f"block_sizes must be a siglip_fast.kernels.gpu.BlockSizes or None, got "
      f"{type(block_sizes).__name__}"
    )
  kw = dict(block_sizes=block_sizes, interpret=interpret)
  return ring_lib.BlockOps(
    "pallas_gpu",
    functools.partial(loss_sum, **kw),
    functools.partial(block_loss_sum_and_grads, **kw),
  )

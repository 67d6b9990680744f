"""Fused SigLIP block loss for GPUs: Pallas with the Triton lowering, tuned for the H100.

Two kernels share one tile body (a ``BR x BC`` logits tile ``t * x_i . y_j + b``, bf16
operands on the tensor cores with float32 accumulation over a loop of ``BK``-wide chunks of
D, then a float32 epilogue in registers):

* **Forward** (``loss_sum``, 2 B^2 D FLOPs): the epilogue is the stable softplus, masked and
  summed to one float32 partial per program. Nothing else is written; no gradient work.
* **Value and grad** (``loss_sum_and_grads``, 6 B^2 D FLOPs, the minimum: every logit is
  computed once). Text rows are processed in chunks of ``C`` (``BlockSizes.grad_chunk``).
  Per chunk the kernel computes the logits tile once and writes, besides the loss,
  ``dlog_t`` and ``dbias`` partial sums, ``G_c = dloss/dlogits`` for that chunk (n x C, in
  the input dtype); two XLA matmuls then give ``dX += G_c @ Y_c`` and ``dY_c = G_c^T @ X``,
  both scaled by t at the end.

Why not a fully fused backward: ``dX_i = t * sum_j G_ij y_j`` needs an accumulator of
``BR x D`` float32 per row tile. At D = 768 or 1152 that is 192 to 590 KB for BR = 64 or
128, more than an SM's registers (256 KB), and Triton has no scratch memory; splitting D
across programs recomputes the logits D / BD times, and accumulating in HBM (atomics or
read-modify-write per tile) moves D * 4 * (1/BR + 1/BC) bytes per logit, against 6 bytes per
logit for writing G once in bf16 and reading it twice. So the gradient matmuls, 2/3 of the
FLOPs, run on XLA's own tuned GEMMs (cuBLAS or XLA-Triton), and only an n x C slab of G
(never n x m, never B x B) lives in HBM. Temp memory is that slab plus the float32 dX
accumulator (n x D): O(B * (C + D)), against 3 * 4 * B^2 bytes for XLA's dense loss.

Triton constraints honoured (DESIGN.md section 6): every loaded or computed tile has
power-of-two shape (the refs are whole arrays, D only needs to be a multiple of BK),
reductions are in-kernel ``fori_loop``s, and there is no scratch memory. Rows and columns are
padded to the tile; padded entries are masked out of the loss and of G (padded ids alone
would not do: a padded column would still add softplus(b) of loss).

Everything runs on CPU with ``interpret=True`` (``pallas_call(..., interpret=True)``; inside
``shard_map`` the Mosaic interpreter runs the same kernel body, see ``_tiles``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from siglip_fast.reference import ring as ring_lib
from siglip_fast.reference import vma

# Triton tensor-core dots need every dimension >= 16.
_MIN_TILE = 16
# The grid's y axis (row tiles) is limited to 65535 programs by CUDA.
_MAX_GRID_YZ = 65535
# Budget for the n x C slab of G in the value-and-grad (per chunk).
_G_SLAB_BYTES = 64 << 20


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

  def __post_init__(self):
    for name in ("block_rows", "block_cols", "block_k", "grad_block_rows", "grad_block_cols"):
      v = getattr(self, name)
      if v is None and name.startswith("grad_"):
        continue
      if not isinstance(v, int) or v < _MIN_TILE or not _is_pow2(v):
        raise ValueError(f"BlockSizes.{name} must be a power of two >= {_MIN_TILE} "
                         f"(Triton tiles), got {v!r}")
    if not isinstance(self.num_warps, int) or not _is_pow2(self.num_warps) or \
        self.num_warps > 32:
      raise ValueError(f"BlockSizes.num_warps must be a power of two <= 32, got "
                       f"{self.num_warps!r}")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"BlockSizes.num_stages must be a positive int, got "
                       f"{self.num_stages!r}")
    if not isinstance(self.fwd_group, int) or self.fwd_group < 1:
      raise ValueError(f"BlockSizes.fwd_group must be a positive int, got {self.fwd_group!r}")
    cols = self.grad_tile[1]
    if not isinstance(self.grad_chunk, int) or self.grad_chunk < cols or self.grad_chunk % cols:
      raise ValueError(f"BlockSizes.grad_chunk must be a positive multiple of the "
                       f"value-and-grad tile's columns ({cols}), got {self.grad_chunk!r}")

  @property
  def grad_tile(self) -> tuple[int, int]:
    """(rows, cols) of the value-and-grad kernel's tile."""
    return (self.grad_block_rows or self.block_rows, self.grad_block_cols or self.block_cols)


def default_block_sizes(n: int, m: int, d: int, dtype) -> BlockSizes:
  """H100 defaults for an (n, d) x (m, d) block in ``dtype``.

  bf16, chosen without an H100 at hand from a static look at the compiled kernels (the
  Pallas-emitted Triton IR compiled for sm_90a by Triton 3.9 and ptxas: registers, spills,
  shared memory, instruction mix) and L2 traffic: the forward takes 128 x 256 tiles
  (at the tensor-core peak they pull 47 B of operands from L2 per SM clock, 128 x 128
  tiles 64 B, more than H100's L2 is thought to sustain), BK = 64, 8 warps, 3 stages
  (144 KiB of shared memory, one program per SM);
  the value-and-grad takes 128 x 128 (its epilogue spills 2.7 KiB per thread at 128 x 256,
  56 B at 128 x 128). ``python -m benchmarks.bench_loss --tune BxD`` times variants on
  the device. float32 (IEEE dots, no tensor-core fast path): 64 x 64 tiles, BK = 32,
  4 warps. Small blocks shrink the tiles to the next power of two. The G slab is capped
  at 64 MiB, with C between 1024 and 4096 text rows (C >= 1024 keeps the dX += G_c @ Y_c
  update compute-bound: its arithmetic intensity is about C / 4 FLOP per byte of dX).
  """
  dtype = jnp.dtype(dtype)
  wide = dtype == jnp.float32
  fit = lambda cap, v: min(cap, max(_MIN_TILE, pl.next_power_of_2(v)))
  if wide:
    (br, bc), (gr, gc), cap_k = (fit(64, n), fit(64, m)), (fit(64, n), fit(64, m)), 32
  else:
    (br, bc), (gr, gc), cap_k = (fit(128, n), fit(256, m)), (fit(128, n), fit(128, m)), 64
  # The widest chunk that divides D (no padding); else pad D to a multiple of BK.
  divisors = [k for k in (cap_k, cap_k // 2, _MIN_TILE) if k >= _MIN_TILE and d % k == 0]
  bk = divisors[0] if divisors else fit(cap_k, d)
  warps = 8 if br * bc >= 128 * 128 else 4
  chunk = _pow2_floor(_G_SLAB_BYTES // (_round_up(n, gr) * dtype.itemsize))
  chunk = min(max(chunk, 1024), 4096, _round_up(m, gc))
  chunk = max(gc, _round_up(chunk, gc))
  return BlockSizes(block_rows=br, block_cols=bc, block_k=bk, num_warps=warps,
                    num_stages=2 if wide else 3, fwd_group=max(1, 4096 // bc),
                    grad_chunk=chunk, grad_block_rows=gr, grad_block_cols=gc)


# log1p(e) / e on [0, 1]: Chebyshev interpolant of degree 9 in monomial form (float64 fit;
# Horner in float32 is within 1.6e-7 relative of log1p over [0, 1], mean 3e-8, about what
# libdevice's log1pf gives). 10 FMAs and no branch, against ~35 instructions and a branch
# for __nv_log1pf: the forward's SASS for a 128 x 128 tile went from ~3400 to ~2150
# instructions per thread (64 logits each), its epilogue from ~2/3 of the tile's matmul
# time at D = 1152 to under half.
_LOG1P_UNIT = (0.9999999946562934, -0.49999892648080163, 0.33329710499262943,
               -0.24951616265725854, 0.19663274269437392, -0.15269667104466478,
               0.10543623839523661, -0.05637361320964374, 0.01954252743780671,
               -0.00317605705276947)


def _log1p_unit(e):
  """log1p(e) for e in [0, 1] (here e = exp(-|l|)), in float32."""
  acc = jnp.full_like(e, _LOG1P_UNIT[-1])
  for c in _LOG1P_UNIT[-2::-1]:
    acc = acc * e + c
  return acc * e


def _reciprocal(v, approx: bool):
  """1 / v; with ``approx`` PTX's rcp.approx.ftz.f32 (MUFU.RCP, 1 ulp), instead of the
  IEEE division Triton emits for ``/`` (a Newton iteration and a slow-path branch per
  element). Interpret mode has no PTX: it divides."""
  if not approx:
    return 1.0 / v
  (out,) = plgpu_triton.elementwise_inline_asm(
      "rcp.approx.ftz.f32 $0, $1;", args=[v], constraints="=r,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.float32)])
  return out


def _tile_kernel(x_ref, y_ref, xid_ref, yid_ref, s_ref, mv_ref, loss_ref, *grad_refs,
                 bs: BlockSizes, n: int, mask_cols: bool, group: int, col_tiles: int,
                 with_grads: bool, fast_math: bool):
  """One BR x BC tile of logits, its loss partial and (with_grads) its G tile and the
  tile's sums of G * (l - b) and of G (dlog_t and dbias).

  Grid (group, row tiles, column groups): axis 0 varies fastest, so concurrently running
  programs share a group's text tiles and a few image-row tiles in L2.
  """
  br, bc, bk = bs.block_rows, bs.block_cols, bs.block_k
  jl, i, grp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  j = grp * group + jl
  d_pad = x_ref.shape[1]
  dot_precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

  def body():
    r0 = pl.multiple_of(i * br, br)
    c0 = pl.multiple_of(j * bc, bc)

    def k_step(k, acc):
      k0 = pl.multiple_of(k * bk, bk)
      xa = x_ref[pl.ds(r0, br), pl.ds(k0, bk)]
      yb = y_ref[pl.ds(c0, bc), pl.ds(k0, bk)]
      return acc + lax.dot_general(xa, yb, (((1,), (1,)), ((), ())),
                                   precision=dot_precision,
                                   preferred_element_type=jnp.float32)

    sim = lax.fori_loop(0, d_pad // bk, k_step, jnp.zeros((br, bc), jnp.float32))
    log_t, bias = s_ref[0], s_ref[1]
    logit = jnp.exp(log_t) * sim + bias
    pos = xid_ref[pl.ds(r0, br)][:, None] == yid_ref[pl.ds(c0, bc)][None, :]
    u = jnp.where(pos, -logit, logit)       # loss = softplus(u), u = -z * l
    e = jnp.exp(-jnp.abs(logit))            # |u| = |l|; shared by softplus and sigmoid
    loss = jnp.maximum(u, 0.0) + _log1p_unit(e)
    valid = None
    if n % br:
      valid = (r0 + lax.broadcasted_iota(jnp.int32, (br, bc), 0)) < n
    if mask_cols:
      # The bound is an operand: the value-and-grad's chunks share one compiled kernel.
      cols_ok = (c0 + lax.broadcasted_iota(jnp.int32, (br, bc), 1)) < mv_ref[0]
      valid = cols_ok if valid is None else valid & cols_ok
    if valid is not None:
      loss = jnp.where(valid, loss, 0.0)
    loss_ref[i, j] = jnp.sum(loss)
    if with_grads:
      g_ref, dlt_ref, db_ref = grad_refs
      # dloss/dl = -z * sigmoid(u); sigmoid(u) from e without cancellation on either side.
      r = _reciprocal(1.0 + e, fast_math)   # 1 + e in [1, 2]: no denormals, no zero
      sig_u = jnp.where(u >= 0, r, e * r)
      g = jnp.where(pos, -sig_u, sig_u)
      if valid is not None:
        g = jnp.where(valid, g, 0.0)
      g_ref[pl.ds(r0, br), pl.ds(c0, bc)] = g.astype(g_ref.dtype)
      # (logit - bias), not a separate t * sim tile: one tile fewer live in registers
      # (ptxas: 668 B/thread of spills at 128 x 128, 8 warps, with both kept).
      dlt_ref[i, j] = jnp.sum(g * (logit - bias))
      db_ref[i, j] = jnp.sum(g)

  if col_tiles % group:
    # The last column group is partial; its spare programs do nothing (their partials
    # are sliced off by the caller).
    pl.when(j < col_tiles)(body)
  else:
    body()


def _compiler_params(bs: BlockSizes):
  return plgpu_triton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _tiles(xp, yp, xid, yid, scal, m_valid, *, bs: BlockSizes, n: int, mask_cols: bool,
           with_grads: bool, interpret: bool):
  """Run the tile kernel over padded (n_pad, d_pad) x (m_pad, d_pad) operands.

  Returns per-tile float32 partial sums of shape (row tiles, column tiles) of the loss, and
  with grads also G of shape (n_pad, m_pad) in xp.dtype and the partial sums for dlog_t
  and dbias.
  Rows from ``n`` and, if ``mask_cols``, columns from ``m_valid[0]`` (int32 (1,)) on are
  padding and are masked out.
  """
  n_pad, d_pad = xp.shape
  m_pad = yp.shape[0]
  row_tiles, col_tiles = n_pad // bs.block_rows, m_pad // bs.block_cols
  group = col_tiles if with_grads else min(bs.fwd_group, col_tiles)
  col_groups = pl.cdiv(col_tiles, group)
  if row_tiles > _MAX_GRID_YZ or col_groups > _MAX_GRID_YZ:
    raise ValueError(f"a {n_pad} x {m_pad} block needs {row_tiles} row tiles and "
                     f"{col_groups} column groups; CUDA allows {_MAX_GRID_YZ}: raise "
                     "block_rows or fwd_group")
  biggest = max(n_pad * d_pad, m_pad * d_pad, n_pad * m_pad if with_grads else 0)
  if biggest >= 2**31:
    # Element offsets inside the kernel are 32-bit.
    raise ValueError(f"an operand of the {n_pad} x {m_pad} x {d_pad} block has {biggest} "
                     "elements; the kernel indexes with int32 (< 2**31): use a smaller "
                     "grad_chunk or split the batch (e.g. over a ring)")
  operands = (xp, yp, xid, yid, scal, m_valid)
  operands, axes = vma.match_varying(operands)
  part = vma.shape_struct((row_tiles, col_groups * group), jnp.float32, axes)
  out_shape = [part]
  if with_grads:
    out_shape += [vma.shape_struct((n_pad, m_pad), xp.dtype, axes), part, part]
  kernel = functools.partial(_tile_kernel, bs=bs, n=n, mask_cols=mask_cols, group=group,
                             col_tiles=col_tiles, with_grads=with_grads,
                             fast_math=not interpret)
  flops = 2 * n_pad * m_pad * d_pad
  itemsize = xp.dtype.itemsize
  bytes_accessed = (n_pad * d_pad * itemsize * col_groups + m_pad * d_pad * itemsize
                    + (n_pad * m_pad * itemsize if with_grads else 0))
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
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=(3 if with_grads else 2)
                                    * n_pad * m_pad, bytes_accessed=bytes_accessed),
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
      raise ValueError(f"{arg} must be a 2-D (rows, dim) array, got "
                       f"{getattr(a, 'shape', type(a).__name__)}")
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
      raise TypeError(f"{arg} must be int32 of shape ({rows},), got "
                      f"{getattr(ids, 'dtype', type(ids).__name__)}"
                      f"{getattr(ids, 'shape', '')}")
  for arg, v in (("log_t", log_t), ("bias", bias)):
    if jnp.shape(v) != ():
      raise ValueError(f"{arg} must be a scalar, got shape {jnp.shape(v)}")
    if not jnp.issubdtype(jnp.result_type(v), jnp.floating):
      raise TypeError(f"{arg} must be a floating-point scalar, got {jnp.result_type(v)}")


def _resolve(block_sizes, x, y) -> BlockSizes:
  if block_sizes is None:
    return default_block_sizes(x.shape[0], y.shape[0], x.shape[1], x.dtype)
  if not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a siglip_fast.kernels.gpu.BlockSizes or None, got "
                    f"{type(block_sizes).__name__}")
  return block_sizes


def _pad(a, rows, cols=None, value=0):
  """Zero-pad (rows[, cols]); a no-op (no copy) when already that shape."""
  pr, pc = rows - a.shape[0], (cols - a.shape[1]) if a.ndim == 2 else 0
  if pr == 0 and pc == 0:
    return a
  widths = ((0, pr), (0, pc)) if a.ndim == 2 else ((0, pr),)
  return jnp.pad(a, widths, constant_values=value)


def _scalars(log_t, bias):
  return jnp.stack([jnp.asarray(log_t, jnp.float32), jnp.asarray(bias, jnp.float32)])


def _forward(x, y, x_ids, y_ids, log_t, bias, bs: BlockSizes, interpret: bool):
  n, d = x.shape
  m = y.shape[0]
  d_pad = _round_up(d, bs.block_k)
  n_pad, m_pad = _round_up(n, bs.block_rows), _round_up(m, bs.block_cols)
  (loss,) = _tiles(_pad(x, n_pad, d_pad), _pad(y, m_pad, d_pad), _pad(x_ids, n_pad),
                   _pad(y_ids, m_pad), _scalars(log_t, bias), jnp.full((1,), m, jnp.int32),
                   bs=bs, n=n, mask_cols=m_pad != m, with_grads=False, interpret=interpret)
  return jnp.sum(loss)


def _value_and_grads(x, y, x_ids, y_ids, log_t, bias, bs: BlockSizes, interpret: bool):
  """(loss sum, (dx, dy, dlog_t, dbias)), 6 n m D FLOPs; see the module docstring."""
  n, d = x.shape
  m = y.shape[0]
  rows, cols = bs.grad_tile
  bs = dataclasses.replace(bs, block_rows=rows, block_cols=cols)
  d_pad = _round_up(d, bs.block_k)
  n_pad = _round_up(n, bs.block_rows)
  # As few chunks as grad_chunk allows, each as short as possible (little padding).
  n_chunks = pl.cdiv(m, bs.grad_chunk)
  chunk = _round_up(pl.cdiv(m, n_chunks), bs.block_cols)
  m_pad = n_chunks * chunk
  xp = _pad(x, n_pad, d_pad)
  yp = _pad(y, m_pad, d_pad).reshape(n_chunks, chunk, d_pad)
  xid = _pad(x_ids, n_pad)
  yid = _pad(y_ids, m_pad).reshape(n_chunks, chunk)
  scal = _scalars(log_t, bias)
  t = jnp.exp(scal[0])
  # float32 inputs: keep the gradient matmuls in float32 (XLA:GPU would use TF32).
  precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None

  def step(carry, chunk_in):
    dx_acc, loss, dlt, db = carry
    c, y_c, id_c = chunk_in
    # Text rows of this chunk that are real (only the last chunk can be ragged).
    m_valid = jnp.minimum(m - c * chunk, chunk).reshape(1)
    loss_p, g, dlt_p, db_p = _tiles(xp, y_c, xid, id_c, scal, m_valid, bs=bs, n=n,
                                    mask_cols=m_pad != m, with_grads=True,
                                    interpret=interpret)
    dx_acc = dx_acc + jnp.dot(g, y_c, precision=precision,
                              preferred_element_type=jnp.float32)
    dy_c = jnp.einsum("nc,nd->cd", g, xp, precision=precision,
                      preferred_element_type=jnp.float32)
    carry = (dx_acc, loss + jnp.sum(loss_p), dlt + jnp.sum(dlt_p), db + jnp.sum(db_p))
    return carry, (t * dy_c).astype(y.dtype)

  zero = jnp.zeros((), jnp.float32)
  init = (jnp.zeros((n_pad, d_pad), jnp.float32), zero, zero, zero)
  # Under shard_map the carry varies over the mesh axes the operands vary over.
  axes = frozenset().union(*map(vma.varying_axes, (x, y, x_ids, y_ids, scal)))
  init = tuple(vma.pvary(a, axes) for a in init)
  (dx_acc, loss, dlt, db), dy = lax.scan(
      step, init, (jnp.arange(n_chunks, dtype=jnp.int32), yp, yid))
  dx = (t * dx_acc[:n, :d]).astype(x.dtype)
  dy = dy.reshape(m_pad, d_pad)[:m, :d]
  return loss, (dx, dy, vma.sum_to_match(dlt, log_t), vma.sum_to_match(db, bias))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _block_loss_sum(x, y, x_ids, y_ids, log_t, bias, bs, interpret):
  return _forward(x, y, x_ids, y_ids, log_t, bias, bs, interpret)


def _block_loss_sum_fwd(x, y, x_ids, y_ids, log_t, bias, bs, interpret):
  # The loss is a scalar: its gradients come out of the value-and-grad pass and the
  # backward only scales them (6 B^2 D FLOPs in all, no second trip).
  loss, grads = _value_and_grads(x, y, x_ids, y_ids, log_t, bias, bs, interpret)
  dlt, db = grads[2].astype(jnp.result_type(log_t)), grads[3].astype(jnp.result_type(bias))
  return loss, (grads[0], grads[1], dlt, db)


def _block_loss_sum_bwd(bs, interpret, res, ct):
  del bs, interpret
  dx, dy, dlt, db = ((g * ct).astype(g.dtype) for g in res)
  return dx, dy, None, None, dlt, db


_block_loss_sum.defvjp(_block_loss_sum_fwd, _block_loss_sum_bwd)


def block_loss_sum(x, y, x_ids, y_ids, log_t, bias, *, block_sizes: BlockSizes | None = None,
                   interpret: bool = False) -> jax.Array:
  """Fused ``reference.dense.block_loss_sum``: float32 scalar, differentiable in x, y,
  log_t and bias (custom VJP; the forward under ``grad`` runs the value-and-grad kernels).

  x: (n, D), y: (m, D), float32 or bfloat16 (same dtype); x_ids: (n,), y_ids: (m,) int32;
  log_t, bias: floating scalars. ``interpret=True`` runs on CPU.
  """
  _check(x, y, x_ids, y_ids, log_t, bias)
  bs = _resolve(block_sizes, x, y)
  return _block_loss_sum(x, y, x_ids, y_ids, log_t, bias, bs, interpret)


def block_loss_sum_and_grads(x, y, x_ids, y_ids, log_t, bias, *,
                             block_sizes: BlockSizes | None = None, interpret: bool = False):
  """(loss sum, (dx, dy, dlog_t, dbias)) in one pass; dx, dy in the dtypes of x, y,
  dlog_t and dbias float32 scalars (``reference.ring.BlockOps`` contract)."""
  _check(x, y, x_ids, y_ids, log_t, bias)
  bs = _resolve(block_sizes, x, y)
  return _value_and_grads(x, y, x_ids, y_ids, log_t, bias, bs, interpret)


def block_ops(*, interpret: bool = False, block_sizes: BlockSizes | None = None,
              target=None) -> ring_lib.BlockOps:
  """The GPU kernels as a ``BlockOps`` for ``reference.ring`` / ``siglip_fast.sigmoid_loss``.

  block_sizes=None picks ``default_block_sizes`` for each block's shape (the defaults
  depend on the shape only, not on ``target``, the ``siglip_fast.target.Target``).
  """
  del target
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a siglip_fast.kernels.gpu.BlockSizes or None, got "
                    f"{type(block_sizes).__name__}")
  kw = dict(block_sizes=block_sizes, interpret=interpret)
  return ring_lib.BlockOps("pallas_gpu", functools.partial(block_loss_sum, **kw),
                           functools.partial(block_loss_sum_and_grads, **kw))

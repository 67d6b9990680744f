"""What the Mosaic TPU kernels share: the elementwise math of a logits tile, the kernel
scalars, and the chips' vector-register and VMEM facts (``tpu.py`` blocks, ``tpu_ring.py``).

The tile math works in base-2 units: the kernels receive t * log2(e) and bias * log2(e), so
their logits tile is v = log2(e) * l and the exponential is the EUP's exp2 with no
per-element rescaling. With e = 2^-|v|:

    softplus(l) / ln 2 = max(v, 0) + log2(e) ln(1 + e)   (the loss of a negative pair)
    softplus(-l)       = softplus(l) - l                 (a positive subtracts v)
    sigmoid(l)         = [1 if v >= 0 else e] / (1 + e)   (= 1 / (1 + 2^-v) without a loss)
    G                  = sigmoid(l) - [positive]

The two parts of the softplus are summed apart and combined once per tile (ln(1 + e) as the
log of a product, ``ln1p_sum``); the loss sums come out in log2 units and are scaled by ln 2
once, outside the kernel.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

LANES = 128
SUBLANES = 8
MiB = 1 << 20
LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453
# Row groups (of 8 rows) whose ln(1 + e) terms ``ln1p_sum`` multiplies together before one
# logarithm: (1 + e) <= 2 keeps the product below 2^32, far from float32's 2^128.
LN1P_CHUNK = 32

# Per-TensorCore VMEM (bytes) of the generations with tuned defaults.
VMEM_CAPACITY = {"v4": 16 * MiB, "v5e": 128 * MiB, "v5p": 64 * MiB, "v6e": 128 * MiB}
# The share of a TensorCore's VMEM a tile plan may fill by the kernels' VMEM models; the rest
# is the compiler's (its internal scratch, layout padding, what the models leave out).
VMEM_BUDGET = 0.75


def vmem_limit(est: int, capacity: int | None = None) -> int:
  """The VMEM limit a kernel compiles with for a modelled ``est`` bytes: a quarter again plus
  4 MiB of headroom for what the model leaves out, never below v4's and v5e's 16 MiB scoped
  default, never above ``capacity`` (the TensorCore's VMEM; None, no chip known: the largest
  chip's). No more: what a kernel's limit leaves, XLA may use to keep arrays in VMEM between
  its ops."""
  capacity = capacity or max(VMEM_CAPACITY.values())
  return min(round_up(max(est * 5 // 4 + 4 * MiB, 16 * MiB), MiB), capacity)


def round_up(v: int, m: int) -> int:
  return -(-v // m) * m


def sublanes(dtype) -> int:
  """Rows of a vreg for ``dtype``: 8 for 32-bit, 16 for bf16 (packed)."""
  return SUBLANES * (4 // jnp.dtype(dtype).itemsize)


def precision(dtype):
  """A TPU's default f32 matmul rounds the operands to bf16: f32 inputs ask for f32
  products; bf16 inputs stay bf16 on the MXU with f32 accumulation."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def kernel_scalars(log_t, bias):
  """(t, [t log2(e), bias log2(e), t, 1]): t for the caller, the SMEM scalars for the
  kernels: the logits' scale and offset, t itself (for d logits / d a = t b), and 1.0 as a
  run-time value for ``tile_terms`` (see there)."""
  t = jnp.exp(jnp.reshape(log_t, ()).astype(jnp.float32))
  bias = jnp.reshape(bias, ()).astype(jnp.float32)
  return t, jnp.stack([t * LOG2_E, bias * LOG2_E, t, jnp.float32(1.0)])


def tile_id_ranges(ids, size: int, n_valid: int):
  """(2, len(ids) / size) int32: each tile's [min id, max id] over its first ``n_valid`` (real,
  unpadded) rows. A kernel runs its lean tile body where an A tile's and a B tile's ranges
  cannot meet and neither holds padding."""
  ids = ids.reshape(-1)
  real = jnp.arange(ids.shape[0]) < n_valid
  info = jnp.iinfo(jnp.int32)
  lo = jnp.where(real, ids, info.max).reshape(-1, size).min(axis=1)
  hi = jnp.where(real, ids, info.min).reshape(-1, size).max(axis=1)
  return jnp.stack([lo, hi])


def neg_abs(v):
  """-|v| of a float32 array in one vector op (the sign bit set), not an abs and a negate."""
  bits = lax.bitcast_convert_type(v, jnp.uint32) | jnp.uint32(0x80000000)
  return lax.bitcast_convert_type(bits, jnp.float32)


def tile_terms(v, one, *, pos=None, valid=None, with_loss: bool, with_grad: bool):
  """(loss terms (sp, e, s), G) of a float32 tile of base-2 logits ``v``; the terms or G
  are None when not asked for. A pair's loss / ln 2 is sp + log2(e) ln(1 + e): sp, in
  base-2 units, is max(v, 0) (minus v for a positive); e = 2^-|v| (0 at padding) and the
  rounded s = 1 + e that G divides by (1 at padding) go to ``ln1p_sum``, which sums
  ln(1 + e) without a logarithm per element.

  ``one`` is 1.0 read at run time (``kernel_scalars``), not a literal: XLA's algebraic
  simplifier rewrites (e + 1) - 1 to e for a constant 1, which would drop a rounding error
  in interpret mode (the kernel body run through XLA) while Mosaic keeps it on a TPU.

  pos: None (no positive in the tile) or a bool mask broadcastable to v; valid: None (no
  padding) or a bool mask of the real pairs. Tiles with neither skip those selects.
  """
  loss = g = None
  if with_loss:
    e = jnp.exp2(neg_abs(v))
    s = one + e
    sp = jnp.maximum(v, 0.0)
    ln_e, ln_s = e, s
    if pos is not None:
      sp = sp - jnp.where(pos, v, 0.0)
    if valid is not None:
      sp = jnp.where(valid, sp, 0.0)
      ln_e, ln_s = jnp.where(valid, e, 0.0), jnp.where(valid, s, one)
    loss = (sp, ln_e, ln_s)
  if with_grad:
    if with_loss:
      g = jnp.where(v >= 0.0, 1.0, e) / s
    else:
      # No loss to share e with: 1 / (1 + 2^-v) needs no select. 2^-v is inf below v = -128,
      # where the sigmoid is under float32's normal range and the TPU flushes it to 0 anyway.
      g = one / (one + jnp.exp2(-v))
    if pos is not None:
      g = jnp.where(pos, g - 1.0, g)
    if valid is not None:
      g = jnp.where(valid, g, 0.0)
  return loss, g


def in_row_strips(n: int, logits_terms, gradients):
  """A tile body in ``n`` row strips: strip k's ``gradients(k, *logits_terms(k))`` (its
  gradient matmuls and sums) written after strip k + 1's ``logits_terms`` (its logits
  matmul and elementwise work). libtpu schedules a basic block's MXU work early and its
  vector work late: a whole tile runs its elementwise phase with the MXU mostly idle, then
  the gradient matmuls with the VPU mostly idle. Strip k's matmuls are independent of
  strip k + 1's elementwise work, so the scheduler can issue the two side by side (in a
  forward, strip k + 1's logits matmul beside strip k's elementwise work)."""
  pending = logits_terms(0)
  for k in range(1, n + 1):
    ahead = logits_terms(k) if k < n else None
    gradients(k - 1, *pending)
    pending = ahead


def through_vmem(ref, v):
  """``v`` stored to the VMEM ``ref`` and read back: a row strip's logits in the tiles that
  make dX in strips (``in_row_strips``; a two-slot buffer, strip k in slot k mod 2, so that
  strip k + 1's matmul need not wait for strip k's reads). The same numbers, a store and a
  load a vreg, in slots the VALU-bound elementwise work leaves free, and libtpu's schedule
  of the strips comes out shorter: v6e's fused kernel 1-3% a step, its dX kernel 2%, the
  ring's dX trip 7-8% (static profile, bf16, D = 768 and 1152). The forward, with no
  gradient matmuls beside its elementwise work, is up to 4% longer that way and keeps its
  logits in registers."""
  ref[...] = v
  return ref[...]


def ln1p_sum(e, s, one, chunk: int = LN1P_CHUNK):
  """(8, cols) float32: the sums over a (rows, cols) tile's row groups of ln(1 + e), for
  0 <= e <= 1, each of the 8 sublanes holding its rows' share.

  Not a logarithm per element: ln(1 + e_1) + ... + ln(1 + e_n) = ln((1 + e_1) ... (1 + e_n)),
  and q = (1 + e_1) ... (1 + e_k) - 1 runs as q <- q s_k + e_k with ``s`` the tile's rounded
  1 + e (which G divides by anyway; ``tile_terms`` returns it, 1 at padding): two vector
  ops per element, against six for ln(s) with its rounding correction and a sum (Mosaic's
  ln is its base-2 log times ln 2, and the EUP push takes a VALU slot too). s_k's rounding
  is one float32 rounding more per factor, as in any product; below e = 2^-24, s_k is 1
  and q gathers e_k exactly. q is carried down ``chunk`` row groups (8 rows each), so it
  stays below 2^chunk, then one ln per chunk:
  ln(1 + q) = ln(p) + ln(1 + c / p) for the rounded p = 1 + q and its exact rounding error
  c = q - (p - 1), with ln(1 + c / p) ~ c / p. q is a float32 sum of products, accurate to
  a few float32 roundings in the chunk's length, also where every e is below 2^-24 (there
  1 + q rounds to 1 and q is the plain sum of the e's, which a ln per element of a rounded
  1 + e would lose).
  """
  rows, cols = e.shape
  e = e.reshape(rows // SUBLANES, SUBLANES, cols)
  s = s.reshape(e.shape)
  total = None
  for start in range(0, e.shape[0], chunk):
    q = e[start]
    for k in range(start + 1, min(start + chunk, e.shape[0])):
      q = q * s[k] + e[k]
    p = one + q
    part = jnp.log(p) + (q - (p - one)) / p
    total = part if total is None else total + part
  return total


def transcendentals(logits: int, rows: int, cols: int, *, with_loss: bool, with_g: bool) -> int:
  """EUP ops of ``logits`` logits in (rows, cols) tiles, for cost estimates: exp2 per logit,
  a reciprocal more for G, and with the loss ``ln1p_sum``'s log and reciprocal per chunk,
  sublane and column of each tile."""
  per_tile = 2 * SUBLANES * cols * -(-rows // (SUBLANES * LN1P_CHUNK))
  return logits * (1 + int(with_g)) + int(with_loss) * logits // (rows * cols) * per_tile

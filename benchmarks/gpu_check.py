"""Full-size correctness of the Pallas GPU kernels against the XLA reference, on the GPU.

    python -m benchmarks.gpu_check                     # on the H100 / H200: the first step
    python -m benchmarks.gpu_check --cases 64x32:bfloat16 --interpret    # CPU smoke

For every case (B x D and dtype; by default B = 32768 and 16384 at D = 1152 in bf16 and f32,
plus ragged B with repeated pair ids) it runs, compiled:
  - ``kernels.gpu.block_loss_sum`` (the forward kernel) and ``block_loss_sum_and_grads``
    against ``reference.dense.block_loss_sum_and_grads``, at highest matmul precision so
    that the float32 reference is IEEE (XLA:GPU would otherwise use TF32);
  - with ``:api``, also ``jax.value_and_grad`` of ``sigmoid_loss(...,
    implementation="pallas_gpu")`` under jit against the same of ``sigmoid_loss_dense``.
Relative errors are printed. Tolerances: the loss 1e-5 (float32 epilogue; bf16 products are
exact in float32); bfloat16 dx, dy 1e-2 (G is rounded to bf16); float32 dx, dy 2e-5: the
kernel's float32 dots are bf16x3 (each operand kept to ~16 bits, lo * lo dropped: a dot of
random-sign terms within ~2^-17 = 7.6e-6 of its size), and dx, dy go through two of them in
sequence (the logits, then the gradient matmul), so ~1.5e-5 is the expected worst: 2e-5.
(Interpret mode, where the same splits run on the CPU, passes 1e-5 on the test shapes.)
dlog_t and dbias are sums of B^2 terms that can cancel, so their error is taken relative to
the sum of the terms' magnitudes (computed by the reference), 1e-5 for both.
Exits 1 if any check fails, 2 if no GPU (without --interpret).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from siglip_fast import loss as loss_api
from siglip_fast.kernels import gpu
from siglip_fast.reference import dense

# The benchmark's target shape first (B = 32768, D = 1152: XLA's dense reference needs 12 GiB),
# then float32 (bf16x3) and ragged, duplicated ids through the public API.
DEFAULT_CASES = (
  "32768x1152:bfloat16:api",
  "16384x1152:float32",
  "12345x768:bfloat16:dup:api",
  "8192x768:float32:dup",
)
LOG_T, BIAS = math.log(10.0), -10.0


def rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(batch, dim, dtype, dup, seed):
  kx, ky, ki = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, dim), jnp.float32)
  y = jax.random.normal(ky, (batch, dim), jnp.float32)
  x = (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)
  y = (y / jnp.linalg.norm(y, axis=-1, keepdims=True)).astype(dtype)
  ids = (jax.random.randint(ki, (batch,), 0, batch // 2) if dup else jnp.arange(batch)).astype(
    jnp.int32
  )
  return x, y, ids


@jax.jit
def term_scales(x, y, ids, log_t, bias):
  """sum|g * (l - b)| and sum|g|: what float32 sums for dlog_t and dbias are accurate to."""
  sim = jnp.einsum(
    "nd,md->nm", x, y, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
  )
  t = jnp.exp(log_t)
  g = jax.nn.sigmoid(t * sim + bias) - (ids[:, None] == ids[None, :])
  return jnp.sum(jnp.abs(g * t * sim)), jnp.sum(jnp.abs(g))


def check_case(batch, dim, dtype, dup, seed, interpret, with_api):
  x, y, ids = inputs(batch, dim, dtype, dup, seed)
  lt, b = jnp.float32(LOG_T), jnp.float32(BIAS)
  kw = dict(interpret=interpret)
  t0 = time.perf_counter()
  fwd = jax.jit(lambda *a: gpu.block_loss_sum(*a, **kw))(x, y, ids, ids, lt, b)
  loss, grads = jax.jit(lambda *a: gpu.block_loss_sum_and_grads(*a, **kw))(x, y, ids, ids, lt, b)
  with jax.default_matmul_precision("highest"):
    ref_loss, ref_grads = jax.jit(dense.block_loss_sum_and_grads)(x, y, ids, ids, lt, b)
    scales = term_scales(x, y, ids, lt, b)
  pairs = [("block", (loss, grads), (ref_loss, ref_grads), 1)]
  if with_api:
    api = jax.jit(
      jax.value_and_grad(
        lambda x, y, lt, b: loss_api.sigmoid_loss(
          x, y, lt, b, pair_ids=ids, implementation="pallas_gpu", **kw
        ),
        argnums=(0, 1, 2, 3),
      )
    )(x, y, lt, b)
    with jax.default_matmul_precision("highest"):
      api_ref = jax.jit(
        jax.value_and_grad(
          lambda x, y, lt, b: dense.sigmoid_loss_dense(x, y, lt, b, ids), argnums=(0, 1, 2, 3)
        )
      )(x, y, lt, b)
    pairs.append(("api", api, api_ref, batch))
  jax.block_until_ready((fwd, pairs))
  secs = time.perf_counter() - t0

  emb_tol = 1e-2 if dtype == jnp.bfloat16 else 2e-5
  errs, tols = {}, {}

  def scalar_err(a, r, scale):
    return abs(float(a) - float(r)) / max(float(scale), 1e-30)

  for prefix, (l_, g_), (rl, rg), norm in pairs:
    errs[f"{prefix}.loss"], tols[f"{prefix}.loss"] = rel(l_, rl), 1e-5
    for k, a, r in (("dx", g_[0], rg[0]), ("dy", g_[1], rg[1])):
      errs[f"{prefix}.{k}"], tols[f"{prefix}.{k}"] = rel(a, r), emb_tol
    errs[f"{prefix}.dlog_t"] = scalar_err(g_[2], rg[2], scales[0] / norm)
    errs[f"{prefix}.dbias"] = scalar_err(g_[3], rg[3], scales[1] / norm)
    tols[f"{prefix}.dlog_t"] = tols[f"{prefix}.dbias"] = 1e-5
  errs["fwd.loss"], tols["fwd.loss"] = rel(fwd, ref_loss), 1e-5
  finite = all(
    bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves((fwd, [p[1] for p in pairs]))
  )
  ok = finite and all(errs[k] < tols[k] for k in errs)
  return ok, finite, errs, tols, secs


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--cases",
    default=",".join(DEFAULT_CASES),
    help="comma-separated BxD:dtype[:dup][:api] (dup: repeated pair ids; api: "
    "also through sigmoid_loss under value_and_grad)",
  )
  p.add_argument("--interpret", action="store_true", help="interpret mode (CPU smoke)")
  args = p.parse_args(argv)
  if jax.default_backend() != "gpu" and not args.interpret:
    print(f"no GPU (backend {jax.default_backend()!r}); pass --interpret for a CPU smoke run")
    return 2
  dev = jax.devices()[0]
  print(f"gpu_check: {getattr(dev, 'device_kind', dev)} jax {jax.__version__}", flush=True)
  failed = 0
  for k, case in enumerate(args.cases.split(",")):
    size, dtype_name, *flags = case.split(":")
    batch, dim = (int(v) for v in size.lower().split("x"))
    dtype = jnp.dtype(dtype_name)
    try:
      ok, finite, errs, tols, secs = check_case(
        batch, dim, dtype, "dup" in flags, 100 + k, args.interpret, "api" in flags
      )
    except Exception as e:  # noqa: BLE001 - report every case
      failed += 1
      print(f"[FAIL] {case}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
      continue
    failed += not ok
    worst = ", ".join(
      f"{name} {e:.1e}{'' if e < tols[name] else ' (> ' + str(tols[name]) + ')'}"
      for name, e in errs.items()
    )
    print(f"[{'ok' if ok else 'FAIL'}] {case} ({secs:.1f}s, finite={finite}): {worst}", flush=True)
  print(f"gpu_check: {'all passed' if not failed else f'{failed} case(s) FAILED'}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

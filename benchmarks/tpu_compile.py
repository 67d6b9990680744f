"""AOT-compile the Pallas TPU SigLIP kernels for v4, v5e, v5p and v6e on a CPU-only machine.

    python -m benchmarks.tpu_compile [--batch 16384] [--dims 768 1152 1536] [--out PATH]

Uses libtpu's compile-only topologies (docs/DESIGN.md section 5, level 2): the real Mosaic and XLA
TPU compilers run, nothing executes. For every (generation, D, dtype) it compiles the forward
(``loss_sum``) and the value-and-grad (``loss_sum_and_grads``) with the generation's default
``BlockSizes`` and records

  - VMEM per kernel: the smallest VMEM limit Mosaic compiles it under (found by compiling
    each kernel under a tiny limit and raising it by the excess the out-of-VMEM error reports),
    next to the kernel's own model (``vmem_bytes``) and the limit it compiles with;
  - HBM temp bytes from ``compiled.memory_analysis()`` (a B x B float32 would be 4 B^2);
  - cost-analysis FLOPs, transcendentals and bytes next to the analytic count: 2 B^2 D for
    the forward, 6 B^2 D for the fused value-and-grad (resident dY, where it fits VMEM; the
    two-kernel variant is compiled beside it) or 8 B^2 D for the two-kernel one;
  - a modelled time, max(FLOPs / peak, bytes / HBM bandwidth) from the chip's datasheet
    figures. MODELLED, not measured: no TPU here, and it ignores the VPU/EUP work.

and writes benchmarks/results/tpu_compile_<date>.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Compile-only libtpu in several processes at once (other tests, other scripts).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from siglip_fast.kernels import tpu  # noqa: E402

TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
# Per chip (one jax device; megacore chips count both TensorCores): bf16 FLOP/s, HBM B/s.
# The figures jax's pallas tpu_info carries, i.e. the datasheets.
PEAK = {
  "v4": (2.75e14, 1.23e12),
  "v5e": (1.97e14, 8.2e11),
  "v5p": (4.59e14, 2.46e12),
  "v6e": (9.20e14, 1.64e12),
}
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _sds(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _fused_call(bs, batch, dim, dtype):
  """(cols, cores, tiles, chained) of the fused value-and-grad's largest call as the API
  plans it (``tpu._super_blocks``): column tile, TensorCores sharing the call, its column
  tiles, and whether it reads the previous call's float32 partial dX."""
  splits = tpu._fused_plan(bs, batch, batch, dim, dtype)[1]
  cols, cores, counts = tpu._super_blocks(bs, batch, splits)
  return cols, cores, counts[0], len(counts) > 1


def _kernel_vmem(gen, kind, batch, dim, dtype, sharding, bs):
  """The smallest VMEM limit (bytes) one kernel compiles under: its scoped VMEM use.

  Compiles the kernel alone under a tiny limit; Mosaic's out-of-VMEM error says by how much
  the failing allocation exceeded it, so raise the limit by that (plus rounding slack) and
  retry until it compiles. Within ~16 KiB per allocation of the true figure. None if the
  error does not have the expected form.
  """
  rows, cols = (bs.block_rows, bs.block_cols) if kind != "dy" else bs.dy_tiles
  flags = {
    "fwd": (True, False, False, False),
    "fwd_dx": (True, True, True, False),
    "dy": (False, False, True, False),
    "fwd_dx_dy": (True, True, True, True),
  }
  with_loss, with_scalar_grads, with_grad, with_db = flags[kind]
  cores, tiles, chained = 1, None, False
  if with_db:  # the fused kernel's largest call, reading a partial dX where calls chain
    cols, cores, tiles, chained = _fused_call(bs, batch, dim, dtype)
  emb = _sds((batch, dim), dtype, sharding)
  ids = _sds((batch,), jnp.int32, sharding)
  partial = (_sds((cores, tpu.mc.round_up(batch, rows), dim), jnp.float32, sharding),)
  limit = 64 << 10
  for _ in range(12):

    def one_kernel(a, b, ia, ib, scal, *da_in, limit=limit):
      # The private single-kernel entry, so that each kernel is measured alone.
      return tpu._tile_pass(
        tpu._pad_rows(a, rows),
        tpu._pad_rows(b, cols * (tiles or 1)),
        ia,
        ib,
        scal,
        rows=rows,
        cols=cols,
        with_loss=with_loss,
        with_scalar_grads=with_scalar_grads,
        with_grad=with_grad,
        with_db=with_db,
        cores=cores,
        col_tiles=(0, tiles) if tiles else None,
        da_in=da_in[0] if da_in else None,
        generation=gen,
        vmem_limit_bytes=limit,
        interpret=False,
        name=f"probe_{kind}",
      )

    args = (emb, emb, ids, ids, _sds((4,), jnp.float32, sharding)) + (partial if chained else ())
    try:
      jax.jit(one_kernel).lower(*args).compile()
      return limit
    except Exception as e:  # noqa: BLE001 - the out-of-VMEM error is the measurement
      total = re.search(r"Program vmem requirement ([\d.]+)([KMG])", str(e))
      if total:  # beyond the chip's VMEM: the compiler gives the whole requirement
        return int(float(total.group(1)) * _UNITS[total.group(2)])
      m = re.search(r"exceeded scoped vmem limit by ([\d.]+)([KMG])", str(e))
      if not m:
        print(f"  vmem probe {kind}: unexpected error: {str(e)[:300]}", file=sys.stderr)
        return None
      limit += int(float(m.group(1)) * _UNITS[m.group(2)]) + (16 << 10)
  return None


def compile_case(gen, batch, dim, dtype):
  """Compile the forward and value-and-grad at the defaults (and the two-kernel value-and-grad
  too where the default is the fused kernel)."""
  topo = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[gen])
  device = topo.devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  bs = tpu.BlockSizes.for_generation(gen, dim, dtype)
  fwd_bs = tpu.forward_block_sizes(gen, dim=dim, dtype=dtype)  # the forward's own tiles
  emb = _sds((batch, dim), dtype, sharding)
  ids = _sds((batch,), jnp.int32, sharding)
  scalar = _sds((), jnp.float32, sharding)
  peak, bw = PEAK[gen]
  rows_dy, cols_dy = bs.dy_tiles
  fused, splits = tpu._fused_plan(bs, batch, batch, dim, dtype)
  fused_cols, cores, tiles, _ = _fused_call(bs, batch, dim, dtype)
  model = {
    "fwd": tpu.vmem_bytes(fwd_bs.block_rows, fwd_bs.block_cols, dim, dtype, with_grad=False),
    "fwd_dx": tpu.vmem_bytes(bs.block_rows, bs.block_cols, dim, dtype, with_grad=True, n_stats=3),
    "dy": tpu.vmem_bytes(rows_dy, cols_dy, dim, dtype, with_grad=True),
    "fwd_dx_dy": tpu.vmem_bytes(
      bs.block_rows,
      fused_cols,
      dim,
      dtype,
      with_grad=True,
      n_stats=3,
      resident_rows=tiles // cores * fused_cols,
      chained=splits > 1,
    ),
  }
  two = dataclasses.replace(bs, fuse_dy=False)
  cases = [("forward", tpu.loss_sum, fwd_bs, 2, ("fwd",))]
  if fused:
    cases.append(("value_and_grad", tpu.loss_sum_and_grads, bs, 6, ("fwd_dx_dy",)))
    cases.append(("value_and_grad_two_kernel", tpu.loss_sum_and_grads, two, 8, ("fwd_dx", "dy")))
  else:
    cases.append(("value_and_grad", tpu.loss_sum_and_grads, bs, 8, ("fwd_dx", "dy")))
  out = []
  for name, fn, case_bs, factor, kernels in cases:
    analytic = factor * batch * batch * dim
    t0 = time.perf_counter()
    rec = {
      "generation": gen,
      "device_kind": device.device_kind,
      "batch": batch,
      "dim": dim,
      "dtype": jnp.dtype(dtype).name,
      "pass": name,
      "design": {
        2: "forward",
        6: f"fused (resident dY, {splits} super-block{'s' * (splits > 1)})",
        8: "two kernels",
      }[factor],
      "block_sizes": {
        "block_rows": case_bs.block_rows,
        "block_cols": case_bs.block_cols,
        "block_rows_dy": case_bs.dy_tiles[0],
        "block_cols_dy": case_bs.dy_tiles[1],
      },
      "analytic_flops": analytic,
    }
    try:
      compiled = (
        jax.jit(lambda *a, fn=fn, b=case_bs: fn(*a, block_sizes=b))
        .lower(emb, emb, ids, ids, scalar, scalar)
        .compile()
      )
    except Exception as e:  # noqa: BLE001 - a failed compile is a result to report
      rec.update(ok=False, error=str(e)[:2000])
      out.append(rec)
      print(f"{gen} D={dim} {rec['dtype']} {name}: COMPILE FAILED: {str(e)[:300]}")
      continue
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    ma = compiled.memory_analysis()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    hlo = compiled.as_text()
    rec.update(
      ok=True,
      temp_bytes=int(ma.temp_size_in_bytes),
      bxb_f32_bytes=4 * batch * batch,
      bxb_shape_in_hlo=f"[{batch},{batch}]" in hlo,
      cost_flops=int(ca.get("flops", -1)),
      cost_transcendentals=int(ca.get("transcendentals", -1)),
      cost_bytes_accessed=int(ca.get("bytes accessed", -1)),
      vmem={
        k: {
          "mosaic_scoped_bytes": _kernel_vmem(gen, k, batch, dim, dtype, sharding, case_bs),
          "model_bytes": model[k],
          "limit_bytes": tpu._vmem_limit(model[k], gen, None),
        }
        for k in kernels
      },
    )
    rec["modelled_ms"] = round(
      1e3 * max(rec["cost_flops"] / peak, rec["cost_bytes_accessed"] / bw), 3
    )
    out.append(rec)
    mib = lambda v: f"{v / 2**20:.1f}" if v else "?"
    vm = ", ".join(
      f"{k} {mib(v['mosaic_scoped_bytes'])} MiB (model {mib(v['model_bytes'])}, "
      f"limit {mib(v['limit_bytes'])})"
      for k, v in rec["vmem"].items()
    )
    print(
      f"{gen} D={dim} {rec['dtype']} {name} [{rec['design']}]: ok in {rec['compile_s']} s; "
      f"VMEM {vm}; "
      f"temp {rec['temp_bytes'] / 2**20:.1f} MiB (B x B f32 would be "
      f"{rec['bxb_f32_bytes'] / 2**30:.1f} GiB); FLOPs cost {rec['cost_flops']:.4g} vs "
      f"analytic {analytic:.4g}; modelled {rec['modelled_ms']} ms",
      flush=True,
    )
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=16384)
  p.add_argument("--dims", type=int, nargs="+", default=[768, 1152, 1536])
  p.add_argument("--generations", nargs="+", default=list(TOPOLOGIES))
  p.add_argument(
    "--f32-dim", type=int, default=1152, help="also compile float32 inputs at this D (0: skip)"
  )
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)

  results = []
  for gen in args.generations:
    for dim in args.dims:
      results.extend(compile_case(gen, args.batch, dim, jnp.bfloat16))
    if args.f32_dim:
      results.extend(compile_case(gen, args.batch, args.f32_dim, jnp.float32))

  today = datetime.date.today().isoformat()
  report = {
    "date": today,
    "jax": jax.__version__,
    "jaxlib": importlib.metadata.version("jaxlib"),
    "libtpu": importlib.metadata.version("libtpu"),
    "note": (
      "Compile-only (libtpu topologies, JAX_PLATFORMS=cpu). modelled_ms is "
      "max(FLOPs/peak, bytes/HBM bandwidth) from datasheet figures: MODELLED, "
      "not measured. mosaic_scoped_bytes: Mosaic's scoped VMEM allocation of "
      "the kernel: the smallest VMEM limit it compiles under, found by raising "
      "the limit by the excess its out-of-VMEM errors report."
    ),
    "results": results,
  }
  path = (
    pathlib.Path(args.out)
    if args.out
    else (pathlib.Path(__file__).resolve().parent / "results" / f"tpu_compile_{today}.json")
  )
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(report, indent=1) + "\n")
  failed = [r for r in results if not r["ok"]]
  print(f"wrote {path}; {len(results) - len(failed)} compiled, {len(failed)} failed")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

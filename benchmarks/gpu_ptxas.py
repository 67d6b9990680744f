"""Compiled-code evidence for the GPU kernels on a machine with no GPU: registers, spills and
shared memory of every default kernel configuration, compiled for Hopper (sm_90a).

    python -m benchmarks.gpu_ptxas                       # the full table (a few minutes)
    python -m benchmarks.gpu_ptxas --shapes 4096x768     # one shape
    python -m benchmarks.gpu_ptxas --out benchmarks/results/gpu_ptxas_<date>.json

How: each entry point is lowered for CUDA on the CPU (``lowering_platforms=("cuda",)``);
the Triton IR that Pallas embeds in each ``__gpu$xla.gpu.triton`` custom call (MLIR
bytecode) is read back as text with jaxlib's Triton dialect, then compiled by the ``triton``
package (``triton.compile`` with ``GPUTarget("cuda", 90, 32)``: TTIR -> TTGIR -> LLVM -> PTX
-> cubin) and the PTX is assembled again by Triton's own ``ptxas -v --gpu-name sm_90a``
for its resource report. Reported per kernel: registers per thread, spill stores/loads and
stack frame (ptxas), dynamic shared memory (Triton's metadata; Hopper allows 227 KiB per
block), and the PTX instruction mix that shows what ran where: ``wgmma`` (Hopper
tensor-core MMA), ``mma.sync`` (older tensor-core MMA), ``fma.rn.f32`` (CUDA-core FMA: an
IEEE float32 dot would show thousands), ``ex2.approx`` and ``rcp.approx`` (the fast-math
epilogue), ``div.rn.f32`` (an IEEE division: none expected).

Caveat: XLA compiles the same Triton IR with its own bundled Triton, not the PyPI package
used here, so these are close, not identical, to what runs on the device (same MLIR input,
same pass pipeline family). The device run (``benchmarks/run_gpu.sh``) is the ground truth.

Exit code 1 if a default configuration spills or needs more than 227 KiB of shared memory;
2 if the ``triton`` package is missing (``pip install -e ".[dev]"`` brings it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from siglip_fast.kernels import gpu

# Hopper: 228 KiB of shared memory per SM, 227 KiB of it usable by one block.
SMEM_LIMIT = 227 * 1024
DEFAULT_SHAPES = (
  "4096x768",
  "4096x1152",
  "8192x768",
  "8192x1152",
  "16384x768",
  "16384x1152",
  "32768x768",
  "32768x1152",
)
BIG = "1048576x768"
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
_PTX_COUNTS = {
  "wgmma": r"\bwgmma\.mma_async",
  "mma_sync": r"\bmma\.sync",
  "fma_f32": r"\bfma\.rn\.f32",
  "ex2_approx": r"\bex2\.approx",
  "rcp_approx": r"\brcp\.approx",
  "div_rn_f32": r"\bdiv\.rn\.f32",
  "lg2_approx": r"\blg2\.approx",
}


def triton_available() -> str | None:
  """None if the triton package and its ptxas are usable here, else why not."""
  try:
    import triton  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    from triton.backends.nvidia import compiler  # pylint: disable=g-import-not-at-top

    compiler.get_ptxas(90)
  except Exception as e:  # noqa: BLE001
    return f"the triton package (with its ptxas) is not usable: {type(e).__name__}: {e}"
  return None


def _walk(op, out):
  for region in op.regions:
    for block in region.blocks:
      for child in block.operations:
        if child.operation.name == "stablehlo.custom_call":
          out.append(child)
        _walk(child.operation, out)


def triton_kernels(fn, *args):
  """[(name, ttir text, num_warps, num_stages, grid)] of the Pallas-Triton kernels that
  ``jax.jit(fn)`` lowers to for CUDA, with abstract ``args``."""
  # pylint: disable=g-import-not-at-top
  from jax._src.interpreters import mlir as jax_mlir
  from jax._src.lib.mlir import ir
  from jax._src.lib.triton import dialect as tt_dialect

  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  calls = []
  _walk(lowered.compiler_ir("stablehlo").operation, calls)
  ctx = jax_mlir.make_ir_context()
  tt_dialect.register_dialect(ctx)
  out = []
  for call in calls:
    if str(call.attributes["call_target_name"]).strip('"') != "__gpu$xla.gpu.triton":
      continue
    cfg = call.attributes["mhlo.backend_config"]
    with ctx:
      module = ir.Module.parse(cfg["ir"].value_bytes)
    text = module.operation.get_asm(enable_debug_info=False)
    grid = tuple(ir.IntegerAttr(cfg[k]).value for k in ("grid_x", "grid_y", "grid_z"))
    out.append(
      (
        str(cfg["name"]).strip('"'),
        text,
        ir.IntegerAttr(cfg["num_warps"]).value,
        ir.IntegerAttr(cfg["num_stages"]).value,
        grid,
      )
    )
  return out


def compile_sm90a(name, ttir, num_warps, num_stages, workdir):
  """Triton-compile one TTIR module for sm_90a; ptxas -v's report and the PTX mix."""
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
  # pylint: disable=g-import-not-at-top
  import triton
  from triton.backends.compiler import GPUTarget
  from triton.backends.nvidia import compiler as nv

  path = pathlib.Path(workdir) / f"{name}.ttir"
  path.write_text(ttir)
  t0 = time.perf_counter()
  kernel = triton.compile(
    str(path),
    target=GPUTarget("cuda", 90, 32),
    options=dict(num_warps=num_warps, num_stages=num_stages),
  )
  compile_s = time.perf_counter() - t0
  ptx = kernel.asm["ptx"]
  ptx_path = path.with_suffix(".ptx")
  ptx_path.write_text(ptx)
  ptxas = nv.get_ptxas(90)
  proc = subprocess.run(
    [
      ptxas.path,
      "-v",
      "--gpu-name",
      "sm_90a",
      str(ptx_path),
      "-o",
      str(path.with_suffix(".cubin")),
    ],
    capture_output=True,
    text=True,
    check=True,
  )
  report = proc.stdout + proc.stderr
  grab = lambda pat: int(m.group(1)) if (m := re.search(pat, report)) else None
  row = dict(
    registers=grab(r"Used (\d+) registers"),
    spill_stores=grab(r"(\d+) bytes spill stores"),
    spill_loads=grab(r"(\d+) bytes spill loads"),
    stack_frame=grab(r"(\d+) bytes stack frame"),
    shared_bytes=int(kernel.metadata.shared),
    ptxas=f"{pathlib.Path(ptxas.path).name} {ptxas.version}",
    triton=triton.__version__,
    compile_s=round(compile_s, 1),
  )
  row.update({k: len(re.findall(p, ptx)) for k, p in _PTX_COUNTS.items()})
  return row


def _abstract(n, d, dtype):
  s = jax.ShapeDtypeStruct
  return (
    s((n, d), dtype),
    s((n, d), dtype),
    s((n,), jnp.int32),
    s((n,), jnp.int32),
    s((), jnp.float32),
    s((), jnp.float32),
  )


def entries(shapes, dtypes, big):
  """(label, fn, args, block sizes, mode) for every default configuration to compile."""
  out = []
  for dtype in dtypes:
    for n, d in shapes:
      bs = gpu.default_block_sizes(n, n, d, dtype)
      args = _abstract(n, d, dtype)
      out.append((f"{n}x{d}:{jnp.dtype(dtype).name}", gpu.block_loss_sum, args, bs, "fwd"))
      out.append((f"{n}x{d}:{jnp.dtype(dtype).name}", gpu.block_loss_sum_and_grads, args, bs, "vg"))
  if big:
    n, d = big
    bs = gpu.default_block_sizes(n, n, d, jnp.bfloat16)
    out.append(
      (f"{n}x{d}:bfloat16", gpu.block_loss_sum_and_grads, _abstract(n, d, jnp.bfloat16), bs, "vg")
    )
  return out


def tile_of(bs, mode):
  rows, cols = (bs.block_rows, bs.block_cols) if mode == "fwd" else bs.grad_tile
  warps = bs.num_warps if mode == "fwd" else (bs.grad_num_warps or bs.num_warps)
  return dict(tile=f"{rows}x{cols}", block_k=bs.block_k, num_warps=warps, num_stages=bs.num_stages)


def run(shapes, dtypes, big, workdir, log=print):
  """Rows of the table; identical kernels (same TTIR and launch) are compiled once."""
  rows, seen = [], {}
  for label, fn, args, bs, mode in entries(shapes, dtypes, big):
    for name, ttir, warps, stages, grid in triton_kernels(fn, *args):
      key = (ttir, warps, stages)
      if key not in seen:
        seen[key] = compile_sm90a(f"k{len(seen)}_{name}", ttir, warps, stages, workdir)
      res = dict(seen[key])
      row = dict(
        config=label,
        mode=mode,
        kernel=name,
        grid=list(grid),
        **tile_of(bs, mode),
        grad_chunk=bs.grad_chunk if mode == "vg" else None,
        **res,
      )
      # What the custom call launches with must be what the BlockSizes say.
      assert (row["num_warps"], row["num_stages"]) == (warps, stages), (row, warps, stages)
      row["ok"] = (
        row["spill_stores"] == 0 and row["spill_loads"] == 0 and row["shared_bytes"] <= SMEM_LIMIT
      )
      rows.append(row)
      log(format_row(row))
  return rows


HEADER = (
  f"{'config':<22} {'mode':<4} {'tile':>8} {'BK':>3} {'w':>2} {'st':>2} {'regs':>4} "
  f"{'spill st/ld':>11} {'smem KiB':>8} {'wgmma':>5} {'fma32':>5} {'ex2':>4} "
  f"{'rcp':>4} {'div':>4}  ok"
)


def format_row(r):
  return (
    f"{r['config']:<22} {r['mode']:<4} {r['tile']:>8} {r['block_k']:>3} "
    f"{r['num_warps']:>2} {r['num_stages']:>2} {r['registers']:>4} "
    f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>11} "
    f"{r['shared_bytes'] / 1024:>8.1f} {r['wgmma']:>5} {r['fma_f32']:>5} "
    f"{r['ex2_approx']:>4} {r['rcp_approx']:>4} {r['div_rn_f32']:>4}  "
    f"{'ok' if r['ok'] else 'FAIL'}"
  )


def parse_size(text):
  b, d = text.lower().split("x")
  return int(b), int(d)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated BxD")
  p.add_argument("--dtypes", default="bfloat16,float32")
  p.add_argument(
    "--big", default=BIG, help="BxD of the bf16 value-and-grad-only entry ('none' to skip)"
  )
  p.add_argument("--out", default=None, help="JSON path (default: none written)")
  args = p.parse_args(argv)
  why = triton_available()
  if why:
    print(f"gpu_ptxas: {why}; install it with pip install -e '.[dev]'")
    return 2
  shapes = [parse_size(s) for s in args.shapes.split(",") if s]
  dtypes = [jnp.dtype(t) for t in args.dtypes.split(",") if t]
  big = None if args.big == "none" else parse_size(args.big)
  print(HEADER, flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    rows = run(shapes, dtypes, big, tmp, log=lambda s: print(s, flush=True))
  bad = [r for r in rows if not r["ok"]]
  if args.out:
    meta = dict(
      target="sm_90a (Hopper: H100, H200)",
      smem_limit_bytes=SMEM_LIMIT,
      jax=jax.__version__,
      triton=rows[0]["triton"] if rows else None,
      ptxas=rows[0]["ptxas"] if rows else None,
      date=datetime.date.today().isoformat(),
      block_sizes={
        f"{n}x{d}:{jnp.dtype(t).name}": dataclasses.asdict(gpu.default_block_sizes(n, n, d, t))
        for t in dtypes
        for n, d in shapes
      },
      note=(
        "Pallas-emitted Triton IR compiled by the triton package on a CPU-only "
        "machine; XLA compiles the same IR with its bundled Triton."
      ),
    )
    pathlib.Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {args.out}")
  print(
    f"gpu_ptxas: {len(rows)} kernels, "
    + (f"{len(bad)} FAIL (spills or > 227 KiB shared memory)" if bad else "all ok")
  )
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())

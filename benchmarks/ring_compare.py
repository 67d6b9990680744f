"""The in-kernel TPU ring against the reference ring (``lax.ppermute`` plus the block kernel).

    python -m benchmarks.ring_compare [--topologies v5e:2x2 v4:2x2x1] [--batch 4096]
                                      [--dim 1152] [--out PATH]

No TPU here: both rings are AOT-compiled for compile-only TPU slices (docs/DESIGN.md section 5,
level 2) under ``shard_map`` over one device per chip, forward and value-and-grad, bf16, at
local batch ``--batch``. Recorded per (topology, schedule, implementation, pass):

  - the compiled schedule (``compiled.as_text()``): for every ``collective-permute-start``,
    which kernels (custom calls) and fusions XLA placed before its ``-done``, i.e. what the
    permute overlaps. The in-kernel ring has no collective permute: its copies are remote
    DMAs inside the one custom call, started before each hop's tile loop and waited for
    after it (the order tests/test_kernel_tpu_ring.py checks);
  - cost-analysis FLOPs and bytes, HBM temp bytes, compile time;
  - MODELLED step times per chip (v4, v5e, v5p, v6e) for a ring of 4 chips, from datasheet
    FLOP/s, HBM and ICI link bandwidth (benchmarks/chips.py): lower bounds, not measurements.

Writes benchmarks/results/ring_compare_<date>.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from siglip_fast.kernels import tpu_ring  # noqa: E402
from siglip_fast.reference import ring as reference_ring  # noqa: E402

from benchmarks import hlo_schedule  # noqa: E402
from benchmarks.chips import CHIPS, one_device_per_chip  # noqa: E402

SCHEDULES = ("unidirectional", "bidirectional")


# ------------------------------------------------------------------------------------------
# Compiling the two rings.


def _block_ops():
  """The TPU block kernel as the reference ring's BlockOps, if kernels/tpu.py is here."""
  try:
    from siglip_fast.kernels import tpu
  except ImportError:
    return reference_ring.REFERENCE_OPS
  return tpu.block_ops()


def _ring_fn(impl, schedule, mesh, check_vma):
  ops = _block_ops() if impl == "ppermute" else None

  def local(x, y, ids, lt, b):
    if impl == "in_kernel":
      return tpu_ring.ring_loss(x, y, ids, ids, lt, b, axis_name="x", schedule=schedule)
    return reference_ring.ring_loss(
      x, y, ids, ids, lt, b, axis_name="x", schedule=schedule, ops=ops
    )

  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(P("x"), P("x"), P("x"), P(), P()),
    out_specs=P(),
    check_vma=check_vma,
  ), (ops.name if ops else "tpu_ring")


def _compile(impl, schedule, pass_, mesh, b, dim):
  n = mesh.devices.size
  shard = lambda shape, dtype, spec: jax.ShapeDtypeStruct(
    shape, dtype, sharding=NamedSharding(mesh, spec)
  )
  args = (
    shard((n * b, dim), jnp.bfloat16, P("x")),
    shard((n * b, dim), jnp.bfloat16, P("x")),
    shard((n * b,), jnp.int32, P("x")),
    shard((), jnp.float32, P()),
    shard((), jnp.float32, P()),
  )
  notes = []
  for check_vma in (True, False):
    f, block = _ring_fn(impl, schedule, mesh, check_vma)
    g = f if pass_ == "fwd" else jax.value_and_grad(f, argnums=(0, 1, 3, 4))
    t0 = time.perf_counter()
    try:
      compiled = jax.jit(g).lower(*args).compile()
    except ValueError as e:
      if check_vma and "check_vma" in str(e):
        # The schedule is the same either way; only the gradient scaling would differ.
        notes.append(
          "block kernel lacks shard_map check_vma support; compiled with check_vma=False"
        )
        continue
      raise
    return compiled, time.perf_counter() - t0, block, notes
  raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------
# Reading the compiled schedule.


def schedule_summary(text):
  """Where each collective permute starts and finishes relative to the compute."""
  comps = hlo_schedule.computations(text)
  strip = lambda comp: comp.removeprefix(hlo_schedule.ENTRY)
  kernels = [
    f"{strip(comp)}/{hlo_schedule.name(line)}"
    for comp, lines in comps.items()
    for line in lines
    if hlo_schedule.is_op(line, "custom-call")
  ]
  permutes = [
    {
      "computation": strip(w.computation),
      "start": w.start,
      "done": w.done,
      "kernels_between": [
        hlo_schedule.name(line) for line in w.between if hlo_schedule.is_op(line, "custom-call")
      ],
      "fusions_between": sum(hlo_schedule.is_op(line, "fusion") for line in w.between),
    }
    for w in hlo_schedule.permute_windows(text)
  ]
  return {
    "custom_calls": kernels,
    "collective_permutes": len(permutes),
    "permutes_overlapping_a_kernel": sum(bool(p["kernels_between"]) for p in permutes),
    "permutes": permutes,
    "while_loops": sum(
      hlo_schedule.is_op(line, "while") for lines in comps.values() for line in lines
    ),
  }


# ------------------------------------------------------------------------------------------
# The model (MODELLED: lower bounds from datasheet peaks, not measurements).


def _chip(name):
  c = CHIPS[name]
  return c.bf16_flops, c.hbm_bw, c.link_bw


def _hops(n, schedule):
  """Blocks computed per round after the own block; each round one chunk crosses each
  busy link direction (both directions in the bidirectional schedule)."""
  if schedule == "unidirectional":
    return [1] * (n - 1)
  return [2] * ((n - 1) // 2) + ([1] if n % 2 == 0 else [])


def model(chip, n, b, dim, pass_, schedule, tile):
  """Modelled seconds of one ring trip on one chip of an n-chip ring, bf16 inputs.

  A block: max(FLOPs / peak, HBM bytes / bandwidth), with the kernel's HBM traffic (the
  streamed operand read once per tile of the other; under grad two sweeps and the f32
  gradient tiles). A round: its blocks, and what crosses one ICI link direction: the chunk
  (bf16 Y, int32 ids) and under grad its f32 dY.
    in_kernel: round = max(compute, wire). The chunk copy runs during the whole hop; dY
      tiles leave as sweep B finishes them and are needed one hop later.
    ppermute_overlapped: the same plus, under grad, the XLA-side dY accumulation (f32 read,
      read, write) and casts per block in HBM: what XLA gets where it overlaps every permute
      with a kernel (the compiled schedule says where it does).
    ppermute_serial: round = compute + wire (permute, then compute).
  Plus the dY sent home at the end (under grad), exposed in every design.
  """
  peak, hbm, link = _chip(chip)
  isz, grad = 2, pass_ == "value_and_grad"
  flops = (8 if grad else 2) * b * b * dim
  nbytes = b * dim * isz * (1 + b // tile) * (2 if grad else 1) + (3 * b * dim * 4 if grad else 0)
  t_block = max(flops / peak, nbytes / hbm)
  t_extra = (5 * b * dim * 4 / hbm) if grad else 0.0
  wire = (b * dim * isz + 4 * b + (4 * b * dim if grad else 0)) / link
  home = 4 * b * dim / link if grad else 0.0
  out = {
    "in_kernel": t_block,
    "ppermute_overlapped": t_block + t_extra,
    "ppermute_serial": t_block + t_extra,
  }
  for blocks in _hops(n, schedule):
    comp = blocks * t_block
    out["in_kernel"] += max(comp, wire)
    out["ppermute_overlapped"] += max(comp + blocks * t_extra, wire)
    out["ppermute_serial"] += comp + blocks * t_extra + wire
  for k in out:
    out[k] += home
  return {
    "chip": chip,
    "devices": n,
    "schedule": schedule,
    "pass": pass_,
    "tile": tile,
    "block_s": t_block,
    "wire_s_per_round": wire,
    "compute_over_wire": t_block / wire,
    **{f"{k}_s": v for k, v in out.items()},
  }


# ------------------------------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topologies", nargs="+", default=["v5e:2x2", "v4:2x2x1"])
  parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
  parser.add_argument("--batch", type=int, default=4096, help="local batch per chip")
  parser.add_argument("--dim", type=int, default=1152)
  parser.add_argument("--model-chips", type=int, default=4)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  compiled_rows = []
  for topo in args.topologies:
    devices, _ = one_device_per_chip(
      topologies.get_topology_desc(platform="tpu", topology_name=topo).devices
    )
    mesh = Mesh(np.array(devices), ("x",))
    for schedule in args.schedules:
      for impl in ("in_kernel", "ppermute"):
        for pass_ in ("fwd", "value_and_grad"):
          row = {
            "topology": topo,
            "device_kind": devices[0].device_kind,
            "devices": len(devices),
            "schedule": schedule,
            "impl": impl,
            "pass": pass_,
            "local_batch": args.batch,
            "dim": args.dim,
            "dtype": "bfloat16",
          }
          try:
            compiled, secs, block, notes = _compile(
              impl, schedule, pass_, mesh, args.batch, args.dim
            )
          except Exception as e:  # Record and go on: one failure should not hide the rest.
            row["error"] = f"{type(e).__name__}: {str(e).strip()[:400]}"
            print(topo, schedule, impl, pass_, "FAILED", row["error"][:200], flush=True)
            compiled_rows.append(row)
            continue
          cost = compiled.cost_analysis()
          cost = cost[0] if isinstance(cost, (list, tuple)) else cost
          mem = compiled.memory_analysis()
          sched = schedule_summary(compiled.as_text())
          row.update(
            block_kernel=block,
            notes=notes,
            compile_s=round(secs, 2),
            flops=cost.get("flops"),
            bytes_accessed=cost.get("bytes accessed"),
            temp_bytes=getattr(mem, "temp_size_in_bytes", None),
            schedule_hlo=sched,
          )
          compiled_rows.append(row)
          print(
            f"{topo} {schedule:14s} {impl:9s} {pass_:14s} compiled {secs:5.1f}s  "
            f"permutes {sched['collective_permutes']:2d} "
            f"(overlapping a kernel: {sched['permutes_overlapping_a_kernel']:2d})  "
            f"kernels {len(sched['custom_calls'])}  temp {row['temp_bytes']}",
            flush=True,
          )

  # How much of the reference ring's permute traffic XLA overlapped, per compiled chip.
  overlap = {}
  for row in compiled_rows:
    sched = row.get("schedule_hlo")
    if row["impl"] == "ppermute" and sched and sched["collective_permutes"]:
      overlap[(row["topology"].split(":")[0], row["schedule"], row["pass"])] = (
        sched["permutes_overlapping_a_kernel"] / sched["collective_permutes"]
      )

  modelled = []
  for chip in ("v4", "v5e", "v5p", "v6e"):
    tile = 256 if chip == "v4" else 512
    for schedule in args.schedules:
      for pass_ in ("fwd", "value_and_grad"):
        m = model(chip, args.model_chips, args.batch, args.dim, pass_, schedule, tile)
        frac = overlap.get((chip, schedule, pass_))
        if frac is not None:
          # Mostly overlapped as compiled: the overlapped model; else the serial one.
          m["ppermute_overlap_fraction_compiled"] = frac
          m["ppermute_as_compiled_s"] = (
            m["ppermute_overlapped_s"] if frac >= 0.5 else m["ppermute_serial_s"]
          )
        modelled.append(m)
  print(
    "\nMODELLED (datasheet peaks, lower bounds; no TPU here), ms per ring trip, "
    f"{args.model_chips} chips, b={args.batch}, D={args.dim}, bf16; 'as compiled' picks "
    "the reference model by the compiled schedule's overlap (compiled chips only):"
  )
  print(
    f"{'chip':5s} {'schedule':14s} {'pass':15s} {'in-kernel':>10s} {'ppermute ovl':>13s} "
    f"{'ppermute ser':>13s} {'as compiled':>12s} {'compute/wire':>13s}"
  )
  for m in modelled:
    ac = m.get("ppermute_as_compiled_s")
    print(
      f"{m['chip']:5s} {m['schedule']:14s} {m['pass']:15s} {1e3 * m['in_kernel_s']:10.3f} "
      f"{1e3 * m['ppermute_overlapped_s']:13.3f} {1e3 * m['ppermute_serial_s']:13.3f} "
      f"{'-' if ac is None else format(1e3 * ac, '.3f'):>12s} "
      f"{m['compute_over_wire']:13.2f}"
    )

  result = {
    "date": datetime.date.today().isoformat(),
    "jax": jax.__version__,
    "note": (
      "Compile-only TPU targets (no TPU here). 'modelled' figures are MODELLED lower "
      "bounds from datasheet peaks, not measurements."
    ),
    "compiled": compiled_rows,
    "modelled": modelled,
    "model_doc": model.__doc__,
  }
  out = pathlib.Path(
    args.out or pathlib.Path(__file__).parent / "results" / f"ring_compare_{result['date']}.json"
  )
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1, default=str))
  print("wrote", out)


if __name__ == "__main__":
  main()

"""Compile the public API ahead of time for TPU slices at the shapes users run (compile-only).

    python -m benchmarks.shape_sweep [--generations v5e v6e] [--batches 4096 16384]
        [--dims 768 1152 1536] [--chips 1 4 8] [--schedules bidirectional unidirectional]
        [--json PATH]

Run from the repository root with the project's venv python. Each row is
``jax.jit(jax.value_and_grad(loss)).lower(<ShapeDtypeStructs on a compile-only TPU
topology>).compile()`` of exactly what a user calls: ``siglip_fast.sigmoid_loss`` with
``implementation=None`` on one chip, and inside ``jax.shard_map`` over a ring-ordered mesh
(``siglip_fast.mesh.ring_mesh``) with ``axis_name`` on 4 and 8 chips; bf16, default tiles
chosen by the API for the target chip. Per row: compiled or the error, the kernels in the
program, the largest VMEM limit a kernel asked for, temp bytes per chip (and whether it could
hold a b x b float32), the bytes XLA's cost analysis counts for the whole step per chip
(its own ops and the kernels' declared costs; a while loop's body is counted once, so this
is the whole step only where the ring's loop is unrolled, as for 4 chips bidirectional),
the compile time. Nothing executes; no TPU is needed.

The full default matrix is about a hundred compiles (tens of minutes on 2 cores); narrow it
with the flags. Results go only where ``--json`` says.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import siglip_fast  # noqa: E402
from siglip_fast import mesh as mesh_lib  # noqa: E402

# The smallest compile-only slice with at least that many chips, per generation.
SLICES = {
  "v4": {1: "v4:2x2x1", 4: "v4:2x2x1", 8: "v4:2x2x2"},
  "v5e": {1: "v5e:2x2", 4: "v5e:2x2", 8: "v5e:2x4", 16: "v5e:4x4"},
  "v5p": {1: "v5p:2x2x1", 4: "v5p:2x2x1", 8: "v5p:2x2x2", 16: "v5p:2x2x4"},
  "v6e": {1: "v6e:2x2", 4: "v6e:2x2", 8: "v6e:2x4", 16: "v6e:4x4"},
}
AXIS = "batch"


@dataclasses.dataclass
class Row:
  generation: str
  chips: int
  batch_per_chip: int
  dim: int
  schedule: str | None
  compiled: bool = False
  error: str | None = None
  kernels: tuple = ()
  vmem_limit_bytes: int | None = None
  temp_bytes_per_chip: int | None = None
  bytes_accessed_per_chip: int | None = None
  bxb_f32_bytes: int = 0
  compile_s: float = 0.0


def _devices(generation, chips):
  devs = topologies.get_topology_desc(
    platform="tpu", topology_name=SLICES[generation][chips]
  ).devices
  # The first `chips` devices (lower_value_and_grad puts them in ring order). On v4's
  # compile-only topologies a device is one TensorCore, not a chip.
  return devs[:chips]


def lower_value_and_grad(devices, batch_per_chip, dim, schedule, dtype=jnp.bfloat16):
  """The public API's value_and_grad, lowered for ``devices`` (one: no ring)."""
  chips = len(devices)
  mesh = jax.sharding.Mesh(mesh_lib.ring_order(devices), (AXIS,))
  emb = jax.ShapeDtypeStruct(
    (batch_per_chip * chips, dim), dtype, sharding=NamedSharding(mesh, P(AXIS))
  )
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  if chips == 1:
    loss = siglip_fast.sigmoid_loss
  else:

    def loss(x, y, lt, b):
      local = lambda x, y, lt, b: siglip_fast.sigmoid_loss(
        x, y, lt, b, axis_name=AXIS, schedule=schedule
      )
      return jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(), P()), out_specs=P())(
        x, y, lt, b
      )

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(emb, emb, scalar, scalar)


def _kernel_facts(hlo: str):
  names = sorted(
    set(re.findall(r"(siglip_[a-z_0-9]+?)(?:\.\d+)?\"", hlo))
    | set(re.findall(r"kernel_name=\"?(siglip_[a-z_0-9]+)", hlo))
  )
  # A kernel's VMEM limit is its scoped memory config for memory space 1 (VMEM).
  limits = [
    int(v)
    for v in re.findall(
      r"memory_space\\22:1, \\22offset\\22: 0, "
      r"\\22size\\22: (\d+)",
      hlo,
    )
  ]
  return tuple(names), (max(limits) if limits else None)


def run_row(row: Row) -> Row:
  t0 = time.time()
  try:
    lowered = lower_value_and_grad(
      _devices(row.generation, row.chips), row.batch_per_chip, row.dim, row.schedule
    )
    compiled = lowered.compile()
    row.compiled = True
    row.temp_bytes_per_chip = int(compiled.memory_analysis().temp_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    row.bytes_accessed_per_chip = int(cost.get("bytes accessed", 0)) or None
    row.kernels, row.vmem_limit_bytes = _kernel_facts(lowered.as_text())
  except Exception as e:  # pylint: disable=broad-except  # the row records any failure
    row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"
  row.bxb_f32_bytes = 4 * row.batch_per_chip**2
  row.compile_s = round(time.time() - t0, 1)
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--generations", nargs="+", default=["v5e", "v6e"], choices=sorted(SLICES))
  p.add_argument("--batches", nargs="+", type=int, default=[4096, 8192, 16384, 32768])
  p.add_argument("--dims", nargs="+", type=int, default=[768, 1152, 1536])
  p.add_argument("--chips", nargs="+", type=int, default=[1, 4, 8], choices=[1, 4, 8, 16])
  p.add_argument("--schedules", nargs="+", default=["bidirectional", "unidirectional"])
  p.add_argument("--json", type=pathlib.Path, default=None, help="write the rows here")
  args = p.parse_args(argv)

  rows = []
  header = (
    f"{'gen':4} {'chips':>5} {'b/chip':>7} {'D':>5} {'schedule':14} {'ok':3} "
    f"{'VMEM MiB':>8} {'temp MiB':>9} {'HBM GB':>7} {'s':>6}  kernels / error"
  )
  print(header, flush=True)
  for gen in args.generations:
    for chips in [c for c in args.chips if c in SLICES[gen]]:  # no 16-chip v4 slice here
      for b in args.batches:
        for dim in args.dims:
          for schedule in args.schedules if chips > 1 else [None]:
            row = run_row(Row(gen, chips, b, dim, schedule))
            rows.append(row)
            mib = lambda v: "-" if v is None else f"{v / 2**20:.1f}"
            gb = lambda v: "-" if v is None else f"{v / 1e9:.2f}"
            print(
              f"{gen:4} {chips:5} {b:7} {dim:5} {str(schedule):14} "
              f"{'yes' if row.compiled else 'NO':3} {mib(row.vmem_limit_bytes):>8} "
              f"{mib(row.temp_bytes_per_chip):>9} {gb(row.bytes_accessed_per_chip):>7} "
              f"{row.compile_s:6}  "
              f"{','.join(row.kernels) if row.compiled else row.error}",
              flush=True,
            )
            if args.json:
              args.json.parent.mkdir(parents=True, exist_ok=True)
              args.json.write_text(
                json.dumps(
                  {
                    "what": "public API value_and_grad AOT-compiled for compile-only TPU slices",
                    "date": datetime.date.today().isoformat(),
                    "jax": jax.__version__,
                    "dtype": "bfloat16",
                    "rows": [dataclasses.asdict(r) for r in rows],
                  },
                  indent=1,
                )
              )
  failed = [r for r in rows if not r.compiled]
  print(f"{len(rows) - len(failed)} of {len(rows)} rows compiled")
  return 1 if failed else 0


if __name__ == "__main__":
  raise SystemExit(main())

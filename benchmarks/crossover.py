"""Where megacore chips should switch the ring from the ring kernel to the shared driver.

    python -m benchmarks.crossover --profiles P.json [P.json ...] [--generations v5p v4]
        [--chips 8] [--batches 1024 2048 4096] [--dims 768 1152] [--json PATH]

On v4 and v5p (two TensorCores per jax device) the public API runs the ring either as the
ring kernel (``siglip_fast.kernels.tpu_ring``: one TensorCore computes, its own remote DMAs)
or as the block kernels under the shared driver (``siglip_fast.ring``: each call split over
both TensorCores, XLA's permutes); ``tpu_ring.runs_by_default`` chooses by the local batch b.
This compiles the public API's value-and-grad (bidirectional, bf16) both ways for a
compile-only slice at each b, and models each step from the static profile
(``benchmarks.tpu_profile`` JSONs holding ``ring_hop`` and ``ring_blocks`` rows at global
batch 4 b, the profile's ring being 4 devices):

  ring kernel  per trip (one, or two where dX does not fit VMEM): chips x max(compute per
               hop, wire per hop, HBM per hop). Compute is the trip's static schedule over
               its blocks (the ``ring_hop`` row of the same kernel, b and D), wire one
               hop's remote DMAs over one link, HBM the call's declared bytes over chips
               (the cost estimate the kernel declares).
  driver       ``driver_schedule``'s replay of XLA's compiled order: each block-kernel call
               takes max(its static time, its declared bytes at the HBM rate), each permute
               holds its direction of the ring for every link it crosses.

Neither replay charges XLA's own HBM traffic (permute buffers, async copies, fusions:
``xla_bytes``, the program's cost analysis less the kernels' declared bytes; they overlap
the calls). ``hbm_floor_us``, the program's bytes at the HBM rate, bounds the step from
below: each path's ``model_us`` is the larger of the two. Which path the API
would run is forced by patching ``tpu_ring.runs_by_default`` for the compile, so every
call gets the tiles the API picks for it. MODELLED from static schedules and datasheet
rates (``benchmarks.chips``): no stalls, launch gaps or clock effects; it says where the two
paths cross, not how fast either runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

from benchmarks import chips as chips_lib  # noqa: E402
from benchmarks import driver_schedule  # noqa: E402
from benchmarks import shape_sweep  # noqa: E402

PATHS = ("ring_kernel", "driver")
_CALL_START = re.compile(r"^\s*%(siglip_[a-z_0-9]+?)(?:\.\d+)? = ", re.M)


def call_bytes(text: str) -> int:
  """A kernel call's declared HBM bytes, from the cost estimate Pallas attaches to it (0
  where there is none)."""
  m = re.search(r'"bytes_accessed":"(\d+)"', text)
  return int(m.group(1)) if m else 0


def call_texts(hlo: str) -> list[tuple[str, str]]:
  """(kernel name, its text) of every siglip kernel call in a compiled program, in order.
  A call's text runs to the next call's start: the ring kernel's metadata spans lines, and
  its cost estimate comes after a line break."""
  starts = [
    m for m in _CALL_START.finditer(hlo) if "custom-call(" in hlo[m.end() : hlo.find("\n", m.end())]
  ]
  ends = [m.start() for m in starts[1:]] + [len(hlo)]
  return [(m.group(1), hlo[m.start() : end]) for m, end in zip(starts, ends)]


def ring_kernel_step(calls, hop_rows, chips: int, hbm_bw: float) -> dict:
  """The ring kernel's modelled step (module docstring). ``calls``: ``call_texts`` of the
  compiled program; ``hop_rows``: {kernel name: its ``ring_hop`` profile row}."""
  step, trips = 0.0, []
  for name, text in calls:
    if name not in hop_rows:
      raise KeyError(f"{name}: the profile has ring_hop rows for {sorted(hop_rows)}")
    r = hop_rows[name]
    hbm_us = call_bytes(text) / chips / hbm_bw * 1e6
    hop = max(r["hop_us"], r["hop_wire_us"], hbm_us)
    bound = ("compute", "wire", "hbm")[[r["hop_us"], r["hop_wire_us"], hbm_us].index(hop)]
    trips.append(
      dict(
        kernel=name,
        hop_us=r["hop_us"],
        hop_wire_us=r["hop_wire_us"],
        hop_hbm_us=round(hbm_us, 1),
        bound=bound,
      )
    )
    step += chips * hop
  return dict(step_us=round(step, 1), trips=trips)


def driver_step(hlo: str, times: dict[int, float], chips: int, chip) -> dict:
  """The driver's modelled step: ``driver_schedule.replay`` with each call at max(static
  time, declared bytes at the HBM rate). ``times``: ``driver_schedule.call_times``."""
  hbm_bound = []
  static_us = driver_schedule.static_call_us(times)

  def call_us(line):
    static, hbm_us = static_us(line), call_bytes(line) / chip.hbm_bw * 1e6
    hbm_bound.append(hbm_us > static)
    return max(static, hbm_us)

  r = driver_schedule.replay(hlo, call_us, chip.link_bw, chips)
  return dict(
    step_us=r["step_us"],
    compute_us=r["compute_us"],
    exposed_us=r["exposed_us"],
    calls=r["calls"],
    hbm_bound_calls=sum(hbm_bound),
  )


@contextlib.contextmanager
def forced(path: str):
  """Compile with the API choosing ``path`` for the ring on every chip and batch."""
  from siglip_fast.kernels import tpu_ring  # noqa: PLC0415

  saved = tpu_ring.runs_by_default
  tpu_ring.runs_by_default = lambda target, batch: path == "ring_kernel"
  try:
    yield
  finally:
    tpu_ring.runs_by_default = saved


def _program_bytes(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("bytes accessed", 0.0))


def _profile_rows(rows, gen, dim, b, kernel):
  return [
    r
    for r in rows
    if r.get("kernel") == kernel
    and r["generation"] == gen
    and r["dim"] == dim
    and r.get("ring_devices")
    and r["batch"] // r["ring_devices"] == b
  ]


def run_case(gen: str, chips: int, b: int, dim: int, rows) -> dict:
  """Both paths of the public API's value-and-grad on ``chips`` chips of ``gen`` at ``b``
  rows per chip, modelled from the profile ``rows``."""
  chip = chips_lib.CHIPS[gen]
  out = dict(generation=gen, chips=chips, b=b, dim=dim)
  for path in PATHS:
    with forced(path):
      compiled = shape_sweep.lower_value_and_grad(
        shape_sweep._devices(gen, chips), b, dim, "bidirectional"
      ).compile()
    hlo = compiled.as_text()
    calls = call_texts(hlo)
    if path == "ring_kernel":
      hop_rows = {
        r["op"].split(".")[0]: r
        for r in _profile_rows(rows, gen, dim, b, "ring_hop")
        if "hop_us" in r
      }
      model = ring_kernel_step(calls, hop_rows, chips, chip.hbm_bw)
    else:
      prof = _profile_rows(rows, gen, dim, b, "ring_blocks")
      model = driver_step(hlo, driver_schedule.call_times(prof, gen, dim), chips, chip)
    program_bytes = _program_bytes(compiled)
    kernel_bytes = sum(call_bytes(text) for _, text in calls)
    model.update(
      kernels=sorted({n for n, _ in calls}),
      kernel_bytes=kernel_bytes,
      xla_bytes=int(max(0.0, program_bytes - kernel_bytes)),
      hbm_floor_us=round(program_bytes / chip.hbm_bw * 1e6, 1),
      temp_mib=round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
    )
    model["model_us"] = max(model["step_us"], model["hbm_floor_us"])
    out[path] = model
  rk, dr = out["ring_kernel"], out["driver"]
  out["driver_over_ring_kernel"] = round(dr["model_us"] / rk["model_us"], 3)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--profiles", nargs="+", required=True, help="tpu_profile JSONs (module doc)")
  p.add_argument("--generations", nargs="+", default=["v5p", "v4"], choices=["v4", "v5p"])
  p.add_argument("--chips", type=int, default=8)
  p.add_argument("--batches", nargs="+", type=int, default=[1024, 2048, 4096])
  p.add_argument("--dims", nargs="+", type=int, default=[768, 1152])
  p.add_argument("--json", help="write the rows here")
  args = p.parse_args(argv)
  rows = []
  for path in args.profiles:
    with open(path) as f:
      prof = json.load(f)
    rows += prof["rows"] if isinstance(prof, dict) else prof
  out = []
  print(
    f"{'gen':4} {'D':>5} {'b':>5} {'ring kernel us':>14} {'driver us':>10} {'ratio':>6} "
    f"{'ring bound':>10} {'hbm calls':>9} {'HBM floor us (ring/driver)':>26}"
  )
  for gen in args.generations:
    for dim in args.dims:
      for b in args.batches:
        r = run_case(gen, args.chips, b, dim, rows)
        out.append(r)
        print(
          f"{gen:4} {dim:5} {b:5} {r['ring_kernel']['model_us']:14.1f} "
          f"{r['driver']['model_us']:10.1f} {r['driver_over_ring_kernel']:6.3f} "
          f"{'/'.join(t['bound'] for t in r['ring_kernel']['trips']):>10} "
          f"{r['driver']['hbm_bound_calls']:9} "
          f"{r['ring_kernel']['hbm_floor_us']:12.1f} / {r['driver']['hbm_floor_us']:11.1f}",
          flush=True,
        )
  if args.json:
    import jax  # noqa: PLC0415 - only for the record

    with open(args.json, "w") as f:
      json.dump(
        dict(
          date=datetime.date.today().isoformat(),
          jax=jax.__version__,
          note="MODELLED from compile-only schedules and static kernel times; nothing was run",
          profiles=[os.path.basename(p) for p in args.profiles],
          rows=out,
        ),
        f,
        indent=1,
      )


if __name__ == "__main__":
  main()

"""What the ring driver's compiled schedule leaves exposed, from XLA's own instruction order.

    python -m benchmarks.driver_schedule --profile PROFILE.json [--generations v5p]
        [--chips 4 8 16] [--batch 4096] [--dims 768 1152] [--json PATH]

On megacore chips (v4, v5p) the public API runs the ring as the shared driver
(``siglip_fast/ring.py``) around the block kernels, and XLA schedules its permutes. This
compiles the public API's value-and-grad for a compile-only slice (``shape_sweep``), reads
the scheduled HLO, and for every collective permute notes how many block-kernel calls run
while it is in flight. It then replays the schedule on a model: each kernel call takes the
static time of its kernel from a ``benchmarks.tpu_profile`` JSON (``ring_blocks`` rows: a
whole call's steady static time, the call matched to a profiled kernel by its cost
estimate's FLOPs), each permute's bytes cross the ICI links between its ends at the
datasheet rate (``benchmarks.chips``), and a permute's ``done`` waits for its bytes. Every
device sends at once and the ring's devices are in its links' order
(``siglip_fast.mesh.ring_mesh``), so a permute k devices along the ring puts k messages on
every link of its direction: it holds that direction for k message-times, and the
permutes of one direction queue behind each other. Each row also has the step with every
permute charged one link's time (``one_link``), the model of the files before 2026-12-04.
Everything else (XLA's own ops, latencies, HBM) takes no time. MODELLED from a static
schedule: a lower bound that says where the wire is exposed, not a measurement.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

from benchmarks import chips as chips_lib  # noqa: E402
from benchmarks import hlo_schedule  # noqa: E402
from benchmarks import shape_sweep  # noqa: E402

KERNEL_PREFIX = "siglip_"
_ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4}


def _nbytes(hlo_type: str) -> int:
  """Bytes of the first array in an HLO type such as ``(bf16[4096,1152]{...}, ...)``."""
  m = re.match(r"\(?(\w+)\[([\d,]*)\]", hlo_type)
  n = 1
  for v in filter(None, m.group(2).split(",")):
    n *= int(v)
  return _ITEMSIZE[m.group(1)] * n


def _is_call(line: str, kernel: str) -> bool:
  return hlo_schedule.is_op(line, "custom-call") and hlo_schedule.name(line).startswith(kernel)


def permute_spans(hlo: str, kernel: str = KERNEL_PREFIX) -> list[tuple[str, int]]:
  """Per collective permute of each computation, in order of its start: its result type
  and how many calls of ``kernel`` run while it is in flight (started before the call,
  done after it) in the same computation: a while loop's body is another computation, its
  permutes are listed once and its calls do not count for a permute outside it."""
  return [
    (w.result_type, sum(_is_call(line, kernel) for line in w.between))
    for w in hlo_schedule.permute_windows(hlo)
  ]


def call_flops(line: str) -> float:
  """A kernel call's FLOPs from the cost estimate Pallas attaches to its custom call."""
  m = re.search(r'"cost_estimate":\{"flops":"(\d+)"', line)
  if m is None:
    raise ValueError(f"a kernel call without a cost estimate: {line[:120]}")
  return float(m.group(1))


def replay(
  hlo: str,
  call_us,
  link_bw: float,
  n_dev: int,
  trips: int | None = None,
  one_link: bool = False,
):
  """The modelled step (see the module docstring): dict of step_us, compute_us, exposed_us
  (time spent waiting for a permute), wire_bytes and calls. ``call_us``: a kernel call's
  time, or a function of its HLO line that gives it. A while loop runs its
  ``known_trip_count`` times, or ``trips`` where the HLO does not say."""
  comps = hlo_schedule.computations(hlo)
  call_time = call_us if callable(call_us) else lambda _: call_us
  st = dict(now=0.0, exposed=0.0, calls=0, wire=0, compute=0.0)
  link_free: dict[int, float] = {}
  arrives: dict[str, float] = {}

  def run(lines):
    for line in lines:
      if hlo_schedule.is_op(line, "collective-permute-start"):
        nbytes = _nbytes(hlo_schedule.result_type(line))
        pair = re.search(r"source_target_pairs=\{\{(\d+),(\d+)\}", line)
        shift = (int(pair.group(2)) - int(pair.group(1))) % n_dev
        way = 1 if shift <= n_dev // 2 else -1
        links = 1 if one_link else min(shift, n_dev - shift)
        start = max(st["now"], link_free.get(way, 0.0))
        busy = links * nbytes / link_bw * 1e6
        link_free[way] = arrives[hlo_schedule.name(line)] = start + busy
        st["wire"] += nbytes
      elif hlo_schedule.is_op(line, "collective-permute-done"):
        t = arrives.pop(hlo_schedule.started_by(line))
        if t > st["now"]:
          st["exposed"] += t - st["now"]
          st["now"] = t
      elif _is_call(line, KERNEL_PREFIX):
        us = call_time(line)
        st["now"] += us
        st["compute"] += us
        st["calls"] += 1
      elif hlo_schedule.is_op(line, "while"):
        n = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        n = int(n.group(1)) if n else trips
        if n is None:
          raise ValueError("a while loop without a known trip count: pass trips")
        for _ in range(n):
          run(comps[re.search(r"body=%?([\w.\-]+)", line).group(1)])

  run(next(v for k, v in comps.items() if k.startswith(hlo_schedule.ENTRY)))
  return dict(
    step_us=round(st["now"], 1),
    compute_us=round(st["compute"], 1),
    exposed_us=round(st["exposed"], 1),
    wire_bytes=st["wire"],
    calls=st["calls"],
  )


def call_times(profile_rows, gen: str, dim: int) -> dict[int, float]:
  """{FLOPs of a call: its static compute (us)} from ``tpu_profile`` ``ring_blocks`` rows
  (a row per kernel the profiled ring compiled, with its cost estimate's FLOPs and its
  whole call's steady static time; rows of equal FLOPs averaged)."""
  times: dict[int, list[float]] = {}
  for r in profile_rows:
    if r.get("kernel") == "ring_blocks" and r["generation"] == gen and r["dim"] == dim:
      times.setdefault(int(r["cost_flops"]), []).append(r["steady_static_us"])
  if not times:
    raise KeyError(f"no ring_blocks row for {gen} D = {dim} in the profile")
  return {f: sum(v) / len(v) for f, v in times.items()}


def static_call_us(times: dict[int, float]):
  """A call's HLO line -> its static time (us) from ``times`` (``call_times``), by FLOPs."""

  def call_us(line):
    flops = int(call_flops(line))
    if flops not in times:
      raise KeyError(f"a call of {flops} FLOPs: the profile has calls of {sorted(times)}")
    return times[flops]

  return call_us


def run_case(gen, chips, b, dim, times, trips=None) -> dict:
  """Compile the public API's value-and-grad (bidirectional, bf16) on ``chips`` chips of
  ``gen`` at ``b`` rows per chip and replay its schedule, each call taking the time
  ``times`` (``call_times``) gives its FLOPs."""
  compiled = shape_sweep.lower_value_and_grad(
    shape_sweep._devices(gen, chips), b, dim, "bidirectional"
  ).compile()
  hlo = compiled.as_text()
  spans = permute_spans(hlo)
  bw = chips_lib.CHIPS[gen].link_bw

  call_us = static_call_us(times)
  model = replay(hlo, call_us, bw, chips, trips)
  flat = replay(hlo, call_us, bw, chips, trips, one_link=True)
  return dict(
    generation=gen,
    chips=chips,
    b=b,
    dim=dim,
    block_us=round(model["compute_us"] / chips, 1),
    permutes=[list(s) for s in spans],
    permutes_without_a_call=sum(n == 0 for _, n in spans),
    temp_mib=round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
    **model,
    one_link={k: flat[k] for k in ("step_us", "exposed_us")},
  )


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--profile", required=True, help="a tpu_profile JSON with ring_blocks rows")
  p.add_argument("--generations", nargs="+", default=["v5p"], choices=["v4", "v5p"])
  p.add_argument("--chips", nargs="+", type=int, default=[4, 8, 16])
  p.add_argument("--batch", type=int, default=4096, help="rows per chip")
  p.add_argument("--dims", nargs="+", type=int, default=[1152])
  p.add_argument(
    "--trips", type=int, default=None, help="rounds a while loop runs (programs with one)"
  )
  p.add_argument("--json", help="write the rows here")
  args = p.parse_args(argv)
  with open(args.profile) as f:
    prof = json.load(f)
  prof = prof["rows"] if isinstance(prof, dict) else prof
  rows = []
  print(
    f"{'gen':4} {'chips':>5} {'D':>5} {'step us':>8} {'compute':>8} {'exposed':>8} "
    f"{'1-link us':>9} {'wire MB':>8} {'no call':>7} {'temp MiB':>8}"
  )
  for gen in args.generations:
    for chips in [c for c in args.chips if c in shape_sweep.SLICES[gen]]:
      for dim in args.dims:
        times = call_times(prof, gen, dim)
        r = run_case(gen, chips, args.batch, dim, times, args.trips)
        rows.append(r)
        print(
          f"{gen:4} {chips:5} {dim:5} {r['step_us']:8.1f} {r['compute_us']:8.1f} "
          f"{r['exposed_us']:8.1f} {r['one_link']['step_us']:9.1f} {r['wire_bytes'] / 1e6:8.1f} "
          f"{r['permutes_without_a_call']:7} {r['temp_mib']:8.1f}",
          flush=True,
        )
  if args.json:
    import jax  # noqa: PLC0415 - only for the record

    out = dict(
      date=datetime.date.today().isoformat(),
      jax=jax.__version__,
      note="MODELLED from compile-only schedules and static block times; nothing was run",
      profile=os.path.basename(args.profile),
      rows=rows,
    )
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()

"""Static cycle profile of the Pallas TPU kernels, read from the TPU compiler's VLIW schedule.

    python -m benchmarks.tpu_profile                       # v5e, D = 1152, B = 4096 (4-6 min)
    python -m benchmarks.tpu_profile --generations v4 v5e v5p v6e --dims 768 1152 \\
        --json benchmarks/results/tpu_profile_<date>.json --plot benchmarks/results/....png
    python -m benchmarks.tpu_profile --compare BEFORE.json AFTER.json   # markdown table
    python -m benchmarks.tpu_profile --standing A.json,B.json   # each kernel over its limit

No TPU needed: every kernel is compiled for a real TPU
generation on a compile-only topology, with libtpu told to dump its final VLIW schedule
(``LIBTPU_INIT_ARGS=--xla_jf_dump_to=DIR``; libtpu reads it once, when it loads, so each
generation is compiled in a fresh subprocess with its own dump folder). Per Pallas kernel
(an HLO op whose name starts with ``siglip``) two files of that dump are read:

  ``*-final_bundles.txt``  one line per VLIW bundle, address first, ``LB:`` where a loop body
      starts, ``>`` per loop level, and a backward ``sbr.rel`` closing each loop; the loop's
      exit test (``scmp.ge.s32 %i, N /* loop exit test */``) gives its trip count.
  ``*-final_hlo-static-per-bundle-utilization.txt``  a capacity row (slots per bundle of the
      units MXU, XLU, VALU, VPOP, EUP, VLOAD, VLOAD:FILL, VSTORE, VSTORE:SPILL, SALU), then
      one row per bundle: the slots each unit uses in it.

A Pallas grid is a software-pipelined loop whose body is one grid step, so per kernel:

  loop_bundles   bundles one trip of the outermost loop's body issues (LB .. its backward
                 branch, an inner loop's body times its trip count): the cycles of one grid
                 step if nothing stalls;
  grid_steps     the kernel's grid (Mosaic's ``iteration_bounds``, from the Mosaic dump), per
                 TensorCore where the compile-only device is one TensorCore of a megacore chip;
  static_cycles  grid_steps x loop_bundles (kernels without a grid, the ring: the loop tree,
                 each body times its trip count); static_us at the generation's clock;
  <unit>_busy    slots the loop body uses / (capacity x loop_bundles): the unit's occupancy;
  spill_frac     fraction of loop-body bundles that store a spilled vector register
                 (VSTORE:SPILL > 0);
  mxu_ideal      cycles the step's FLOPs need on the core's MXUs at one matmul per MXU per
                 cycle; mxu_ideal_ratio = mxu_ideal / loop_bundles (1 = the MXUs never idle);
  bound          the unit with the highest busy fraction;
  steady_floor_x bundles of the steady step over the largest unit floor (a unit's slots used
                 / its slots per bundle: no schedule of the same instructions is shorter),
                 i.e. 1 / the busiest unit's steady fraction, that unit ``steady_bound``:
                 how far the schedule is from the limit its instruction mix sets.

For the ring kernel (``ring_hop``) there is no grid: static cycles come from the loop tree
(``steady_static_cycles``: every loop on its steady path, i.e. the lean tile body),
divided by the blocks one trip computes (one per device), against the modelled wire time of
one hop's remote DMAs over one ICI link (benchmarks/chips.py; ``_ring_hop`` says what each
plan sends): ``hop_hidden_ratio`` = compute time per hop / wire time per hop, > 1 means the
permute can hide behind compute. ``ring_hop`` is the API's default value-and-grad plan (one
trip, 6 b^2 D per block, where dX fits VMEM), ``ring_hop_2trip`` the two trips (8 b^2 D).
``ring_blocks`` (on request) is the ring the API runs on megacore chips (v4, v5p): the block
kernels' value-and-grad, a call (or several) per block or half block, in the shared ring
driver; a row per call, each carrying the hop that all the calls make together, against a
wire that carries half of each chunk, its ids and its f32 dY each way (XLA's accumulation
between the calls is not in these figures).

These are STATIC figures, not measurements: they assume every bundle issues in one cycle.
They leave out stalls on DMA waits (HBM and ICI), on semaphores, pipeline fill and drain,
clock throttling and everything outside the kernel. ``loop_bundles`` and the ``*_busy``
fractions count every bundle of the loop body, including regions that run only on the first
or last step and both sides of an if/else; the ``steady_*`` fields follow the shortest path
through the body (``steady_path``): the common grid step, with one-off regions skipped and
the lean tile body where a per-tile flag chooses between two. If libtpu's dump format changes the parser raises
``DumpFormatError`` naming the file and what it expected; it never reports a number it
could not read.
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
import math  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

try:
  from benchmarks import chips as chips_lib
except ImportError:  # run as a file: add the repo root
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from benchmarks import chips as chips_lib
from benchmarks import static_profiles  # noqa: E402

UNITS = (
  "MXU",
  "XLU",
  "VALU",
  "VPOP",
  "EUP",
  "VLOAD",
  "VLOAD:FILL",
  "VSTORE",
  "VSTORE:SPILL",
  "SALU",
)
KERNELS = ("fwd", "value_and_grad", "value_and_grad_2k", "ring_hop", "ring_hop_2trip")
KERNEL_PREFIX = "siglip"
DEFAULT_GENERATIONS = ("v5e",)
DEFAULT_DIMS = (1152,)
DEFAULT_BATCH = 4096
RING_DEVICES = 4


class DumpFormatError(RuntimeError):
  """libtpu's dump is not in the form this parser reads (names the file and the expectation)."""

  def __init__(self, path, expected: str):
    super().__init__(
      f"{path}: expected {expected}; libtpu's dump format may have changed, "
      "refusing to report figures from it"
    )


# ------------------------------------------------------------------------------------------
# Parsing the dump

_BUNDLE_RE = re.compile(r"^\s*(0x[0-9a-f]+|0)\s+([A-Z]{2})?\s*:\s*(>*)\s*\{(.*)$")
_BRANCH_RE = re.compile(r"sbr\.rel\s+\((!?)%(p[\w]+)\)\s+target\s*=\s*\$region(\d+)")
_REGION_START_RE = re.compile(r"Start(?:/End empty)? region (\d+)\b")
_CMP_RE = r"%{p}\s*=\s*scmp\.(ge|gt|lt|le|eq|ne)\.s32\.totalorder\s+(%s\w+),\s*(-?\d+)\b"
# The induction variable's increment: "%s12_s6 = sadd.s32 4, %s..." (an unrolled loop steps by
# its unroll factor).
_STEP_RE = r"{reg}\s*=\s*sadd\.s32\s+(\d+),"
# The induction variable's start: the loop-head phi joins the incremented register with a copy
# of the initial value, "%s9_s30 = sphi %s7_s30, %s12_s30" with "%s7_s30 = smov 1" (a
# fori_loop from 1 runs n - 1 trips to the same bound).
_PHI_RE = r"=\s*sphi\s+(%s\w+),\s*{reg}\b|=\s*sphi\s+{reg},\s*(%s\w+)"
_INIT_RE = r"{reg}\s*=\s*smov\s+(-?\d+)\b"


@dataclasses.dataclass
class Loop:
  start: int  # bundle index of the first body bundle (the LB: bundle)
  end: int  # bundle index of the backward branch
  trips: int | None  # from the loop exit test; None when the bound is not a constant
  children: list["Loop"] = dataclasses.field(default_factory=list)

  @property
  def bundles(self) -> int:
    return self.end - self.start + 1

  def cycles(self) -> int | None:
    """Static cycles of the whole loop: trips x (body, with inner loops at their trips)."""
    body = self.body_cycles()
    return None if body is None or self.trips is None else self.trips * body

  def body_cycles(self) -> int | None:
    total = self.bundles
    for c in self.children:
      inner = c.cycles()
      if inner is None:
        return None
      total += inner - c.bundles
    return total


@dataclasses.dataclass
class Schedule:
  path: str
  texts: list[str]  # bundle text, index = bundle number (address)
  loops: list[Loop]  # outermost loops, in address order


def parse_bundles(path) -> Schedule:
  """The bundles of a ``*-final_bundles.txt`` and its loop tree."""
  path = pathlib.Path(path)
  lines = path.read_text().splitlines()
  if not any(line.startswith("LB: loop body") for line in lines[:20]):
    raise DumpFormatError(path, "the control-target key ('LB: loop body') in its first lines")
  texts, markers, region_at = [], [], {}
  for line in lines:
    m = _BUNDLE_RE.match(line)
    if not m:
      continue
    addr = int(m.group(1), 16) if m.group(1) != "0" else 0
    if addr != len(texts):
      raise DumpFormatError(
        path, f"consecutive bundle addresses, got {m.group(1)} after {len(texts)} bundles"
      )
    texts.append(m.group(4))
    markers.append(m.group(2))
    for r in _REGION_START_RE.findall(line):
      region_at.setdefault(int(r), addr)
  if not texts:
    raise DumpFormatError(path, "bundle lines '<address> [LB:] [>] { ... }'")
  joined = "\n".join(texts)
  loops = []
  for i, text in enumerate(texts):
    for neg, pred, region in _BRANCH_RE.findall(text):
      target = region_at.get(int(region))
      if target is None or target > i:
        continue  # forward branch
      if markers[target] != "LB":
        raise DumpFormatError(
          path,
          f"backward branch at bundle {i:#x} to a loop body (LB:), "
          f"found its target {target:#x} unmarked",
        )
      loops.append(Loop(target, i, _trips(joined, pred, bool(neg))))
  return Schedule(str(path), texts, _nest(loops))


def _trips(text: str, pred: str, negated: bool) -> int | None:
  """Trip count of a loop whose back edge is taken on (!)pred, if pred compares the
  post-incremented induction variable with a constant (the loop exit test)."""
  m = re.search(_CMP_RE.format(p=pred), text)
  if not m:
    return None
  op, reg, n = m.group(1), m.group(2), int(m.group(3))
  inc = re.search(_STEP_RE.format(reg=re.escape(reg)), text)
  step = int(inc.group(1)) if inc else 1
  if step <= 0:
    return None
  start = 0
  phi = re.search(_PHI_RE.format(reg=re.escape(reg)), text)
  if phi:
    init = re.search(_INIT_RE.format(reg=re.escape(phi.group(1) or phi.group(2))), text)
    start = int(init.group(1)) if init else 0
  # Back edge taken while i < n: "!(i >= n)" or "i < n" -> (n - start) / step trips (i
  # counts start + step, start + 2 step, ... n).
  if (negated and op == "ge") or (not negated and op == "lt"):
    return max(-(-(n - start) // step), 1)
  if (negated and op == "gt") or (not negated and op == "le"):
    return max((n - start) // step + 1, 1)
  return None


def _nest(loops: list[Loop]) -> list[Loop]:
  loops = sorted(loops, key=lambda l: (l.start, -l.end))
  top: list[Loop] = []
  stack: list[Loop] = []
  for loop in loops:
    while stack and not (stack[-1].start <= loop.start and loop.end <= stack[-1].end):
      stack.pop()
    (stack[-1].children if stack else top).append(loop)
    stack.append(loop)
  return top


def expand(loop: Loop) -> list[int]:
  """The bundles one trip of ``loop``'s body issues, in order: an inner loop's body repeated
  its trip count (once where the count is not a constant)."""
  out, i = [], loop.start
  for c in sorted(loop.children, key=lambda c: c.start):
    out += range(i, c.start)
    out += expand(c) * (c.trips or 1)
    i = c.end + 1
  out += range(i, loop.end + 1)
  return out


@dataclasses.dataclass
class Utilization:
  path: str
  capacity: dict[str, int]
  rows: list[list[int]]  # per bundle, slots used per unit in UNITS order


def parse_utilization(path) -> Utilization:
  """Capacity and per-bundle unit use of a ``*-final_hlo-static-per-bundle-utilization.txt``."""
  path = pathlib.Path(path)
  lines = [l.strip() for l in path.read_text().splitlines()]
  try:
    i = next(
      k for k, l in enumerate(lines) if l.startswith("== CAPACTIY") or l.startswith("== CAPACITY")
    )
  except StopIteration:
    raise DumpFormatError(path, "a '== CAPACITY:' header") from None
  names = [n.strip() for n in lines[i + 1].split(",")]
  if tuple(names) != UNITS:
    raise DumpFormatError(path, f"the unit row {', '.join(UNITS)}, got {lines[i + 1]!r}")
  try:
    cap = [int(v) for v in lines[i + 2].split()]
  except ValueError:
    raise DumpFormatError(path, f"integer capacities, got {lines[i + 2]!r}") from None
  if len(cap) != len(UNITS) or min(cap) <= 0:
    raise DumpFormatError(path, f"{len(UNITS)} positive capacities, got {lines[i + 2]!r}")
  if not lines[i + 3].startswith("== UTILIZATION"):
    raise DumpFormatError(path, f"'== UTILIZATION:' after the capacities, got {lines[i + 3]!r}")
  rows = []
  for k, line in enumerate(lines[i + 4 :], start=i + 5):
    if not line:
      continue
    try:
      row = [int(v) for v in line.split()]
    except ValueError:
      raise DumpFormatError(path, f"integer slot counts on line {k}, got {line!r}") from None
    if len(row) != len(UNITS) or any(v < 0 or v > c for v, c in zip(row, cap)):
      raise DumpFormatError(
        path, f"{len(UNITS)} slot counts within the capacities on line {k}, got {line!r}"
      )
    rows.append(row)
  return Utilization(str(path), dict(zip(UNITS, cap)), rows)


def steady_path(sched: Schedule, loop: Loop, lean: bool = True) -> list[int]:
  """The bundles of ``loop``'s body that a steady-state grid step runs.

  A grid step's body holds regions guarded by forward branches: the pipeline's guard around
  the step's work, one-off regions of the first and last steps (zeroing accumulators,
  writing them back), and an if/else on a per-tile flag (the lean and the full tile body).
  The steady step runs every region that holds a matmul or a transcendental (the tile's work),
  skips the regions with neither, and of an if/else (``if p goto T; A; T: if !p goto Y; B;
  Y:``) runs the lean side: the one with fewer instructions (the lean tile body drops the id
  compare and the positives' selects), of two with as many the shorter. Not simply the
  shorter side: libtpu can schedule the lean body in more bundles than the full one (v5e's
  ring kernel). An inner loop (e.g. over strips of a tile, or a ring kernel's tile steps)
  runs its own steady path its trip count (once where the count is unknown). ``lean=False``:
  the other side of each if/else, the step of a tile that runs the full body (one holding
  the diagonal or padding).
  """
  lo, hi = loop.start, loop.end
  region_at = {}
  for i in range(lo, hi + 1):
    for r in _REGION_START_RE.findall(sched.texts[i]):
      region_at.setdefault(int(r), i)
  branches = {}  # bundle -> [(negated, predicate, target bundle)], forward, inside the body
  for i in range(lo, hi + 1):
    for neg, pred, region in _BRANCH_RE.findall(sched.texts[i]):
      target = region_at.get(int(region))
      if target is not None and i + 1 < target <= hi:
        branches.setdefault(i, []).append((neg, pred, target))
  work = [bool(_OPS["matmul"].search(t) or _OPS["transcendental"].search(t)) for t in sched.texts]
  prefix, op_prefix = [0], [0]
  for i, t in enumerate(sched.texts):
    prefix.append(prefix[-1] + work[i])
    op_prefix.append(op_prefix[-1] + len(t.split(";;")))  # a bundle's ops: ";;" apart
  has_work = lambda a, b: prefix[b] - prefix[a] > 0  # in bundles [a, b)
  ops = lambda a, b: op_prefix[b] - op_prefix[a]
  inner = {c.start: c for c in loop.children}
  inner_path = {i: steady_path(sched, c, lean) * (c.trips or 1) for i, c in inner.items()}

  def partner(i, neg, pred, target):
    """The else-branch at ``target`` of an if at ``i``: (its target) or None."""
    for n2, p2, y in branches.get(target, []):
      if p2 == pred and n2 != neg:
        return y
    return None

  elses = set()  # bundles whose branch is the else of an if/else pair
  for i, bs in branches.items():
    for neg, pred, target in bs:
      if partner(i, neg, pred, target) is not None:
        elses.add(target)
  best = [0] * (hi + 2)
  nxt = [None] * (hi + 2)
  for i in range(hi, lo - 1, -1):
    if i in inner:
      best[i], nxt[i] = len(inner_path[i]) + best[inner[i].end + 1], i
      continue
    best[i], nxt[i] = 1 + best[i + 1], i + 1
    for neg, pred, target in branches.get(i, []):
      y = partner(i, neg, pred, target)
      if i in elses and y is None:
        # Reached by falling through the if-side: the else branch is taken, B is skipped.
        best[i], nxt[i] = 1 + best[target], target
      elif y is not None:
        # if/else: skipping A means running bundle ``target`` (not its jump) and then B.
        via_b = 2 + best[target + 1]
        if ((ops(target + 1, y), via_b) < (ops(i + 1, target), best[i])) == lean:
          best[i], nxt[i] = via_b, -target  # marks: visit target, then target + 1
      elif not has_work(i + 1, target) and 1 + best[target] < best[i]:
        best[i], nxt[i] = 1 + best[target], target
  path, i = [], lo
  while i is not None and i <= hi:
    if i in inner:
      path += inner_path[i]
      i = inner[i].end + 1
      continue
    path.append(i)
    step = nxt[i]
    if step is not None and step < 0:
      path.append(-step)
      step = -step + 1
    i = step
  return path


def _busy_on(util: Utilization, bundles: list[int]) -> dict[str, float]:
  sums = [0] * len(UNITS)
  for b in bundles:
    for k, v in enumerate(util.rows[b]):
      sums[k] += v
  return {u: sums[k] / (util.capacity[u] * len(bundles)) for k, u in enumerate(UNITS)}


@dataclasses.dataclass
class KernelSchedule:
  """What the dump says about one kernel."""

  op: str
  bundles: int  # all bundles of the kernel
  loop: Loop | None  # the outermost loop with the most bundles (a grid's step)
  loops: list[Loop]
  body_cycles: int  # bundles one trip of the loop body issues, inner loops at their trips
  busy: dict[str, float]  # over the loop body (the whole kernel when it has no loop)
  spill_frac: float  # loop-body bundles with a vector spill store
  static_cycles: int | None  # from the loop tree (trip counts of the exit tests)
  steady_static_cycles: int | None  # the same with every loop on its steady path
  counts: dict[str, int]  # op counts in the loop body: matmul, transcendental, spill, dma
  steady: list[int]  # the loop body's bundles on a steady-state step (steady_path)
  full: list[int]  # the same on a step whose tile runs the full body
  steady_busy: dict[str, float]
  steady_spill_frac: float


_OPS = {
  "matmul": re.compile(r"= vmatmul"),
  "transcendental": re.compile(r"= v(?:pow2|log2|rcp|exp|tanh|rsqrt)"),
  "spill_store": re.compile(r"_spill\]"),
  "dma_start": re.compile(r"= dma\.(?!done)"),
  "dma_wait": re.compile(r"= dma\.done"),
}


def tile_loop(sched: Schedule) -> Loop | None:
  """The kernel's tile loop: its longest outermost loop that holds a matmul. None where no
  loop does: a kernel that runs all its tiles outside loops (the ring's loss alone at one
  tile a block), whose profile is then the whole kernel, not a zero-fill loop's."""
  tiles = [
    l for l in sched.loops if _OPS["matmul"].search("\n".join(sched.texts[l.start : l.end + 1]))
  ]
  return max(tiles, key=lambda l: l.bundles) if tiles else None


def kernel_schedule(op: str, bundles_path, util_path) -> KernelSchedule:
  sched = parse_bundles(bundles_path)
  util = parse_utilization(util_path)
  if len(util.rows) != len(sched.texts):
    raise DumpFormatError(
      util_path, f"one row per bundle of {bundles_path} ({len(sched.texts)}), got {len(util.rows)}"
    )
  loop = tile_loop(sched)
  lo, hi = (loop.start, loop.end) if loop else (0, len(sched.texts) - 1)
  body = expand(loop) if loop else list(range(lo, hi + 1))
  spill_col = UNITS.index("VSTORE:SPILL")
  spill = sum(1 for b in body if util.rows[b][spill_col] > 0) / len(body)
  counts = {k: sum(len(r.findall(t)) for t in sched.texts[lo : hi + 1]) for k, r in _OPS.items()}
  # The kernel's static cycles: its bundles outside loops plus each outermost loop's cycles,
  # every bundle of its body (total) or its steady path (steady_total); None if a trip
  # count is unknown.
  outside = len(sched.texts) - sum(l.bundles for l in sched.loops)
  paths = [steady_path(sched, l) for l in sched.loops]
  loop_tree = lambda parts: None if None in parts else outside + sum(parts)
  total = loop_tree([l.cycles() for l in sched.loops])
  steady_total = loop_tree(
    [None if l.trips is None else l.trips * len(p) for l, p in zip(sched.loops, paths)]
  )
  steady = paths[sched.loops.index(loop)] if loop else list(range(lo, hi + 1))
  full = steady_path(sched, loop, lean=False) if loop else steady
  steady_spill = sum(1 for b in steady if util.rows[b][spill_col] > 0) / len(steady)
  return KernelSchedule(
    op,
    len(sched.texts),
    loop,
    sched.loops,
    len(body),
    _busy_on(util, body),
    spill,
    total,
    steady_total,
    counts,
    steady,
    full,
    _busy_on(util, steady),
    steady_spill,
  )


_DUMP_NAME_RE = re.compile(
  r"^\d+-(.+)-(\d+)-(final_bundles|"
  r"final_hlo-static-per-bundle-utilization)\.txt$"
)


def find_kernels(dump_dir, prefix: str = KERNEL_PREFIX) -> dict[str, tuple[str, str]]:
  """{op name: (final_bundles path, utilization path)} of the ops named ``prefix*`` (or
  ``jvp_prefix*``: a kernel in the forward of a custom VJP under ``grad``).

  An op compiled twice in one dump (two programs) keeps the later file under ``op#2``.
  """
  found: dict[tuple[str, str], dict[str, str]] = {}
  for p in sorted(pathlib.Path(dump_dir).iterdir()):
    m = _DUMP_NAME_RE.match(p.name)
    if m and m.group(1).removeprefix("jvp_").startswith(prefix):
      stamp = p.name.split("-", 1)[0]
      found.setdefault((stamp, m.group(1)), {})[m.group(3)] = str(p)
  out: dict[str, tuple[str, str]] = {}
  for (stamp, op), files in sorted(found.items()):
    if len(files) != 2:
      raise DumpFormatError(
        dump_dir,
        f"both final_bundles and final_hlo-static-per-bundle-"
        f"utilization files for op {op} (stamp {stamp}), got {sorted(files)}",
      )
    name, k = op, 1
    while name in out:
      k += 1
      name = f"{op}#{k}"
    out[name] = (files["final_bundles"], files["final_hlo-static-per-bundle-utilization"])
  return out


_FUNC_RE = re.compile(r"func\.func @(\w+)\(")
_BOUNDS_RE = re.compile(r"iteration_bounds = array<i64(?::\s*([\d,\s]*))?>")
_SEMANTICS_RE = re.compile(r"dimension_semantics = \[([^\]]*)\]")


def mosaic_grids(mosaic_dir) -> dict[str, list[tuple[tuple[int, ...], tuple[str, ...]]]]:
  """{kernel name: [(grid, dimension semantics), ...]} from the Mosaic dump's deserialized
  modules: one entry per distinct grid (calls of one kernel name may differ, e.g. the fused
  value-and-grad's super-blocks of 6 and 5 column tiles)."""
  grids: dict[str, list] = {}
  d = pathlib.Path(mosaic_dir)
  if not d.is_dir():
    return grids
  for p in sorted(d.glob("*post-deserialization*.txt")):
    text = p.read_text()
    f, b = _FUNC_RE.search(text), _BOUNDS_RE.search(text)
    if not f:
      continue
    sem = _SEMANTICS_RE.search(text)
    grid = tuple(int(v) for v in (b.group(1) or "").replace(" ", "").split(",") if v) if b else ()
    semantics = (
      tuple(s.strip().split("<")[-1].rstrip(">") for s in sem.group(1).split(",") if s.strip())
      if sem
      else ()
    )
    if (grid, semantics) not in grids.setdefault(f.group(1), []):
      grids[f.group(1)].append((grid, semantics))
  return grids


def _grid_of(candidates, trips, cores):
  """The grid (and semantics) among a kernel name's ``candidates`` that a loop of ``trips``
  runs: a Pallas grid loop runs two trips more than the steps it runs (pipeline fill and
  drain), all of the grid's steps or, on megacore, one TensorCore's share. The only
  candidate where the trips are unknown; (None, ()) where none matches."""
  if len(candidates) == 1 and trips is None:
    return candidates[0]
  for grid, semantics in candidates:
    steps = math.prod(grid)
    if trips is not None and trips - 2 in (steps, steps // cores):
      return grid, semantics
  if len(candidates) == 1:  # an unexpected loop; the caller says so
    return candidates[0]
  return None, ()


def core_steps(grid, trips, cores) -> tuple[int, bool]:
  """(grid steps one TensorCore runs, whether that is a share of a megacore split) for a
  grid whose step loop runs ``trips`` (None: unknown). A grid loop runs its steps plus 2
  (fill and drain); on megacore the parallel dimension is split over the cores and the loop
  runs one core's share. (Comparing the trips themselves with the steps missed a grid of 4
  steps, 2 a core: 4 trips.)"""
  steps = math.prod(grid)
  if cores > 1 and trips is not None and trips - 2 == steps // cores < steps:
    return steps // cores, True
  return steps, False


# ------------------------------------------------------------------------------------------
# Compiling the kernels (in a child process per generation: libtpu reads its dump flags once)

# Clocks are not on the datasheets; each is the datasheet peak bf16 FLOP/s (chips.py) over
# the chip's MXU work per cycle: 2 FLOPs x MXUs per chip x MXU rows x MXU columns.
# MXUs per TensorCore and MXU size: https://cloud.google.com/tpu/docs/system-architecture-tpu-vm
# (v4, v5e, v5p: 4 MXUs of 128 x 128 per TensorCore; v6e: 256 x 256 MXUs); TensorCores per
# chip: chips.py. v4's 1050 MHz is also given in Jouppi et al., "TPU v4", ISCA 2023, Table 1.
MXU = {"v4": (2, 4, 128), "v5e": (1, 4, 128), "v5p": (2, 4, 128), "v6e": (1, 4, 256)}


def clock_hz(gen: str) -> float:
  cores, mxus, dim = MXU[gen]
  return chips_lib.CHIPS[gen].bf16_flops / (2 * cores * mxus * dim * dim)


def mxu_flops_per_cycle(gen: str) -> int:
  """bf16 FLOPs one TensorCore's MXUs do per cycle."""
  _, mxus, dim = MXU[gen]
  return 2 * mxus * dim * dim


# The one place that names the entry points. When siglip_fast.sigmoid_loss(...,
# implementation="pallas_tpu", block_sizes=bs) compiles for TPU from a CPU host, point
# _block_fn at it (the value-and-grad then comes from jax.value_and_grad of it).
def _block_fn(kernel: str, bs):
  import dataclasses as dc
  from siglip_fast.kernels import tpu

  if kernel == "fwd":
    return lambda x, y, i, lt, b: tpu.loss_sum(x, y, i, i, lt, b, block_sizes=bs)
  if kernel == "value_and_grad_2k":
    bs = dc.replace(bs, fuse_dy=False)
  return lambda x, y, i, lt, b: tpu.loss_sum_and_grads(x, y, i, i, lt, b, block_sizes=bs)


def _ring_blocks_fn(mesh):
  """Value-and-grad of the public API's ring on the block kernels (the shared driver) at
  any b, each call with the tiles the API picks for it (a whole block's and a half
  chunk's may differ: v5p at b = 2048)."""
  import jax
  from jax.sharding import PartitionSpec as P
  import siglip_fast
  from benchmarks import crossover

  def local(x, y, ids, lt, bias):
    return siglip_fast.sigmoid_loss(
      x, y, lt, bias, pair_ids=ids, axis_name="batch", implementation="pallas_tpu"
    )

  f = jax.shard_map(local, mesh=mesh, in_specs=(P("batch"),) * 3 + (P(), P()), out_specs=P())
  vag = jax.value_and_grad(f, argnums=(0, 1, 3, 4))

  def traced_on_the_driver(*args):
    with crossover.forced("driver"):
      return vag(*args)

  return traced_on_the_driver


def _ring_fn(mesh, with_grads: bool, fuse_dy=None):
  import jax
  from jax.sharding import PartitionSpec as P
  from siglip_fast.kernels import tpu_ring

  def local(x, y, ids, lt, b):
    bs = tpu_ring.BlockSizes.get_default(
      x.shape[1], x.dtype, batch=x.shape[0], with_grads=with_grads, fuse_dy=fuse_dy
    )
    return tpu_ring.ring_loss(
      x, y, ids, ids, lt, b, axis_name="batch", schedule="bidirectional", block_sizes=bs
    )

  f = jax.shard_map(local, mesh=mesh, in_specs=(P("batch"),) * 3 + (P(), P()), out_specs=P())
  return jax.value_and_grad(f, argnums=(0, 1, 3, 4)) if with_grads else f


_COST_RE = re.compile(
  r"%([\w.\-]+) = .*custom_call_target=\"tpu_custom_call\".*?"
  r"\"cost_estimate\":\{\"flops\":\"(\d+)\""
)


_CALL_RE = re.compile(r"^\s*%(siglip_[a-z_0-9]+?)(?:\.\d+)? = .*custom-call\(", re.M)


def kernel_calls(hlo_text: str) -> dict[str, int]:
  """{kernel name: its calls} in a compiled HLO text. libtpu dumps a kernel once however
  many calls run it (the ring driver calls one block kernel per block)."""
  calls: dict[str, int] = {}
  for name in _CALL_RE.findall(hlo_text):
    calls[name] = calls.get(name, 0) + 1
  return calls


def kernel_calls_by_flops(hlo_text: str) -> dict[str, int]:
  """{"kernel name|FLOPs": calls}: ``kernel_calls`` split by each call's cost estimate, so
  that calls of one kernel on blocks of two sizes (the ring driver's own block and its
  half chunks) are told apart."""
  calls: dict[str, int] = {}
  for op, flops in kernel_flops(hlo_text).items():
    m = _CALL_RE.match(f"%{op} = custom-call(")
    if m:
      key = f"{m.group(1)}|{flops}"
      calls[key] = calls.get(key, 0) + 1
  return calls


def kernel_flops(hlo_text: str) -> dict[str, int]:
  """{op name: FLOPs} of the Pallas calls in a compiled HLO text, from each kernel's own
  ``pl.CostEstimate`` (the tpu_custom_call's backend config)."""
  return {m.group(1): int(m.group(2)) for m in map(_COST_RE.search, hlo_text.splitlines()) if m}


def _compile_case(gen, kernel, batch, dim, dump, mosaic):
  """Compile one case; return the paths of the new dump files (moved into their own folder)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from siglip_fast.kernels import tpu

  devices = topologies.get_topology_desc(
    platform="tpu", topology_name=chips_lib.CHIPS[gen].topology
  ).devices
  before = set(os.listdir(dump)), set(os.listdir(mosaic))
  if kernel.startswith("ring"):
    devs, _ = chips_lib.one_device_per_chip(devices)
    devs = devs[:RING_DEVICES]
    mesh, spec = Mesh(np.array(devs), ("batch",)), P("batch")
    # ring_hop: the API's default plan (one trip where dX fits VMEM); ring_hop_2trip forces
    # the two trips (fuse_dy=False).
    if kernel == "ring_blocks":
      f = _ring_blocks_fn(mesh)
    else:
      f = _ring_fn(mesh, kernel != "ring_hop_fwd", False if kernel == "ring_hop_2trip" else None)
  else:
    mesh, spec = Mesh(np.array(devices[:1]), ("batch",)), P()
    # The tiles the public API picks by default: value-and-grad chooses the fused plan
    # before the tiles (tpu.grad_block_sizes); the two-kernel case forces fuse_dy=False.
    if kernel == "value_and_grad":
      bs = tpu.grad_block_sizes(gen, batch, batch, dim, jnp.bfloat16)
    elif kernel == "fwd":
      bs = tpu.forward_block_sizes(gen, dim=dim)
    else:
      bs = tpu.BlockSizes.for_generation(gen, dim)
    f = _block_fn(kernel, bs)
  sds = lambda shape, dt, s: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, s))
  args = (
    sds((batch, dim), jnp.bfloat16, spec),
    sds((batch, dim), jnp.bfloat16, spec),
    sds((batch,), jnp.int32, spec),
    sds((), jnp.float32, P()),
    sds((), jnp.float32, P()),
  )
  compiled = jax.jit(f).lower(*args).compile()
  flops = kernel_flops(compiled.as_text())
  if not flops:  # e.g. the ring's call shows no backend config: the program's cost analysis
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops"):
      flops = {"*program*": int(cost["flops"])}
  case = pathlib.Path(dump) / "cases" / f"{kernel}-{dim}"
  (case / "mosaic").mkdir(parents=True)
  for name in set(os.listdir(dump)) - before[0] - {"cases"}:
    os.replace(os.path.join(dump, name), case / name)
  for name in set(os.listdir(mosaic)) - before[1]:
    os.replace(os.path.join(mosaic, name), case / "mosaic" / name)
  (case / "flops.json").write_text(json.dumps(flops))
  (case / "calls.json").write_text(json.dumps(kernel_calls(compiled.as_text())))
  (case / "calls_by_flops.json").write_text(json.dumps(kernel_calls_by_flops(compiled.as_text())))
  return case, mesh.devices.size


def profile_case(gen, kernel, batch, dim, case_dir, n_dev) -> list[dict]:
  """Rows (one per siglip kernel op of the case) from its dump folder."""
  kernels = find_kernels(case_dir)
  if not kernels:
    raise DumpFormatError(case_dir, f"dump files of at least one op named {KERNEL_PREFIX}*")
  grids = mosaic_grids(pathlib.Path(case_dir) / "mosaic")
  cores = MXU[gen][0]
  clock = clock_hz(gen)
  flops_path = pathlib.Path(case_dir) / "flops.json"
  flops = json.loads(flops_path.read_text()) if flops_path.exists() else {}
  rows = []
  for op, (bpath, upath) in kernels.items():
    ks = kernel_schedule(op, bpath, upath)
    base = op.split("#")[0].rsplit(".", 1)[0]
    grid, semantics = _grid_of(grids.get(base, []), ks.loop.trips if ks.loop else None, cores)
    row = {
      "generation": gen,
      "kernel": kernel,
      "op": op,
      "batch": batch,
      "dim": dim,
      "clock_ghz": round(clock / 1e9, 4),
      "bundles": ks.bundles,
      "loop_bundles": ks.body_cycles if ks.loop else None,
      "loop_trips": ks.loop.trips if ks.loop else None,
    }
    row.update({_key(u): round(v, 4) for u, v in ks.busy.items()})
    row["spill_frac"] = round(ks.spill_frac, 4)
    # The steady-state step: one-off regions (first / last step) and the longer of two
    # alternative tile bodies skipped.
    row["steady_bundles"] = len(ks.steady)
    row["full_tile_bundles"] = len(ks.full)  # a step of a tile on the full body
    row.update({"steady_" + _key(u): round(v, 4) for u, v in ks.steady_busy.items()})
    row["steady_spill_frac"] = round(ks.steady_spill_frac, 4)
    row["loop_op_counts"] = ks.counts
    # The kernel's CostEstimate; a program of one kernel whose call does not show it: the
    # program's cost analysis (the kernel's estimate plus a few scalar ops). None: unknown.
    op_flops = flops.get(op.split("#")[0])
    if op_flops is None and len(kernels) == 1 and "*program*" in flops:
      op_flops = flops["*program*"]
      row["cost_flops_source"] = "program cost_analysis"
    row["cost_flops"] = op_flops
    if grid:  # a Pallas grid: one step per loop trip (plus the pipeline's fill and drain)
      if ks.loop is None and math.prod(grid) == 1:
        # Mosaic emits no loop for one step; the batch fits one tile (a kernel error row).
        raise ValueError(
          f"{base} runs its grid {grid} in one step, which the schedule holds as no loop: "
          "profile a batch of more than one tile"
        )
      if ks.loop is None:
        if not (cores > 1 and math.prod(grid) == cores):
          raise DumpFormatError(bpath, f"a loop for the grid {grid} of {base}")
        # Megacore, one grid step a TensorCore: Mosaic emits no loop; the kernel's bundles
        # are that step with its fill and drain.
        steps, split = 1, True
        step_cycles = steady_cycles = ks.bundles
        row["one_step_a_core"] = True
      else:
        steps, split = core_steps(grid, ks.loop.trips, cores)
        step_cycles, steady_cycles = ks.body_cycles, len(ks.steady)
      if split:
        op_flops = op_flops / cores if op_flops else op_flops
      row.update(
        grid=list(grid),
        grid_steps=steps,
        static_cycles=steps * step_cycles,
        steady_static_cycles=steps * steady_cycles,
      )
      row["steady_static_us"] = round(row["steady_static_cycles"] / clock * 1e6, 2)
      if op_flops:
        row["mxu_ideal_cycles"] = round(op_flops / steps / mxu_flops_per_cycle(gen), 1)
        row["mxu_ideal_ratio"] = round(row["mxu_ideal_cycles"] / step_cycles, 4)
        row["steady_mxu_ideal_ratio"] = round(row["mxu_ideal_cycles"] / steady_cycles, 4)
    else:  # no grid (the ring): the loop tree at its exit tests' trip counts
      row.update(
        grid=[],
        grid_steps=None,
        static_cycles=ks.static_cycles,
        steady_static_cycles=ks.steady_static_cycles,
      )
      if ks.steady_static_cycles:
        row["steady_static_us"] = round(ks.steady_static_cycles / clock * 1e6, 2)
      if ks.static_cycles and op_flops:
        row["mxu_ideal_cycles"] = round(op_flops / mxu_flops_per_cycle(gen), 1)
        row["mxu_ideal_ratio"] = round(row["mxu_ideal_cycles"] / ks.static_cycles, 4)
    row["static_us"] = (
      round(row["static_cycles"] / clock * 1e6, 2) if row["static_cycles"] else None
    )
    busy = {u: ks.busy[u] for u in ISSUE_UNITS}
    row["bound"] = max(busy, key=busy.get)
    row["steady_bound"], row["steady_floor_x"] = floor(row)
    if kernel.startswith("ring") and kernel != "ring_blocks":
      row.update(_ring_hop(gen, op, batch, dim, n_dev, row["steady_static_cycles"], clock))
    rows.append(row)
  if kernel == "ring_blocks":
    # The block calls (one or more per block or half block, a block per chunk a device
    # sees) are the trip's compute together. A kernel dumped once may run in several calls:
    # each of its rows stands for calls / rows of the calls with its name and FLOPs. Every
    # row gets the hop they make together.
    read = lambda name: json.loads((pathlib.Path(case_dir) / name).read_text())
    exists = lambda name: (pathlib.Path(case_dir) / name).exists()
    calls = read("calls.json") if exists("calls.json") else {}
    by_flops = read("calls_by_flops.json") if exists("calls_by_flops.json") else {}
    total = 0
    for r in rows:
      base = r["op"].split("#")[0].rsplit(".", 1)[0]
      key = lambda q: (q["op"].split("#")[0].rsplit(".", 1)[0], q.get("cost_flops"))
      same = sum(1 for q in rows if key(q) == key(r))
      n = by_flops.get(f"{base}|{r.get('cost_flops')}")
      if n is None:  # no cost estimate to tell sizes apart: the kernel's calls evenly
        same = sum(1 for q in rows if key(q)[0] == base)
        n = calls.get(base, same)
      r["calls_per_row"] = n / same
      if total is not None and r.get("steady_static_cycles") is not None:
        total += r["steady_static_cycles"] * r["calls_per_row"]
      else:
        total = None
    for r in rows:
      r.update(_ring_hop(gen, r["op"], batch, dim, n_dev, total, clock, driver=True))
  return rows


# The units a bundle issues to, each with its own slots (VLOAD:FILL and VSTORE:SPILL are
# the slots of VLOAD and VSTORE that fills and spills take, not units of their own).
ISSUE_UNITS = ("MXU", "XLU", "VALU", "VPOP", "EUP", "VLOAD", "VSTORE", "SALU")


def floor(row, prefix: str = "steady_") -> tuple[str, float] | tuple[None, None]:
  """(binding unit, bundles over its floor) of a profile row's step (``prefix`` "steady_":
  the steady step; "": every bundle of the loop body).

  A unit's floor is the bundles its slots alone need: slots used / slots per bundle, i.e.
  its busy fraction times the bundles. No schedule of the same instructions can be shorter
  than the largest floor, so bundles / that floor (1 / the busiest unit's fraction) is how
  far the schedule is from the limit the instruction mix sets: 1.0 is a unit busy in every
  bundle. (The floor counts issue slots, not latencies: an MXU result that needs more cycles
  than the schedule gives it is the separate ``mxu_ideal_ratio``.)"""
  busy = {u: row.get(f"{prefix}{_key(u)}") for u in ISSUE_UNITS}
  busy = {u: v for u, v in busy.items() if v is not None}
  if not busy or max(busy.values()) <= 0:
    return None, None
  unit = max(busy, key=busy.get)
  return unit, round(1 / busy[unit], 3)


def _key(unit: str) -> str:
  return unit.lower().replace(":", "_") + "_busy"


def _ring_hop(gen, op, batch, dim, n_dev, cycles, clock, driver=False) -> dict:
  """Compute per hop (``cycles`` cover the n_dev blocks of a trip) against one hop's wire
  time on one link. A trip of the two-trip plan (``..._dx``, ``..._dy``) or the loss-only
  ring moves a bf16 chunk and its int32 ids per hop. The one-trip plan
  (``siglip_ring_fwd_bwd``) and the shared ring ``driver`` (block kernels) move the chunk,
  its ids and its f32 dY, under bidirectional (three or more chips) half of each per link
  direction. (Profiles of the driver before 2026-12-04's half chunks counted the whole
  chunk and dY a hop: its copies went both ways.)"""
  chip = chips_lib.CHIPS[gen]
  b = batch // n_dev
  wire = b * dim * 2 + b * 4
  if driver or op.split(".")[0] == "siglip_ring_fwd_bwd":
    wire = (wire + b * dim * 4) // (2 if n_dev >= 3 else 1)
  out = {
    "ring_devices": n_dev,
    "hop_wire_bytes": wire,
    "hop_wire_us": round(wire / chip.link_bw * 1e6, 2),
    "link_bw": chip.link_bw,
  }
  if cycles:
    out["hop_cycles"] = cycles // n_dev
    out["hop_us"] = round(out["hop_cycles"] / clock * 1e6, 2)
    out["hop_hidden_ratio"] = round(out["hop_us"] / out["hop_wire_us"], 2)
  return out


def _child(gen, kernels, dims, batch, dump):
  """In a fresh process whose LIBTPU_INIT_ARGS point at ``dump``: compile and profile."""
  mosaic = os.path.join(dump, "mosaic")
  rows = []
  for dim in dims:
    for kernel in kernels:
      t0 = time.perf_counter()
      try:
        case, n_dev = _compile_case(gen, kernel, batch, dim, dump, mosaic)
        out = profile_case(gen, kernel, batch, dim, case, n_dev)
      except DumpFormatError:
        raise
      except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a row
        out = [
          {
            "generation": gen,
            "kernel": kernel,
            "batch": batch,
            "dim": dim,
            "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
          }
        ]
      for r in out:
        r["compile_s"] = round(time.perf_counter() - t0, 1)
      rows += out
      print(json.dumps(out), flush=True)
  return rows


def run_generation(gen, kernels, dims, batch, keep_dump=None) -> list[dict]:
  """Profile one generation in a child process (its own libtpu dump folder)."""
  with tempfile.TemporaryDirectory(prefix=f"tpu_profile_{gen}_") as tmp:
    dump = keep_dump or tmp
    os.makedirs(os.path.join(dump, "mosaic"), exist_ok=True)
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      TPU_SKIP_MDS_QUERY="1",
      ALLOW_MULTIPLE_LIBTPU_LOAD="1",
      LIBTPU_INIT_ARGS=(
        os.environ.get("LIBTPU_INIT_ARGS", "") + f" --xla_jf_dump_to={dump}"
        f" --xla_mosaic_dump_to={dump}/mosaic"
      ).strip(),
    )
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
      sys.executable,
      "-m",
      "benchmarks.tpu_profile",
      "--_child",
      dump,
      "--generations",
      gen,
      "--batch",
      str(batch),
      "--dims",
      *map(str, dims),
      "--kernels",
      *kernels,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    rows = []
    for line in proc.stdout.splitlines():
      if line.startswith("["):
        rows += json.loads(line)
    if proc.returncode:
      err = [l for l in proc.stderr.splitlines() if l.strip()][-5:]
      raise RuntimeError(f"profiling {gen} failed (exit {proc.returncode}):\n" + "\n".join(err))
    return rows


# ------------------------------------------------------------------------------------------
# Output

_COLS = (
  ("generation", "gen", "{}"),
  ("kernel", "kernel", "{}"),
  ("op", "op", "{}"),
  ("dim", "D", "{}"),
  ("grid_steps", "steps", "{}"),
  ("loop_bundles", "bundles/step", "{}"),
  ("static_us", "static us", "{:.1f}"),
  ("mxu_busy", "MXU", "{:.2f}"),
  ("valu_busy", "VALU", "{:.2f}"),
  ("eup_busy", "EUP", "{:.2f}"),
  ("vpop_busy", "VPOP", "{:.2f}"),
  ("vstore_busy", "VST", "{:.2f}"),
  ("spill_frac", "spill", "{:.2f}"),
  ("mxu_ideal_ratio", "ideal/bundles", "{:.2f}"),
  ("bound", "bound", "{}"),
  ("steady_bundles", "steady", "{}"),
  ("steady_mxu_busy", "sMXU", "{:.2f}"),
  ("steady_valu_busy", "sVALU", "{:.2f}"),
  ("steady_vstore_busy", "sVST", "{:.2f}"),
  ("steady_spill_frac", "sspill", "{:.2f}"),
  ("steady_bound", "sbound", "{}"),
  ("steady_floor_x", "x floor", "{:.2f}"),
  ("hop_hidden_ratio", "hop/wire", "{:.2f}"),
)


def format_table(rows) -> str:
  out = [[h for _, h, _ in _COLS]]
  for r in rows:
    if "error" in r:
      out.append([r["generation"], r["kernel"], "ERROR", str(r["dim"]), r["error"][:80]])
      continue
    out.append([fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in _COLS])
  widths = [max(len(row[i]) for row in out if i < len(row)) for i in range(len(_COLS))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in out)


def merge_calls(rows: list[dict]) -> list[dict]:
  """One row per (generation, D, batch, kernel, op name): the calls of one op that a case
  makes in sequence (the fused value-and-grad, one per super-block) summed: steady us added,
  steady occupancies weighted by each call's steady us; ``calls`` counts them (a row with
  ``calls_per_row``, a kernel dumped once for several identical calls, counts as many)."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    op = r.get("op", "").split(".")[0]
    groups.setdefault((r["generation"], r["dim"], r["batch"], r["kernel"], op), []).append(r)
  out = []
  for group in groups.values():
    ok = [r for r in group if "error" not in r and r.get("steady_static_us")]
    n = lambda r: r.get("calls_per_row", 1)
    if sum(map(n, ok)) < 2 or len(ok) != len(group):
      out += group
      continue
    total = sum(r["steady_static_us"] * n(r) for r in ok)
    merged = dict(ok[0], calls=round(sum(map(n, ok))), steady_static_us=round(total, 2))
    for k in ok[0]:
      if k.startswith("steady_") and (k.endswith("_busy") or k == "steady_spill_frac"):
        merged[k] = sum(r[k] * r["steady_static_us"] * n(r) for r in ok) / total
    out.append(merged)
  return out


def compare_table(before: list[dict], after: list[dict]) -> str:
  """A markdown table of the steady-state step, before -> after, per (generation, D, kernel,
  op) present in ``after`` (an op's successive calls merged, ``merge_calls``); ``before``
  rows are matched on generation, D, batch and op name."""
  before, after = merge_calls(before), merge_calls(after)
  key = lambda r: (r["generation"], r["dim"], r["batch"], r.get("op", "").split(".")[0])
  old = {key(r): r for r in before if "error" not in r}
  lines = [
    "| gen | D | kernel (op) | grid | steady us, before -> after | steady MXU, before -> after "
    "| VALU | VSTORE | spill | bound (steady): x its floor |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in sorted(after, key=lambda r: (r["generation"], r["dim"], r["kernel"], r.get("op", ""))):
    if "error" in r:
      lines.append(
        f"| {r['generation']} | {r['dim']} | {r['kernel']} | - | error: {r['error'][:80]} | | | | | |"
      )
      continue
    b = old.get(key(r))
    us, mxu = r.get("steady_static_us"), r["steady_mxu_busy"]
    if b and b.get("steady_static_us"):
      d = 100 * (us / b.get("steady_static_us") - 1)
      t = f"{b.get('steady_static_us'):.1f} -> {us:.1f} ({d:+.0f}%)"
      m = f"{b['steady_mxu_busy']:.2f} -> {mxu:.2f}"
    else:
      t, m = f"new: {us:.1f}", f"{mxu:.2f}"
    unit, x = floor(r)
    bound = f"{unit}: {x:.2f}x" if unit else "-"
    grid = "x".join(map(str, r["grid"])) if r.get("grid") else "ring"
    if r.get("calls"):
      grid = f"{r['calls']} x {grid}"
    op = r.get("op", "").split(".")[0]
    lines.append(
      f"| {r['generation']} | {r['dim']} | {r['kernel']} ({op}) | {grid} | {t} | {m} "
      f"| {r['steady_valu_busy']:.2f} | {r['steady_vstore_busy']:.2f} "
      f"| {r['steady_spill_frac']:.2f} | {bound} |"
    )
  return "\n".join(lines)


def ring_limit(row) -> tuple[str, float] | None:
  """(what binds, hop over that limit) of a ring trip's hop, or None for a row without one.

  A hop lasts at least its compute and at least its wire time on the link
  (``hop_wire_us``), whichever is longer: the permutes overlap the compute. Its limit is the
  larger of the compute's floor (the steady step over ``floor``'s x, per hop) and the wire
  time; where the wire is the larger, the ICI link binds ("ICI") and the hop, the longer
  of its compute and its wire time, is that many times the wire time (1.00: the compute
  hides behind the wire, and a faster schedule would not shorten the hop)."""
  unit, x = floor(row)
  compute, wire = row.get("hop_us"), row.get("hop_wire_us")
  if unit is None or not compute or not wire:
    return None
  hop = max(compute, wire)
  if wire >= compute / x:
    return "ICI", round(hop / wire, 3)
  return unit, x


def standing_table(rows: list[dict]) -> str:
  """A markdown matrix of where each kernel stands: a line per (generation, D, batch), a
  column per kernel, each cell its steady step's distance from its binding unit's floor
  (``floor``) and its steady us, per op where a kernel runs two (the two kernels, the two
  trips: dX / dY), an op's successive calls summed (``merge_calls``). A ``*`` marks a step
  whose FLOPs need more cycles at the MXUs' peak than it has bundles (``mxu_ideal_ratio`` >
  1): at the MXU limit, its real step at least that ideal. A ring trip whose wire time per
  hop is above its compute's floor (``ring_limit``) shows its hop over the wire time first,
  "ICI", then the compute's own distance from its floor in brackets."""
  rows = [r for r in merge_calls(rows) if "error" not in r and r.get("steady_static_us")]
  kernels = [
    k for k in (*KERNELS, "ring_hop_fwd", "ring_blocks") if any(r["kernel"] == k for r in rows)
  ]
  cells: dict[tuple, dict[str, list[tuple[str, str]]]] = {}
  for r in rows:
    unit, x = floor(r)
    gradient = r.get("op", "").split(".")[0].rsplit("_", 1)[-1]  # siglip_fwd_dx: "dx"
    case = cells.setdefault((r["generation"], r["dim"], r["batch"]), {})
    ideal = r.get("steady_mxu_ideal_ratio")
    if ideal is None and r.get("mxu_ideal_cycles") and r.get("steady_static_cycles"):
      ideal = r["mxu_ideal_cycles"] / r["steady_static_cycles"]  # a ring trip: no grid
    at_peak = "*" if (ideal or 0) > 1 else ""
    text = f"{x:.2f}x {unit}{at_peak}, {r['steady_static_us']:.1f} us"
    link = ring_limit(r)
    if link is not None and link[0] == "ICI":
      text = f"{link[1]:.2f}x ICI ({unit} {x:.2f}x{at_peak}), {r['steady_static_us']:.1f} us"
    case.setdefault(r["kernel"], []).append((gradient, text))

  def cell(ops):
    if len(ops) == 1:
      return ops[0][1]
    return " / ".join(f"{g[0]}{g[1:].upper()} {t}" for g, t in sorted(ops))

  lines = [
    "| gen | D | B | " + " | ".join(kernels) + " |",
    "|---|---|---|" + "---|" * len(kernels),
  ]
  for (gen, dim, batch), case in sorted(cells.items()):
    row = [cell(case[k]) if k in case else "-" for k in kernels]
    lines.append(f"| {gen} | {dim} | {batch} | " + " | ".join(row) + " |")
  return "\n".join(lines)


def plot(rows, path):
  """A heat map per D: one line per kernel op and generation, one column per unit."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cols = (
    ("mxu_busy", "MXU"),
    ("valu_busy", "VALU"),
    ("eup_busy", "EUP"),
    ("vpop_busy", "VPOP"),
    ("xlu_busy", "XLU"),
    ("vload_busy", "VLOAD"),
    ("vstore_busy", "VSTORE"),
    ("salu_busy", "SALU"),
    ("spill_frac", "spill"),
    ("mxu_ideal_ratio", "ideal/bndl"),
  )
  ok = [r for r in rows if "error" not in r]
  dims = sorted({r["dim"] for r in ok})
  n = max(len([r for r in ok if r["dim"] == d]) for d in dims)
  height = len(dims) * (1.0 + 0.3 * n)
  fig, axes = plt.subplots(len(dims), 1, figsize=(9, height), squeeze=False)
  fig.subplots_adjust(top=1 - 0.45 / height, bottom=0.1 / height, hspace=0.9 / (1 + 0.3 * n))
  for ax, dim in zip(axes[:, 0], dims):
    sel = [r for r in ok if r["dim"] == dim]
    # The steady-state step where the row has it (see steady_path), else the whole loop.
    value = lambda r, k: r.get("steady_" + k, r.get(k))
    data = [
      [value(r, k) if value(r, k) is not None else float("nan") for k, _ in cols] for r in sel
    ]
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i, line in enumerate(data):
      for j, v in enumerate(line):
        if v == v:
          ax.text(
            j,
            i,
            f"{v:.2f}",
            ha="center",
            va="center",
            fontsize=7,
            color="black" if v > 0.6 else "white",
          )
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([c for _, c in cols], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(sel)))
    ax.set_yticklabels(
      [f"{r['generation']} {r['kernel']} ({r['op'].split('.')[0]})" for r in sel], fontsize=7
    )
    ax.set_ylabel(f"D = {dim}", fontsize=9)
  fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.6, label="busy fraction (static)")
  fig.suptitle(
    f"Static unit occupancy of each kernel's steady-state grid step, B = "
    f"{ok[0]['batch']}, bf16\n(libtpu's VLIW schedule, compile-only; not measured. "
    "ideal/bndl: MXU cycles of the FLOPs / bundles)",
    fontsize=9,
    y=1 + 0.55 / height,
  )
  fig.savefig(path, dpi=90, bbox_inches="tight")
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0] + " The default run (v5e, D = 1152, B = 4096, all "
    "five kernels) takes 4-6 minutes on a shared 2-core host; each further generation x D "
    "adds about as much (the ring's two plans are over half of it; --kernels narrows it).",
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--generations", nargs="+", default=list(DEFAULT_GENERATIONS), choices=chips_lib.TPU_GENERATIONS
  )
  p.add_argument("--dims", nargs="+", type=int, default=list(DEFAULT_DIMS))
  p.add_argument(
    "--batch",
    type=int,
    default=DEFAULT_BATCH,
    help="global batch B (the ring: over %d chips)" % RING_DEVICES,
  )
  p.add_argument(
    "--kernels", nargs="+", default=list(KERNELS), choices=KERNELS + ("ring_hop_fwd", "ring_blocks")
  )
  p.add_argument("--json", help="write the rows here (nothing is written unless asked)")
  p.add_argument("--plot", help="write a PNG chart of the busy fractions here")
  p.add_argument("--keep-dump", help="keep libtpu's dump under this folder (one per generation)")
  p.add_argument(
    "--compare",
    nargs=2,
    metavar=("BEFORE", "AFTER"),
    help="print a markdown before -> after table of two --json files (either may be a "
    "comma-separated list: a case in several keeps the last file's rows) and exit; nothing "
    "is compiled",
  )
  p.add_argument(
    "--replot",
    metavar="JSON[,JSON...]",
    help="with --plot: draw the chart of committed --json files (a case in several keeps the "
    "last file's rows) and exit; nothing is compiled",
  )
  p.add_argument(
    "--standing",
    metavar="JSON[,JSON...]",
    help="print a markdown matrix of committed --json files: each kernel's steady step over its "
    "binding unit's floor (a ring trip whose wire time outlasts that floor: its hop over the "
    "wire time, 'ICI'), a line per generation, D and batch (a case in several files keeps the "
    "last file's rows) and exit; nothing is compiled",
  )
  p.add_argument("--_child", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.compare:
    # A case profiled in several files keeps the last file's rows.
    load = lambda paths: static_profiles.load_static_profiles(paths.split(","))
    print(compare_table(load(args.compare[0]), load(args.compare[1])))
    return 0
  if args.standing:
    print(standing_table(static_profiles.load_static_profiles(args.standing.split(","))))
    return 0
  if args.replot:
    if not args.plot:
      p.error("--replot needs --plot PATH")
    plot(static_profiles.load_static_profiles(args.replot.split(",")), args.plot)
    return 0
  if args._child:
    _child(args.generations[0], args.kernels, args.dims, args.batch, args._child)
    return 0
  t0 = time.perf_counter()
  rows = []
  for gen in args.generations:
    keep = os.path.join(args.keep_dump, gen) if args.keep_dump else None
    rows += run_generation(gen, args.kernels, args.dims, args.batch, keep)
  print(format_table(rows))
  print(
    f"\nSTATIC figures from libtpu's VLIW schedule, not measurements: no DMA/HBM stalls, "
    f"no throttling, every bundle one cycle. {time.perf_counter() - t0:.0f} s."
  )
  if args.json:
    meta = {
      "date": datetime.date.today().isoformat(),
      "batch": args.batch,
      "dtype": "bfloat16",
      "source": "libtpu --xla_jf_dump_to final_bundles + final_hlo-static-per-bundle-utilization",
      "versions": _versions(),
      "note": "static schedule figures, not measurements",
      "command": " ".join(["python -m benchmarks.tpu_profile", *(argv or sys.argv[1:])]),
      # Set where a sitecustomize hook patched the modules (forced tiles, an experiment's
      # form): such a file belongs under benchmarks/results/archive/.
      "pythonpath": os.environ.get("PYTHONPATH") or None,
    }
    pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  if args.plot:
    plot(rows, args.plot)
  return 1 if any("error" in r for r in rows) else 0


def _versions():
  import importlib.metadata as md

  out = {}
  for d in ("jax", "jaxlib", "libtpu"):
    try:
      out[d] = md.version(d)
    except md.PackageNotFoundError:
      pass
  return out


if __name__ == "__main__":
  sys.exit(main())

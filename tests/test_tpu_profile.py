"""The static TPU profile: its parser on a real (cut-down) libtpu dump, its refusal to read
a dump in another format, and one live compile-and-parse for a compile-only v5e."""

import json
import pathlib
import re
import shutil

import pytest

from benchmarks import tpu_profile as tp
from benchmarks import utilisation

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "tpu_profile"


def _files():
  ((op, (bundles, util)),) = tp.find_kernels(FIXTURE).items()
  return op, pathlib.Path(bundles), pathlib.Path(util)


def _copy(tmp_path):
  op, bundles, util = _files()
  for p in (bundles, util):
    shutil.copy(p, tmp_path / p.name)
  return op, tmp_path / bundles.name, tmp_path / util.name


def test_fixture_parses_to_its_known_figures():
  op, bundles, util = _files()
  assert op == "siglip_fwd.1"
  ks = tp.kernel_schedule(op, bundles, util)
  meta = json.loads((FIXTURE / "expected.json").read_text())
  assert ks.bundles == meta["bundles"]
  assert len(ks.loops) == 1 and ks.loop is ks.loops[0]
  assert (ks.loop.bundles, ks.loop.trips) == (meta["loop_bundles"], meta["loop_trips"])
  # The grid's pipeline runs two more trips than grid steps (fill and drain).
  grids = tp.mosaic_grids(FIXTURE / "mosaic")
  ((grid, semantics),) = grids["siglip_fwd"]
  assert list(grid) == meta["grid"]
  assert ks.loop.trips == meta["grid"][0] * meta["grid"][1] + 2
  assert semantics and all(s in ("parallel", "arbitrary") for s in semantics)
  # Busy fractions, recomputed here independently from the raw rows.
  lines = util.read_text().splitlines()
  cap = [int(v) for v in lines[2].split()]
  rows = [[int(v) for v in l.split()] for l in lines[4:] if l.strip()]
  body = rows[ks.loop.start : ks.loop.end + 1]
  for k, unit in enumerate(tp.UNITS):
    want = sum(r[k] for r in body) / (cap[k] * len(body))
    assert ks.busy[unit] == pytest.approx(want)
  assert 0 < ks.busy["MXU"] <= 1 and ks.busy["EUP"] > 0
  assert ks.spill_frac == pytest.approx(sum(r[8] > 0 for r in body) / len(body))
  # The loop body holds the step's matmuls and transcendentals.
  assert ks.counts["matmul"] == meta["loop_matmuls"] > 0
  assert ks.counts["transcendental"] > 0
  assert ks.static_cycles == ks.bundles - ks.loop.bundles + ks.loop.trips * ks.loop.bundles


def test_calls_of_one_kernel_name_get_the_grid_their_loop_runs():
  # The fused value-and-grad in super-blocks of 6 and 5 column tiles: two grids for one
  # kernel name; each op's loop runs its own grid's steps plus two (fill and drain).
  grids = [((1, 16, 5), ("parallel", "arbitrary", "arbitrary")), ((1, 16, 6), ())]
  assert tp._grid_of(grids, 98, 1)[0] == (1, 16, 6)
  assert tp._grid_of(grids, 82, 1)[0] == (1, 16, 5)
  assert tp._grid_of(grids, 50, 1) == (None, ())
  # Megacore: the loop runs one TensorCore's share of the parallel axis.
  assert tp._grid_of([((2, 32, 8), ())], 258, 2)[0] == (2, 32, 8)
  assert tp._grid_of([((2, 32, 8), ())], None, 2)[0] == (2, 32, 8)


def test_megacore_grids_count_one_cores_steps():
  # A loop runs its steps plus fill and drain. On megacore (2 cores) a loop of half the
  # grid's steps + 2 is one core's share: 8 of (2, 8, 1); 2 of (2, 2, 1), whose 4 trips
  # equal the grid's 4 steps (counted as 4 before 2026-12-04). Unknown trips: no split.
  assert tp.core_steps((2, 8, 1), 10, 2) == (8, True)
  assert tp.core_steps((2, 2, 1), 4, 2) == (2, True)
  assert tp.core_steps((2, 1, 1), None, 2) == (2, False)
  assert tp.core_steps((2, 32, 8), 514, 2) == (512, False)  # one core runs the whole grid
  assert tp.core_steps((1, 16, 6), 98, 1) == (96, False)


def test_nested_loops_and_trip_counts():
  text = "\n".join(
    [
      "= control target key start",
      "LB: loop body",
      "= control target key end",
      "",
      "     0   :  { %s1 = smov 0 } /* Start region 1 */",
      "   0x1 LB: > { %s2 = sadd.s32 1, %s3 } /* Start region 2 */",
      "   0x2 LB: >> { %p4 = scmp.ge.s32.totalorder %s5, 3 /* loop exit test */ } "
      "/* Start region 3 */",
      "   0x3   : >> { %6 = sbr.rel (!%p4) target = $region3 }",
      "   0x4   : > { %p7 = scmp.lt.s32.totalorder %s2, 5 }",
      "   0x5   : > { %8 = sbr.rel (%p7) target = $region2 }",
      "   0x6   :  { %9 = sbr.rel (%p7) target = $region9 }",
      "   0x7   :  {} /* Start region 9 */",
    ]
  )
  sched = _write_and_parse(text)
  (outer,) = sched.loops
  (inner,) = outer.children
  assert (outer.start, outer.end, outer.trips) == (1, 5, 5)
  assert (inner.start, inner.end, inner.trips) == (2, 3, 3)
  # 5 trips x (5 bundles, of which the inner 2 run 3 times): 5 x (3 + 6).
  assert outer.cycles() == 5 * (3 + 3 * 2)


def test_a_loop_counting_from_one_runs_one_trip_fewer():
  # lax.fori_loop(1, 4): the ring's rounds. The loop-head phi joins "smov 1" with the
  # incremented counter; the exit test compares with 4: three trips, not four.
  b = _bundle
  lines = ["= control target key start", "LB: loop body", "= control target key end", ""]
  lines.append(b(0, "", "%s20_s30 = smov 1 /* copy for cssa */"))
  lines.append(b(1, "LB", "%s21_s30 = sphi %s20_s30, %s22_s30 /* phi copy */", 1))
  lines.append(b(2, "", "%v = vmatmul.bf16 %v1"))
  lines.append(b(3, "", "%s22_s30 = sadd.s32 1, %s21_s30"))
  lines.append(b(4, "", "%p23 = scmp.ge.s32.totalorder %s22_s30, 4 /* loop exit test */"))
  lines.append(b(5, "", "%24 = sbr.rel (!%p23) target = $region1"))
  (loop,) = _write_and_parse("\n".join(lines)).loops
  assert (loop.start, loop.end, loop.trips) == (1, 5, 3)


def test_the_tile_loop_is_the_longest_loop_with_a_matmul():
  # A 4-bundle zero fill loop beside a 3-bundle loop with the tile's matmul: the matmul's.
  # With the matmul outside loops (one tile a block), no tile loop: the whole kernel.
  b = _bundle

  def kernel(tile_in_loop):
    lines = ["= control target key start", "LB: loop body", "= control target key end", ""]
    lines.append(b(0, "LB", "%v1 = vst [vmem:[%s1]] 0.0", 1))
    lines.append(b(1, "", "%v10 = vst [vmem:[%s11]] 0.0"))
    lines.append(b(2, "", "%p2 = scmp.ge.s32.totalorder %s3, 8 /* loop exit test */"))
    lines.append(b(3, "", "%4 = sbr.rel (!%p2) target = $region1"))
    lines.append(b(4, "LB" if tile_in_loop else "", "%v5 = vmatmul.bf16 %v6", 2))
    lines.append(b(5, "", "%p7 = scmp.ge.s32.totalorder %s8, 4 /* loop exit test */"))
    back = "%9 = sbr.rel (!%p7) target = $region2" if tile_in_loop else "%9 = smov 0"
    lines.append(b(6, "", back))
    return _write_and_parse("\n".join(lines))

  sched = kernel(True)
  assert [(l.start, l.bundles) for l in sched.loops] == [(0, 4), (4, 3)]
  assert tp.tile_loop(sched).start == 4
  sched = kernel(False)
  assert len(sched.loops) == 1 and tp.tile_loop(sched) is None


def test_steady_path_skips_one_off_regions_and_takes_the_lean_body():
  # A grid step: an init region without matmuls (first step only), then an if/else between
  # a long and a short tile body (both with matmuls), then the back edge.
  b = _bundle
  lines = ["= control target key start", "LB: loop body", "= control target key end", ""]
  lines.append(b(0, "LB", "%s1 = sadd.s32 1, %s0", 1))
  lines.append(b(1, "", "%2 = sbr.rel (%p9) target = $region3"))  # skip init
  lines += [b(2 + k, "", "%v = vst [vmem:[#allocation1]] %v0") for k in range(5)]
  lines.append(b(7, "", "%3 = sbr.rel (%p4) target = $region5", 3))  # if p goto else
  lines += [b(8 + k, "", "%v = vmatmul.bf16 %v1") for k in range(6)]  # long body (A)
  lines.append(b(14, "PF", "%5 = sbr.rel (!%p4) target = $region7", 5))  # else: skip B
  lines += [b(15 + k, "", "%v = vmatmul.bf16 %v1") for k in range(3)]  # short body (B)
  lines.append(b(18, "PF", "%p8 = scmp.ge.s32.totalorder %s1, 4 /* loop exit test */", 7))
  lines.append(b(19, "", "%6 = sbr.rel (!%p8) target = $region1"))
  sched = _write_and_parse("\n".join(lines))
  (loop,) = sched.loops
  assert (loop.start, loop.end, loop.trips) == (0, 19, 4)
  # 0, 1 (init skipped), 7, 14 (A skipped, the else bundle runs), B = 15..17, 18, 19.
  assert tp.steady_path(sched, loop) == [0, 1, 7, 14, 15, 16, 17, 18, 19]
  # A full-body tile runs the long side: 7, A = 8..13, 14 (its jump over B taken), 18, 19.
  assert tp.steady_path(sched, loop, lean=False) == [0, 1, 7, *range(8, 14), 14, 18, 19]


def test_the_lean_body_is_the_side_with_fewer_instructions_not_fewer_bundles():
  # libtpu can pack the full body (id compare, selects) into fewer bundles than the lean
  # one: side A, 3 bundles of 3 ops, against B, 4 bundles of 1. The lean step is B's.
  b = _bundle
  full_ops = "%v = vmatmul.bf16 %v1  ;;  %vm2 = vcmp.eq.s32.totalorder %v3, %v4  ;;  %v5 = vsel %vm2, %v6, 0.0"
  lines = ["= control target key start", "LB: loop body", "= control target key end", ""]
  lines.append(b(0, "LB", "%s1 = sadd.s32 1, %s0", 1))
  lines.append(b(1, "", "%3 = sbr.rel (%p4) target = $region5"))  # if p goto else
  lines += [b(2 + k, "", full_ops) for k in range(3)]  # A: the full body, shorter
  lines.append(b(5, "PF", "%5 = sbr.rel (!%p4) target = $region7", 5))
  lines += [b(6 + k, "", "%v = vmatmul.bf16 %v1") for k in range(4)]  # B: the lean body
  lines.append(b(10, "PF", "%p8 = scmp.ge.s32.totalorder %s1, 4 /* loop exit test */", 7))
  lines.append(b(11, "", "%6 = sbr.rel (!%p8) target = $region1"))
  sched = _write_and_parse("\n".join(lines))
  (loop,) = sched.loops
  assert tp.steady_path(sched, loop) == [0, 1, 5, 6, 7, 8, 9, 10, 11]
  assert tp.steady_path(sched, loop, lean=False) == [0, 1, 2, 3, 4, 5, 10, 11]


def test_inner_loops_run_their_trips_in_the_steady_step_and_unrolled_loops_count_steps():
  # A grid step whose tile runs an elementwise loop over strips (no matmul in it, but
  # transcendentals), unrolled by 4: its counter steps by 4 up to 128, so 32 trips.
  b = _bundle
  lines = ["= control target key start", "LB: loop body", "= control target key end", ""]
  lines.append(b(0, "LB", "%s1 = sadd.s32 1, %s0", 1))
  lines += [b(1 + k, "", "%v = vmatmul.bf16 %v1") for k in range(3)]
  lines.append(b(4, "", "%2 = sbr.rel (%p9) target = $region4"))  # guards the strip loop
  lines.append(b(5, "LB", "%s7_s6 = sadd.s32 4, %s5_s6", 3, ">>"))
  lines.append(b(6, "", "%v8 = vpow2.f32 %v2", "", ">>"))
  lines.append(b(7, "", "%p10 = scmp.ge.s32.totalorder %s7_s6, 128 /* loop exit test */", "", ">>"))
  lines.append(b(8, "", "%11 = sbr.rel (!%p10) target = $region3", "", ">>"))
  lines.append(b(9, "PF", "%p8 = scmp.ge.s32.totalorder %s1, 4 /* loop exit test */", 4))
  lines.append(b(10, "", "%6 = sbr.rel (!%p8) target = $region1"))
  sched = _write_and_parse("\n".join(lines))
  (loop,) = sched.loops
  (strips,) = loop.children
  assert (strips.start, strips.end, strips.trips) == (5, 8, 32)
  assert loop.body_cycles() == 7 + 32 * 4
  assert tp.expand(loop) == [0, 1, 2, 3, 4] + [5, 6, 7, 8] * 32 + [9, 10]
  # The guarded region holds transcendentals: the tile's work, not a one-off region.
  assert tp.steady_path(sched, loop) == tp.expand(loop)


def test_compare_table_pairs_rows_by_generation_dim_batch_and_op():
  row = lambda **kw: {
    "generation": "v5e",
    "dim": 768,
    "batch": 4096,
    "kernel": "fwd",
    "op": "siglip_fwd.1",
    "grid": [8, 8],
    "steady_static_us": 100.0,
    "steady_mxu_busy": 0.5,
    "steady_valu_busy": 0.4,
    "steady_vstore_busy": 0.1,
    "steady_spill_frac": 0.1,
    **kw,
  }
  before = [row(), row(dim=1152, steady_static_us=7.0)]
  after = [
    row(op="siglip_fwd.3", steady_static_us=80.0, steady_mxu_busy=0.6),  # same op, renumbered
    row(kernel="ring_hop", op="siglip_ring_fwd_bwd_dx.1", grid=[]),  # nothing to pair with
    {"generation": "v6e", "dim": 768, "batch": 4096, "kernel": "fwd", "error": "boom"},
  ]
  table = tp.compare_table(before, after).splitlines()
  assert len(table) == 2 + 3
  assert "| 100.0 -> 80.0 (-20%) | 0.50 -> 0.60 |" in table[2] and "| 8x8 |" in table[2]
  assert table[2].endswith("| MXU: 1.67x |")
  assert "| ring | new: 100.0 | 0.50 |" in table[3] and table[3].endswith("| MXU: 2.00x |")
  assert "error: boom" in table[4]


def test_compare_table_sums_the_calls_of_one_op():
  # The fused value-and-grad in two super-blocks: two calls of siglip_fwd_dx_dy, one row.
  row = lambda **kw: {
    "generation": "v6e",
    "dim": 1152,
    "batch": 16384,
    "kernel": "value_and_grad",
    "op": "siglip_fwd_dx_dy.1",
    "grid": [1, 16, 8],
    "steady_static_us": 100.0,
    "steady_mxu_busy": 0.8,
    "steady_valu_busy": 0.4,
    "steady_vstore_busy": 0.2,
    "steady_spill_frac": 0.3,
    **kw,
  }
  before = [row(grid=[1, 32, 32], steady_static_us=250.0, steady_mxu_busy=0.75)]
  after = [row(op="siglip_fwd_dx_dy.2"), row(op="siglip_fwd_dx_dy.3", steady_mxu_busy=0.6)]
  (merged,) = tp.merge_calls(after)
  assert merged["calls"] == 2 and merged["steady_static_us"] == 200.0
  assert merged["steady_mxu_busy"] == pytest.approx(0.7)
  table = tp.compare_table(before, after).splitlines()
  assert len(table) == 3
  assert "| 2 x 1x16x8 | 250.0 -> 200.0 (-20%) | 0.75 -> 0.70 |" in table[2]


def test_standing_table_is_a_line_per_case_and_a_cell_per_kernel():
  row = lambda **kw: {
    "generation": "v6e",
    "dim": 768,
    "batch": 4096,
    "kernel": "fwd",
    "op": "siglip_fwd.1",
    "steady_static_us": 50.0,
    "steady_mxu_busy": 0.8,
    "steady_valu_busy": 0.9,
    **kw,
  }
  rows = [
    row(),
    # The fused kernel in two calls: one op, summed; "dy" in its name is not a second op.
    row(
      kernel="value_and_grad", op="siglip_fwd_dx_dy.2", steady_mxu_busy=0.5, steady_valu_busy=0.4
    ),
    row(
      kernel="value_and_grad", op="siglip_fwd_dx_dy.3", steady_mxu_busy=0.5, steady_valu_busy=0.4
    ),
    # Two kernels: a part each, dX first.
    row(
      kernel="value_and_grad_2k",
      op="siglip_dy.4",
      steady_static_us=20.0,
      steady_mxu_ideal_ratio=1.1,
    ),
    row(kernel="value_and_grad_2k", op="siglip_fwd_dx.5", steady_valu_busy=0.25),
    row(dim=1152, steady_valu_busy=0.5, mxu_ideal_cycles=110.0, steady_static_cycles=100),
    row(dim=1152, kernel="ring_hop", op="siglip_ring_fwd_bwd.1", error="boom"),
  ]
  table = tp.standing_table(rows).splitlines()
  assert table[0] == "| gen | D | B | fwd | value_and_grad | value_and_grad_2k |"
  assert len(table) == 2 + 2
  assert table[2] == (
    "| v6e | 768 | 4096 | 1.11x VALU, 50.0 us | 2.00x MXU, 100.0 us "
    "| dX 1.25x MXU, 50.0 us / dY 1.11x VALU*, 20.0 us |"
  )
  assert table[3] == "| v6e | 1152 | 4096 | 1.25x MXU*, 50.0 us | - | - |"


def test_a_ring_trip_whose_wire_outlasts_its_compute_floor_is_bound_by_the_link():
  # MXU busy 0.8: the compute's floor per hop is 0.8 x hop_us.
  trip = lambda hop_us, wire_us, **kw: {
    "generation": "v6e",
    "dim": 768,
    "batch": 4096,
    "kernel": "ring_hop",
    "op": "siglip_ring_fwd_bwd.1",
    "steady_static_us": 4 * hop_us,
    "steady_mxu_busy": 0.8,
    "hop_us": hop_us,
    "hop_wire_us": wire_us,
    **kw,
  }
  # The wire outlasts the compute: the hop is the wire's, at the link's limit.
  assert tp.ring_limit(trip(10.0, 20.0)) == ("ICI", 1.0)
  # The compute outlasts the wire but its floor (8 us) does not: 10 / 9 of the link's limit.
  assert tp.ring_limit(trip(10.0, 9.0)) == ("ICI", 1.111)
  # The compute's floor outlasts the wire: the MXU binds, as in a block kernel.
  assert tp.ring_limit(trip(10.0, 7.0)) == ("MXU", 1.25)
  # A row without a hop (a block kernel) has no link.
  assert tp.ring_limit({k: v for k, v in trip(10.0, 7.0).items() if k != "hop_us"}) is None
  table = tp.standing_table([trip(10.0, 9.0)]).splitlines()
  assert table[2] == "| v6e | 768 | 4096 | 1.11x ICI (MXU 1.25x), 40.0 us |"
  table = tp.standing_table([trip(10.0, 7.0)]).splitlines()
  assert table[2] == "| v6e | 768 | 4096 | 1.25x MXU, 40.0 us |"


def test_a_kernel_dumped_once_counts_each_of_its_calls():
  hlo = (
    "ENTRY %main {\n"
    "  %siglip_fwd_dx_dy.6 = (f32[2]) custom-call(%a), custom_call_target=\"tpu_custom_call\"\n"
    "  %siglip_fwd_dx_dy = (f32[2]) custom-call(%b), custom_call_target=\"tpu_custom_call\"\n"
    "  %siglip_dy.2 = f32[2] custom-call(%c)\n"
    "  %fusion.siglip = f32[2] fusion(%c)\n"
    "}\n"
  )
  assert tp.kernel_calls(hlo) == {"siglip_fwd_dx_dy": 2, "siglip_dy": 1}
  # The ring driver's own block and its half chunks: one kernel, two sizes of call.
  cost = lambda f: f', backend_config={{"cost_estimate":{{"flops":"{f}","x":"1"}}}}'
  lines = hlo.splitlines()
  lines[1] += cost(200)
  lines[2] += cost(100)
  assert tp.kernel_calls_by_flops("\n".join(lines)) == {
    "siglip_fwd_dx_dy|200": 1,
    "siglip_fwd_dx_dy|100": 1,
  }
  row = {
    "generation": "v5p",
    "dim": 1152,
    "batch": 16384,
    "kernel": "ring_blocks",
    "op": "siglip_fwd_dx_dy.9",
    "grid": [2, 8, 4],
    "steady_static_us": 200.0,
    "steady_mxu_busy": 0.9,
    "calls_per_row": 4.0,
  }
  (merged,) = tp.merge_calls([row])
  assert merged["calls"] == 4 and merged["steady_static_us"] == 800.0


def test_ring_wire_per_hop_follows_the_plan():
  b, dim = 4096, 1152
  hop = lambda op, **kw: tp._ring_hop("v5p", op, 4 * b, dim, 4, 4000, 1e9, **kw)
  two_trips = hop("siglip_ring_fwd_bwd_dx.1")  # a bf16 chunk and its ids
  one_trip = hop("siglip_ring_fwd_bwd.1")  # plus its f32 dY, half each way
  driver = hop("siglip_fwd_dx_dy.7", driver=True)  # block calls: as the one trip
  assert two_trips["hop_wire_bytes"] == b * dim * 2 + b * 4
  assert one_trip["hop_wire_bytes"] == (b * dim * 6 + b * 4) // 2
  assert driver["hop_wire_bytes"] == one_trip["hop_wire_bytes"]
  assert two_trips["hop_cycles"] == one_trip["hop_cycles"] == driver["hop_cycles"] == 1000


def test_floor_is_the_busiest_issue_unit():
  row = {"steady_mxu_busy": 0.6, "steady_valu_busy": 0.8, "steady_vstore_spill_busy": 0.9}
  # VSTORE:SPILL is a share of VSTORE's slots, not a unit of its own.
  assert tp.floor(row) == ("VALU", 1.25)
  assert tp.floor({"mxu_busy": 0.5, "steady_mxu_busy": 0.25}, prefix="") == ("MXU", 2.0)
  assert tp.floor({"steady_spill_frac": 0.3}) == (None, None)
  table = tp.format_table([dict(row, generation="v6e", kernel="fwd", op="siglip_fwd.1", dim=768)])
  assert "x floor" in table.splitlines()[0]


def _bundle(addr, marker, body, region="", depth=">"):
  """One line of a final_bundles dump: address, loop marker, nesting, the bundle's ops."""
  return f"{addr:#6x} {marker or '  '}: {depth} {{ {body} }}" + (
    f" /* Start region {region} */" if region else ""
  )


def _write_and_parse(text, tmp=None):
  import tempfile

  with tempfile.TemporaryDirectory() as d:
    p = pathlib.Path(d) / "1-siglip_x.1-72-final_bundles.txt"
    p.write_text(text)
    return tp.parse_bundles(p)


def test_unknown_trip_count_gives_no_cycles():
  text = "\n".join(
    [
      "LB: loop body",
      "     0   :  { %s1 = smov 0 }",
      "   0x1 LB: > { %p4 = scmp.ge.s32.totalorder %s5, %s6 } /* Start region 2 */",
      "   0x2   : > { %6 = sbr.rel (!%p4) target = $region2 }",
    ]
  )
  sched = _write_and_parse(text)
  assert sched.loops[0].trips is None and sched.loops[0].cycles() is None


@pytest.mark.parametrize(
  "corrupt, expected",
  [
    (lambda b, u: u.write_text(u.read_text().replace("VALU", "VECALU", 1)), "unit row"),
    (lambda b, u: u.write_text(u.read_text().replace("== CAPACTIY", "== CAP", 1)), "CAPACITY"),
    (
      lambda b, u: u.write_text("\n".join(u.read_text().splitlines()[:-7]) + "\n"),
      "one row per bundle",
    ),
    (
      lambda b, u: u.write_text(
        re.sub(r"(?m)^(0 0 0 0 0 0 0 0 0) 1$", r"\1 x", u.read_text(), count=1)
      ),
      "integer slot counts",
    ),
    (
      lambda b, u: u.write_text(
        re.sub(
          r"(?m)^(\d+ \d+ \d+ \d+ \d+ \d+ \d+ \d+ \d+) (\d+)$", r"\1 9", u.read_text(), count=1
        )
      ),
      "within the capacities",
    ),
    (
      lambda b, u: b.write_text(
        "\n".join(l for l in b.read_text().splitlines() if not l.lstrip().startswith("0x5 "))
      ),
      "consecutive bundle addresses",
    ),
    (
      lambda b, u: b.write_text(b.read_text().replace("LB: loop body", "XX: loop body")),
      "control-target key",
    ),
    (
      lambda b, u: b.write_text(re.sub(r"(?m)^(\s*0x[0-9a-f]+) LB:", r"\1   :", b.read_text())),
      "to a loop body",
    ),
  ],
)
def test_corrupted_dump_fails_loudly_naming_the_file(tmp_path, corrupt, expected):
  op, bundles, util = _copy(tmp_path)
  corrupt(bundles, util)
  with pytest.raises(tp.DumpFormatError) as e:
    tp.kernel_schedule(op, bundles, util)
  msg = str(e.value)
  assert expected in msg and str(tmp_path) in msg and "refusing" in msg


def test_missing_half_of_a_dump_pair_fails(tmp_path):
  _, bundles, _ = _files()
  shutil.copy(bundles, tmp_path / bundles.name)
  with pytest.raises(tp.DumpFormatError, match="both final_bundles"):
    tp.find_kernels(tmp_path)


def test_clocks_follow_the_datasheet_peaks():
  # The clocks derived from peak FLOP/s and MXU geometry are the known ones (~1.05, 1.5,
  # 1.75, 1.75 GHz).
  assert tp.clock_hz("v4") == pytest.approx(1.05e9, rel=0.01)
  assert tp.clock_hz("v5e") == pytest.approx(1.5e9, rel=0.01)
  assert tp.clock_hz("v5p") == pytest.approx(1.75e9, rel=0.01)
  assert tp.clock_hz("v6e") == pytest.approx(1.75e9, rel=0.01)


def test_table_never_prints_a_number_it_does_not_have():
  rows = [
    {
      "generation": "v5e",
      "kernel": "fwd",
      "op": "siglip_fwd.1",
      "dim": 128,
      "loop_bundles": 10,
      "mxu_busy": 0.5,
      "static_us": None,
    },
    {"generation": "v5e", "kernel": "ring_hop", "dim": 128, "error": "X: boom"},
  ]
  table = tp.format_table(rows)
  assert "ERROR" in table and "boom" in table
  line = table.splitlines()[1]
  assert "0.50" in line and "nan" not in line.lower()


def _libtpu():
  try:
    from jax.experimental import topologies

    topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    return True
  except Exception:  # noqa: BLE001 - no libtpu in this install
    return False


@pytest.mark.skipif(not _libtpu(), reason="needs libtpu (compile-only TPU topologies)")
def test_live_compile_and_parse_v5e(tmp_path):
  """The real Mosaic compiler in a child process with libtpu's dump on, then the parser."""
  rows = tp.run_generation("v5e", ["fwd"], [256], 2048, keep_dump=str(tmp_path / "dump"))
  (row,) = rows
  assert "error" not in row, row
  assert row["op"].startswith("siglip_fwd")
  assert row["grid_steps"] >= 1 and row["loop_bundles"] > 0
  assert row["static_cycles"] == row["grid_steps"] * row["loop_bundles"]
  assert 0 < row["mxu_busy"] <= 1 and 0 < row["valu_busy"] <= 1
  assert row["cost_flops"] == 2 * 2048 * 2048 * 256
  assert row["mxu_ideal_ratio"] > 0 and row["static_us"] > 0
  assert row["bound"] in tp.ISSUE_UNITS and row["steady_bound"] in tp.ISSUE_UNITS
  steady = max(row[f"steady_{u.lower()}_busy"] for u in tp.ISSUE_UNITS)
  assert row["steady_floor_x"] == pytest.approx(1 / steady, abs=1e-3) and steady <= 1
  png = tmp_path / "p.png"
  tp.plot(rows, png)
  assert png.stat().st_size > 1000
  # A batch that fits one tile compiles to no grid loop: an error row that says so.
  (one,) = tp.run_generation("v5e", ["fwd"], [256], 1024)
  assert "one step" in one["error"] and "more than one tile" in one["error"], one


def test_replot_draws_saved_profiles_without_compiling(tmp_path, monkeypatch):
  row = lambda **kw: {
    "generation": "v5e",
    "kernel": "fwd",
    "op": "siglip_fwd.1",
    "batch": 4096,
    "dim": 768,
    "steady_mxu_busy": 0.9,
    "spill_frac": 0.1,
    **kw,
  }
  files = [tmp_path / "old.json", tmp_path / "new.json"]
  files[0].write_text(json.dumps({"rows": [row(), row(kernel="value_and_grad", op="siglip_dy")]}))
  files[1].write_text(json.dumps({"rows": [row(steady_mxu_busy=0.97)]}))
  drawn = []
  monkeypatch.setattr(tp, "plot", lambda rows, path: drawn.append((rows, path)))
  assert tp.main(["--replot", ",".join(map(str, files)), "--plot", "chart.png"]) == 0
  ((rows, path),) = drawn
  # The forward from the later file, the value-and-grad from the only file that has it.
  assert path == "chart.png" and sorted(r["kernel"] for r in rows) == ["fwd", "value_and_grad"]
  assert [r["steady_mxu_busy"] for r in rows if r["kernel"] == "fwd"] == [0.97]
  with pytest.raises(SystemExit):
    tp.main(["--replot", str(files[0])])  # nothing to draw to


def test_committed_top_level_profiles_are_of_the_code_as_it_was():
  # The reports read every benchmarks/results/tpu_profile_*.json (the newest file of a case
  # wins); a profile made with the modules patched (forced tiles, an experiment) must not
  # stand in for the defaults there: those live under benchmarks/results/archive/.
  paths = utilisation.default_static_profiles()
  if not utilisation.DEFAULT_RESULTS.is_dir():  # a Bazel sandbox holds no results
    pytest.skip("no benchmarks/results/ in this tree")
  assert paths
  for path in paths:
    data = json.loads(path.read_text())
    about = json.dumps({k: v for k, v in data.items() if k != "rows"})
    assert '"pythonpath": "' not in about, path
    assert "forced" not in about and "HOOK" not in about, path

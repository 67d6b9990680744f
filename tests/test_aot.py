"""The public API compiled ahead of time for TPUs from this CPU host (compile-only topologies).

This is what a performance engineer does before renting chips: ``jax.jit(...).lower(<shapes
sharded on the target>).compile()`` of the call they will make, then read VMEM and memory.
The dispatch, the custom VJP and the shard_map plumbing run exactly as on the chip; the
implementation and its tiles follow the target devices, not this host's CPU backend.
``benchmarks/shape_sweep.py`` runs the whole matrix of shapes and slices.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import pytest

from benchmarks import crossover, driver_schedule, ring_compare, shape_sweep
from siglip_fast import mesh as mesh_lib
from siglip_fast.kernels import tpu

MiB = 1 << 20


def _row(gen, chips, b, dim, schedule=None):
  row = shape_sweep.run_row(shape_sweep.Row(gen, chips, b, dim, schedule))
  assert row.compiled, row.error
  # O(b D) per chip, nothing near a b x b float32 buffer: at most the fused kernel's float32
  # dY and, between its calls, the float32 partial dX of each TensorCore.
  cores = tpu.TENSORCORES.get(gen, 1)
  assert row.temp_bytes_per_chip <= (2 * cores + 1) * 4 * b * dim, row
  assert row.temp_bytes_per_chip < row.bxb_f32_bytes / 4, row
  return row


def test_single_chip_value_and_grad_at_16k_picks_the_fused_kernel_for_the_target():
  # implementation=None on a CPU host, lowered for a v6e: the Pallas TPU kernel, with the
  # v6e's tiles (6 B^2 D fused kernel, its float32 dY resident in VMEM a super-block at a
  # time: two calls of 1024 x 1024 tiles here; kernels lists each name once).
  row = _row("v6e", 1, 16384, 1152)
  assert row.kernels == ("siglip_fwd_dx_dy",), row.kernels
  assert 16 * MiB < row.vmem_limit_bytes <= 128 * MiB


def test_megacore_value_and_grad_keeps_only_the_kernels_float32_arrays():
  # v5p, one chip: the fused kernel's float32 dY and each TensorCore's float32 partial dX,
  # nothing more of size b x D in HBM (plus under 1 MiB of ids and statistics). Summing the
  # partials with a reduce over the cores' axis made a fourth: 72.2 MiB here, 262 MiB at
  # b = 16384.
  b, dim, cores = 4096, 1152, tpu.TENSORCORES["v5p"]
  row = shape_sweep.run_row(shape_sweep.Row("v5p", 1, b, dim, None))
  assert row.compiled, row.error
  assert row.kernels == ("siglip_fwd_dx_dy",), row.kernels
  assert row.temp_bytes_per_chip <= (cores + 1) * 4 * b * dim + MiB, row


@pytest.mark.slow
@pytest.mark.parametrize("gen", ["v4", "v5e", "v5p", "v6e"])
def test_single_chip_value_and_grad_every_generation(gen):
  row = _row(gen, 1, 16384, 1152)
  assert all(k.startswith("siglip_") for k in row.kernels) and row.kernels


def _slow(chips):
  return pytest.param(chips, marks=pytest.mark.slow)


@pytest.mark.parametrize("chips", [_slow(4), 8, _slow(16)])
def test_megacore_ring_runs_the_block_kernels_with_the_permutes_behind_them(chips):
  # On v5p (two TensorCores per chip) at b = 4096 the public API's ring runs the block
  # kernels under the shared ring driver: each call splits its block over both TensorCores
  # (the whole-ring kernel would compute on one). XLA must overlap the driver's permutes
  # with the calls: every block call has a permute in flight across it. 8 chips have
  # rounds after the first (in a while loop, XLA left a hop of each round exposed).
  b, dim = 4096, 1152
  row = shape_sweep.Row("v5p", chips, b, dim, "bidirectional")
  compiled = shape_sweep.lower_value_and_grad(
    shape_sweep._devices("v5p", chips), b, dim, "bidirectional"
  ).compile()
  text = compiled.as_text()
  assert "siglip_fwd_dx_dy" in text and "siglip_ring" not in text, row
  assert text.count("siglip_fwd_dx_dy.") >= chips  # a block per chunk
  # Half of each chunk goes each way all the way round: n - 1 hops of its rows (bf16), n - 2
  # of the dY travelling with them (f32; the first hop carries none) and one home, every
  # hop to a ring neighbour. Every hop runs while a block computes; only the two dY hops
  # home after the last round may have none to hide behind.
  spans = driver_schedule.permute_spans(text, "siglip_fwd_dx_dy")
  chunk_hops = [n for shape, n in spans if shape.startswith(f"bf16[{b // 2},{dim}]")]
  dy_hops = [n for shape, n in spans if shape.startswith(f"f32[{b // 2},{dim}]")]
  assert len(chunk_hops) == 2 * (chips - 1) and min(chunk_hops) >= 1, spans
  assert len(dy_hops) == 2 * (chips - 1) and sorted(dy_hops)[2] >= 1, spans
  assert not any(s.startswith((f"bf16[{b},", f"f32[{b},")) for s, _ in spans), spans
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  want = 6 * b * b * dim * chips  # the fused block kernel: each logit once
  assert abs(cost["flops"] - want) < 0.01 * want, cost["flops"]
  # O(b D): the half chunks travelling with their float32 dY, double-buffered by the
  # permutes, the own block's dY and the cores' float32 partial dX (7.4 float32 (b, D)
  # arrays on 8 chips at D = 1152; 12.1 when whole chunks travelled both ways);
  # the same bound at every ring size (the rounds are unrolled: XLA must not hold more).
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= 10 * 4 * b * dim, temp


def test_megacore_driver_blocks_of_other_plans_share_the_running_dx():
  # v5p at D = 768, b = 5504 (bf16, the driver by default): the own block (all b text rows)
  # and the half chunks plan different row tiles, so dX is padded to 5632 rows in one and
  # 6144 in the other; the public API failed to compile (an aliased partial dX of the
  # wrong shape) until the running dX was re-laid out between them.
  b, dim = 5504, 768
  plans = [
    tpu._grad_plan(
      jax.ShapeDtypeStruct((b, dim), jnp.bfloat16),
      jax.ShapeDtypeStruct((m, dim), jnp.bfloat16),
      tpu.grad_block_sizes("v5p", b, m, dim, jnp.bfloat16),
      False,
      None,
    )
    for m in (b, b // 2)
  ]
  assert plans[0].x_rows != plans[1].x_rows, plans  # the case this test is about
  compiled = shape_sweep.lower_value_and_grad(
    shape_sweep._devices("v5p", 4), b, dim, "bidirectional"
  ).compile()
  text = compiled.as_text()
  assert "siglip_fwd_dx_dy" in text and "siglip_ring" not in text


def test_the_ring_kernel_is_the_default_but_on_megacore_chips_at_large_b():
  from siglip_fast import target as target_lib  # pylint: disable=import-outside-toplevel
  from siglip_fast.kernels import tpu_ring  # pylint: disable=import-outside-toplevel

  # Megacore chips take the block kernels under the driver from the smallest b at which
  # benchmarks/crossover.py models the driver ahead: v5p 1664 (at 1536 the two are level,
  # the driver 3-5% ahead, and the ring kernel holds less memory), v4 2048 (at 1792 the ring
  # kernel is 1.32x ahead at D = 768).
  runs = lambda kind, b: tpu_ring.runs_by_default(target_lib.Target("tpu", kind), b)
  for b in (1024, 4096, 32768):
    assert runs("TPU v5 lite", b) and runs("TPU v6 lite", b)
  for kind, first in (("TPU v5p", 1664), ("TPU v4", 2048)):
    assert runs(kind, 1024) and runs(kind, 1536) and runs(kind, first - 8)
    assert not runs(kind, first) and not runs(kind, 4096) and not runs(kind, 32768)
  assert tpu_ring.runs_by_default(target_lib.Target("cpu", "cpu"), 32768)  # interpret mode
  assert set(tpu_ring._MEGACORE) == set(tpu.TENSORCORES)


def test_ring_mesh_orders_compile_only_slices_as_rings():
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  for name in ("v5e:2x2", "v5e:2x4", "v6e:4x4", "v4:2x2x1", "v5p:2x2x2"):
    devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    assert mesh_lib.is_ring(devices) is False, name  # raw order has diagonal edges
    ordered = mesh_lib.ring_order(devices)
    assert mesh_lib.is_ring(ordered), name
    assert sorted(d.id for d in ordered) == sorted(d.id for d in devices)
  assert mesh_lib.ring_mesh("batch").axis_names == ("batch",)  # CPU devices: as given


@pytest.mark.slow
def test_shape_sweep_rows_compile_or_refuse_clearly():
  rows = [shape_sweep.run_row(shape_sweep.Row("v5e", 1, 4096, d, None)) for d in (768, 1536)]
  for row in rows:
    assert row.compiled or "BlockSizes" in (row.error or ""), row


_SCHEDULE = """HloModule m

%body (p: s32[]) -> s32[] {
  %siglip_fwd_dx_dy.2 = f32[] custom-call(%p), custom_call_target="tpu_custom_call"
}

ENTRY %main (a: bf16[1000], b: f32[1000]) -> f32[] {
  %collective-permute-start = (bf16[1000]{0}, bf16[1000]{0}) collective-permute-start(%a), source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %siglip_fwd_dx_dy.1 = f32[] custom-call(%a), custom_call_target="tpu_custom_call"
  %collective-permute-done = bf16[1000]{0} collective-permute-done(%collective-permute-start)
  %collective-permute-start.1 = (f32[1000]{0}, f32[1000]{0}) collective-permute-start(%b), source_target_pairs={{0,3},{1,0},{2,1},{3,2}}
  %collective-permute-start.2 = (f32[1000]{0}, f32[1000]{0}) collective-permute-start(%b), source_target_pairs={{0,3},{1,0},{2,1},{3,2}}
  %collective-permute-done.1 = f32[1000]{0} collective-permute-done(%collective-permute-start.1)
  %while = s32[] while(%i), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %collective-permute-done.2 = f32[1000]{0} collective-permute-done(%collective-permute-start.2)
}
"""


def test_driver_schedule_replays_the_permutes_against_the_calls():
  # The model behind benchmarks/driver_schedule.py on a hand-written schedule: 1000 us a
  # call, 1 MB/s links. The bf16 hop (2000 B) spans one call and waits 1000 us more; the two
  # f32 hops go the other way, one behind the other (4000 B each), and the loop's three
  # calls cover 3000 us of the second. The spans count the calls of the permute's own
  # computation only (the loop's body is another).
  assert driver_schedule.permute_spans(_SCHEDULE) == [
    ("bf16[1000]{0}", 1),
    ("f32[1000]{0}", 0),
    ("f32[1000]{0}", 0),
  ]
  got = driver_schedule.replay(_SCHEDULE, call_us=1000.0, link_bw=1e6, n_dev=4)
  assert got == dict(
    step_us=10000.0, compute_us=4000.0, exposed_us=6000.0, wire_bytes=10000, calls=4
  )  # every permute here is to a ring neighbour: the same with one_link


_FAR_PERMUTE = """HloModule m

ENTRY %main (a: f32[1000]) -> f32[] {
  %collective-permute-start = (f32[1000]{0}, f32[1000]{0}) collective-permute-start(%a), source_target_pairs={{0,2},{1,3},{2,0},{3,1}}
  %siglip_fwd_dx_dy.1 = f32[] custom-call(%a), custom_call_target="tpu_custom_call", backend_config={"cost_estimate":{"flops":"3000","transcendentals":"0"}}
  %collective-permute-done = f32[1000]{0} collective-permute-done(%collective-permute-start)
}
"""


def test_driver_schedule_charges_a_permute_for_every_link_it_crosses():
  # Every device sends two devices along a ring of four: each message crosses two links and
  # each link carries two messages, 8000 us at 1 MB/s against the call's 3000 (1 us per
  # FLOP of its cost estimate). The one-link model charges 4000.
  call_us = driver_schedule.call_flops
  got = driver_schedule.replay(_FAR_PERMUTE, call_us=call_us, link_bw=1e6, n_dev=4)
  assert (got["step_us"], got["compute_us"], got["exposed_us"]) == (8000.0, 3000.0, 5000.0)
  flat = driver_schedule.replay(_FAR_PERMUTE, call_us, 1e6, 4, one_link=True)
  assert (flat["step_us"], flat["exposed_us"]) == (4000.0, 1000.0)
  with pytest.raises(ValueError, match="cost estimate"):
    driver_schedule.replay(_SCHEDULE, call_us=call_us, link_bw=1e6, n_dev=4)


_HBM_BOUND_CALL = """HloModule m

ENTRY %main (a: f32[1000]) -> f32[] {
  %collective-permute-start = (f32[1000]{0}, f32[1000]{0}) collective-permute-start(%a), source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %siglip_fwd_dx_dy.1 = f32[] custom-call(%a), custom_call_target="tpu_custom_call", backend_config={"cost_estimate":{"flops":"3000","transcendentals":"0","bytes_accessed":"5000"}}
  %collective-permute-done = f32[1000]{0} collective-permute-done(%collective-permute-start)
}
"""


def test_crossover_charges_each_call_its_hbm_bytes_and_the_ring_kernel_its_worst_unit():
  # benchmarks/crossover.py: the driver's call of 3000 FLOPs takes 1000 us static but
  # declares 5000 bytes; at 1 MB/s of HBM it takes 5000 us and the 4000 us permute hides
  # behind it. At 10 MB/s the static time binds and the permute is exposed for 3000 us.
  chip = lambda hbm: types.SimpleNamespace(hbm_bw=hbm, link_bw=1e6)
  got = crossover.driver_step(_HBM_BOUND_CALL, {3000: 1000.0}, 4, chip(1e6))
  assert (got["step_us"], got["exposed_us"], got["hbm_bound_calls"]) == (5000.0, 0.0, 1)
  got = crossover.driver_step(_HBM_BOUND_CALL, {3000: 1000.0}, 4, chip(1e7))
  assert (got["step_us"], got["exposed_us"], got["hbm_bound_calls"]) == (4000.0, 3000.0, 0)
  with pytest.raises(KeyError, match="FLOPs"):
    crossover.driver_step(_HBM_BOUND_CALL, {6000: 1000.0}, 4, chip(1e6))
  calls = crossover.call_texts(_HBM_BOUND_CALL)
  assert [n for n, _ in calls] == ["siglip_fwd_dx_dy"] and crossover.call_bytes(calls[0][1]) == 5000
  # The ring kernel: chips x the slowest of compute, wire and HBM per hop, per trip; its
  # compiled call declares no bytes (0 here; the program's cost analysis counts them).
  ring = [("siglip_ring_fwd_bwd", "%siglip_ring_fwd_bwd.1 = f32[] custom-call(%a)")]
  rows = {"siglip_ring_fwd_bwd": dict(hop_us=10.0, hop_wire_us=30.0)}
  got = crossover.ring_kernel_step(ring, rows, 8, 1e6)
  assert got["step_us"] == 240.0 and got["trips"][0]["bound"] == "wire"
  with pytest.raises(KeyError, match="ring_hop rows"):
    crossover.ring_kernel_step(ring, {}, 8, 1e6)


def test_crossover_forces_either_path_and_restores_the_default():
  from siglip_fast import target as target_lib  # pylint: disable=import-outside-toplevel
  from siglip_fast.kernels import tpu_ring  # pylint: disable=import-outside-toplevel

  v5p = target_lib.Target("tpu", "TPU v5p")
  with crossover.forced("driver"):
    assert not tpu_ring.runs_by_default(v5p, 1024)
  with crossover.forced("ring_kernel"):
    assert tpu_ring.runs_by_default(v5p, 32768)
  assert tpu_ring.runs_by_default(v5p, 1024) and not tpu_ring.runs_by_default(v5p, 32768)


def test_ring_compare_reads_the_same_permute_windows():
  # benchmarks/ring_compare.py summarises the schedule it compiles from the same windows.
  got = ring_compare.schedule_summary(_SCHEDULE)
  assert got["collective_permutes"] == 3 and got["permutes_overlapping_a_kernel"] == 1
  assert got["permutes"][0] == dict(
    computation="main",
    start="collective-permute-start",
    done="collective-permute-done",
    kernels_between=["siglip_fwd_dx_dy.1"],
    fusions_between=0,
  )
  assert [p["kernels_between"] for p in got["permutes"][1:]] == [[], []]
  assert got["custom_calls"] == ["body/siglip_fwd_dx_dy.2", "main/siglip_fwd_dx_dy.1"]
  assert got["while_loops"] == 1

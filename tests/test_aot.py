"""The public API compiled ahead of time for TPUs from this CPU host (compile-only topologies).

This is what a performance engineer does before renting chips: ``jax.jit(...).lower(<shapes
sharded on the target>).compile()`` of the call they will make, then read VMEM and memory.
The dispatch, the custom VJP and the shard_map plumbing run exactly as on the chip; the
implementation and its tiles follow the target devices, not this host's CPU backend.
``benchmarks/shape_sweep.py`` runs the whole matrix of shapes and slices.
"""

from __future__ import annotations

import pytest

from benchmarks import shape_sweep
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


@pytest.mark.slow
@pytest.mark.parametrize("gen", ["v4", "v5e", "v5p", "v6e"])
def test_single_chip_value_and_grad_every_generation(gen):
  row = _row(gen, 1, 16384, 1152)
  assert all(k.startswith("siglip_") for k in row.kernels) and row.kernels


def _calls_under_permutes(hlo: str, kernel: str) -> list[tuple[str, int]]:
  """Per collective permute in a compiled (scheduled) HLO text, in order of its start: its
  result type and how many calls of ``kernel`` its computation runs while it is in flight
  (started before the call, done after it)."""
  spans, started = [], {}
  for line in hlo.splitlines():
    if not line.startswith(" "):  # a computation's header or end
      started = {}
      continue
    name = line.split("=", 1)[0].strip().lstrip("%")
    if " collective-permute-start(" in line:
      started[name] = len(spans)
      spans.append([line.split("=", 1)[1].split()[0].strip("(,"), 0])
    elif " collective-permute-done(" in line:
      started.pop(line.split("collective-permute-done(%", 1)[1].split(")", 1)[0], None)
    elif name.startswith(kernel) and " custom-call(" in line:
      for k in started.values():
        spans[k][1] += 1
  return [tuple(s) for s in spans]


def test_megacore_ring_runs_the_block_kernels_with_the_permutes_behind_them():
  # On v5p (two TensorCores per chip) at b = 4096 the public API's ring runs the block
  # kernels under the shared ring driver: each call splits its block over both TensorCores
  # (the whole-ring kernel would compute on one). XLA must overlap the driver's permutes
  # with the calls: every block call has a permute in flight across it.
  b, dim, chips = 4096, 1152, 4
  row = shape_sweep.Row("v5p", chips, b, dim, "bidirectional")
  compiled = shape_sweep.lower_value_and_grad(
    shape_sweep._devices("v5p", chips), b, dim, "bidirectional"
  ).compile()
  text = compiled.as_text()
  assert "siglip_fwd_dx_dy" in text and "siglip_ring" not in text, row
  assert text.count("siglip_fwd_dx_dy.") >= chips  # a block per chunk
  # Every hop of a chunk (bf16) and of the dY travelling with it (f32) runs while a block
  # computes; only the last two dY hops, home after the last block, have none to hide behind.
  spans = _calls_under_permutes(text, "siglip_fwd_dx_dy")
  chunk_hops = [n for shape, n in spans if shape.startswith(f"bf16[{b},{dim}]")]
  dy_hops = [n for shape, n in spans if shape.startswith(f"f32[{b},{dim}]")]
  assert len(chunk_hops) == chips - 1 and min(chunk_hops) >= 1, spans
  assert len(dy_hops) == chips + 1 and sorted(dy_hops)[2] >= 1, spans
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  want = 6 * b * b * dim * chips  # the fused block kernel: each logit once
  assert abs(cost["flops"] - want) < 0.01 * want, cost["flops"]
  # O(b D), about three times the whole-ring kernel's: the chunks travelling both ways with
  # their float32 dY, double-buffered by the permutes, and the cores' float32 partial dX.
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= 16 * 4 * b * dim, temp


def test_the_ring_kernel_is_the_default_but_on_megacore_chips_at_large_b():
  from siglip_fast import target as target_lib  # pylint: disable=import-outside-toplevel
  from siglip_fast.kernels import tpu_ring  # pylint: disable=import-outside-toplevel

  # Megacore chips take the block kernels where the driver's heavier wire (the chunk and
  # its float32 dY both ways) hides behind a block on both TensorCores: b >= ~3060 on v5p,
  # ~4070 on v4.
  runs = lambda kind, b: tpu_ring.runs_by_default(target_lib.Target("tpu", kind), b)
  for b in (1024, 4096, 32768):
    assert runs("TPU v5 lite", b) and runs("TPU v6 lite", b)
  assert runs("TPU v5p", 2048) and not runs("TPU v5p", 4096) and not runs("TPU v5p", 32768)
  assert runs("TPU v4", 4032) and not runs("TPU v4", 4096)
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

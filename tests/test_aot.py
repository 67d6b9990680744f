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
  cores = tpu._TENSORCORES.get(gen, 1)
  assert row.temp_bytes_per_chip <= (2 * cores + 1) * 4 * b * dim, row
  assert row.temp_bytes_per_chip < row.bxb_f32_bytes / 4, row
  return row


def test_single_chip_value_and_grad_at_16k_picks_the_fused_kernel_for_the_target():
  # implementation=None on a CPU host, lowered for a v6e: the Pallas TPU kernel, with the
  # v6e's tiles (6 B^2 D fused kernel, its float32 dY resident in VMEM a super-block at a
  # time: three calls of 1024 x 1024 tiles here; kernels lists each name once).
  row = _row("v6e", 1, 16384, 1152)
  assert row.kernels == ("siglip_fwd_dx_dy",), row.kernels
  assert 16 * MiB < row.vmem_limit_bytes <= 128 * MiB


@pytest.mark.slow
@pytest.mark.parametrize("gen", ["v4", "v5e", "v5p", "v6e"])
def test_single_chip_value_and_grad_every_generation(gen):
  row = _row(gen, 1, 16384, 1152)
  assert all(k.startswith("siglip_") for k in row.kernels) and row.kernels


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

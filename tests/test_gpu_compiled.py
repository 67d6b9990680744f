"""The GPU kernels as compiled for Hopper (sm_90a), checked on a machine with no GPU.

Interpret mode runs the kernels' math on the CPU but not their compiled code. Here the
Pallas-emitted Triton IR of the default configurations is compiled by the ``triton``
package to PTX and assembled by its ``ptxas`` (``benchmarks/gpu_ptxas.py``), and the
resource report and PTX are checked: no spills, shared memory within Hopper's 227 KiB per
block, tensor-core MMAs (``wgmma``) for bf16 and for float32 (bf16x3) inputs alike, the
fast-math epilogue (``ex2.approx``, ``rcp.approx``) and no IEEE division.

``triton`` is in the ``dev`` extra (a 270 MB wheel, ~20 s to install). Without it these tests
skip, saying so, except under CI (CI=true), where a missing triton fails: CI installs
``.[tpu,dev]``, so the check must run there.
"""

import os

import jax.numpy as jnp
import pytest

from benchmarks import gpu_ptxas

_WHY = gpu_ptxas.triton_available()
if _WHY and os.environ.get("CI", "").lower() == "true":
  raise RuntimeError(f"CI must run the sm_90a compile check, but {_WHY}")
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"{_WHY}; pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
  # The benchmark's target shape in both dtypes, and the B = 1M value-and-grad.
  return gpu_ptxas.run(
    [(32768, 1152)],
    [jnp.bfloat16, jnp.float32],
    (1 << 20, 768),
    tmp_path_factory.mktemp("ptx"),
    log=lambda s: None,
  )


def test_defaults_compile_without_spills_within_shared_memory(rows):
  assert len(rows) == 5
  for r in rows:
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert 0 < r["shared_bytes"] <= gpu_ptxas.SMEM_LIMIT, r
    assert r["registers"] <= 255 and r["ok"], r


def test_tensor_cores_and_fast_math_in_the_ptx(rows):
  for r in rows:
    # Hopper MMAs for both dtypes: float32 is bf16x3, not CUDA-core FMAs.
    assert r["wgmma"] > 0 and r["mma_sync"] == 0, r
    assert r["ex2_approx"] > 0 and r["div_rn_f32"] == 0, r
    assert r["lg2_approx"] == 0, r  # log1p is a polynomial, not __nv_log1pf
    assert (r["rcp_approx"] > 0) == (r["mode"] == "vg"), r
  by = {(r["config"], r["mode"]): r for r in rows}
  # bf16x3 issues three times the MMAs of bf16 per K step (BK 32 against 64: 1.5x as many
  # per row of D, on a tile half as tall).
  assert by[("32768x1152:float32", "fwd")]["wgmma"] > by[("32768x1152:bfloat16", "fwd")]["wgmma"]

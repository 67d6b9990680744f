"""Every implementation against the reference at YOUR shapes: set SIGLIP_TEST_SHAPES.

    SIGLIP_TEST_SHAPES="16384,1152,bfloat16;4096,768,float32" python -m pytest tests/test_user_shapes.py

B is the global batch, D the embedding width, dtype float32 or bfloat16 (default bfloat16).
Without the variable the tests skip. On the machine you train on, each implementation that can
run there is checked natively (Pallas TPU on a TPU, Pallas GPU on a GPU, XLA everywhere); on
a CPU the kernels run in interpret mode up to B = ``SIGLIP_TEST_INTERPRET_MAX`` (default 1024).
With several devices the ring (``sigmoid_loss_sharded`` over all of them, or
``SIGLIP_TEST_DEVICES``) is checked too; on CPU only the XLA ring (interpret-mode rings need
tiny buffers, see docs/DESIGN.md section 5).

The oracle is float64 NumPy up to B = 4096; above that (its B x B float64 matrices would need
gigabytes) it is the XLA reference on float32 copies of the inputs at HIGHEST matmul
precision, on the device. Tolerances: bf16 inputs 1e-2 (bf16 rounding of the gradients);
float32 inputs 1e-5 on CPU, 1e-2 on TPU / GPU, whose default float32 matmuls take bf16 / TF32
passes (docs/DESIGN.md section 5).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import siglip_fast
from siglip_fast.loss import REGISTRY
from benchmarks.utilisation import parse_shapes
from tests.helpers import numpy_loss_and_grads, random_inputs, rel_err

_ENV = os.environ.get("SIGLIP_TEST_SHAPES", "")
SHAPES = parse_shapes(_ENV) if _ENV.strip() else []
INTERPRET_MAX = int(os.environ.get("SIGLIP_TEST_INTERPRET_MAX", "1024"))
ORACLE_MAX = 4096
LT, BIAS = math.log(10.0), -10.0

pytestmark = pytest.mark.skipif(
  not SHAPES, reason='set SIGLIP_TEST_SHAPES="B,D[,dtype];..." to check your shapes'
)


def _tolerance(dtype) -> float:
  if jnp.dtype(dtype) == jnp.bfloat16 or jax.default_backend() != "cpu":
    return 1e-2
  return 1e-5


def _run_mode(impl: str, batch: int):
  """(interpret flag, reason to skip or None) for ``impl`` on this backend."""
  if impl == "xla":
    return False, None
  backend = jax.default_backend()
  if backend == REGISTRY[impl].platform:
    return False, None
  if backend != "cpu":
    return False, f"{impl} does not run on {backend}"
  if batch > INTERPRET_MAX:
    return True, (
      f"{impl} in interpret mode on CPU above B = {INTERPRET_MAX} is too slow; "
      "raise SIGLIP_TEST_INTERPRET_MAX or run on the accelerator"
    )
  return True, None


def _reference(x, y):
  if x.shape[0] <= ORACLE_MAX:
    return numpy_loss_and_grads(x, y, LT, BIAS)
  with jax.default_matmul_precision("highest"):
    f = jax.jit(
      jax.value_and_grad(
        lambda *a: siglip_fast.sigmoid_loss(*a, implementation="xla"), argnums=(0, 1, 2, 3)
      )
    )
    loss, grads = f(
      x.astype(jnp.float32), y.astype(jnp.float32), jnp.float32(LT), jnp.float32(BIAS)
    )
  return loss, grads


def _check(value_and_grads, ref, dtype):
  loss, grads = value_and_grads
  ref_loss, ref_grads = ref
  tol = _tolerance(dtype)
  errs = {"loss": rel_err(loss, ref_loss)}
  errs.update(
    {n: rel_err(g, r) for n, g, r in zip(("dx", "dy", "dlog_t", "dbias"), grads, ref_grads)}
  )
  assert all(e < tol for e in errs.values()), f"relative errors {errs} (tolerance {tol})"
  assert grads[0].dtype == dtype and grads[1].dtype == dtype


def _ids(shape):
  return f"B{shape.batch}-D{shape.dim}-{shape.dtype}"


@pytest.mark.parametrize("impl", siglip_fast.IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_single_device(shape, impl):
  interpret, skip = _run_mode(impl, shape.batch)
  if skip:
    pytest.skip(skip)
  dtype = jnp.dtype(shape.dtype)
  x, y = random_inputs(9000 + shape.batch + shape.dim, shape.batch, shape.dim, dtype)
  try:
    siglip_fast.block_ops(impl, interpret=interpret)
  except ValueError as e:  # not in this install (e.g. no GPU kernel module)
    pytest.skip(str(e))
  f = jax.jit(
    jax.value_and_grad(
      lambda *a: siglip_fast.sigmoid_loss(*a, implementation=impl, interpret=interpret),
      argnums=(0, 1, 2, 3),
    )
  )
  _check(f(x, y, jnp.float32(LT), jnp.float32(BIAS)), _reference(x, y), dtype)


@pytest.mark.parametrize("impl", siglip_fast.IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_ring_over_devices(shape, impl):
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu and impl != "xla":
    pytest.skip(
      "interpret-mode rings need per-device buffers under 96 KiB; check kernel "
      "rings on the accelerator"
    )
  interpret, skip = _run_mode(impl, shape.batch)
  if skip:
    pytest.skip(skip)
  n = int(os.environ.get("SIGLIP_TEST_DEVICES", 4 if on_cpu else jax.device_count()))
  n = min(n, jax.device_count())
  if n < 2:
    pytest.skip("one device: no ring to check")
  if shape.batch % n:
    pytest.skip(f"B = {shape.batch} is not divisible by {n} devices")
  try:
    siglip_fast.block_ops(impl, interpret=interpret)
  except ValueError as e:
    pytest.skip(str(e))
  dtype = jnp.dtype(shape.dtype)
  x, y = random_inputs(9500 + shape.batch + shape.dim, shape.batch, shape.dim, dtype)
  mesh = Mesh(np.array(jax.devices()[:n]), ("batch",))
  f = jax.jit(
    jax.value_and_grad(
      lambda *a: siglip_fast.sigmoid_loss_sharded(
        *a, mesh=mesh, axis_name="batch", implementation=impl, interpret=interpret
      ),
      argnums=(0, 1, 2, 3),
    )
  )
  _check(f(x, y, jnp.float32(LT), jnp.float32(BIAS)), _reference(x, y), dtype)

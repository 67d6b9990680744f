"""The in-kernel TPU ring (kernels/tpu_ring.py): TPU interpret mode on simulated CPU devices,
both schedules and both DMA execution modes, race detection, leftover semaphores, where the
copies sit against the compute (neighbours only, both directions in flight at once), and AOT
compilation for real multi-chip TPU slices at real shapes.

Interpret mode on several simulated devices stalls, with no protocol of ours involved, once a
kernel buffer reaches 100 KiB (102,400 bytes) on a host with few cores:
``test_interpreter_stall_reproduction`` holds the minimal reproduction (a two-copy kernel, no
semaphore of ours, no remote copy). Cause: every interpret-mode callback goes through jax's
``io_callback_impl``, which ``device_put``s its (already host) operands onto a CPU device;
PjRt's CPU client copies host buffers of 100 KiB and more (its ``kSmallDataTransferByteSize``)
on its worker thread pool instead of inline, and that pool's threads are held by the device
programs of the kernel, each blocked in a callback waiting for the others. The stall shows at
exactly 102,400 bytes (101,888 runs), and goes away when the callback skips the ``device_put``
(the ``host_callbacks`` fixture). Cases without the fixture keep every kernel buffer under
100 KiB; the 8-device b = 128, D = 128 cases (128 KiB landing slots) use it.

Every test runs under a watchdog that dumps all threads and exits the process if a case hangs,
so CI fails instead of blocking.
"""

import faulthandler
import logging
import math
import os
import subprocess
import sys
import textwrap

# Compile-only libtpu may run beside other test processes that loaded it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from siglip_fast.kernels import mosaic_common as mc  # noqa: E402
from siglip_fast.kernels import tpu_ring  # noqa: E402
from siglip_fast.reference import ring_loss as reference_ring  # noqa: E402
from siglip_fast.reference import sigmoid_loss_dense  # noqa: E402
from tests.helpers import (  # noqa: E402
  numpy_loss_and_grads,
  pallas_calls,
  random_inputs,
  rel_err,
  scalar_grad_scales,
  scratch_shapes,
)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
HANG_S = 300
# What TPU interpret mode prints (and a TPU would crash on) at kernel exit; and on a race.
LEFTOVER_SEMAPHORE = "non-zero count"
RACE = "RACE DETECTED"


@pytest.fixture(autouse=True)
def _watchdog():
  faulthandler.dump_traceback_later(HANG_S, exit=True)
  yield
  faulthandler.cancel_dump_traceback_later()
  # Interpret mode keeps shared state after a failed kernel; start every test clean.
  pltpu.reset_tpu_interpret_mode_state()


@pytest.fixture
def host_callbacks(monkeypatch):
  """Interpret-mode callbacks take their operands as the host arrays XLA hands them, without
  jax's device_put (the interpreter stall in the module docstring). Only the transfer is
  skipped: the callbacks, and so the simulated kernel, are unchanged."""
  from jax._src import callback, tree_util

  if not hasattr(callback, "io_callback_impl"):
    pytest.skip("this jax has no callback.io_callback_impl to route around")

  def impl(*args, callback, **unused):
    del unused
    return tree_util.tree_map(np.asarray, callback(*args))

  monkeypatch.setattr(callback, "io_callback_impl", impl)


def _races_found():
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

  return bool(ipc.races is not None and ipc.races.races_found)


def _mesh(n):
  return Mesh(np.array(jax.devices()[:n]), ("x",))


def _params(mode, races=False):
  return pltpu.InterpretParams(dma_execution_mode=mode, detect_races=races)


def _sharded(fn, n, with_grads):
  """jit of fn(x, y, ids, log_t, bias) as a ring over n devices (value, or value and grads)."""
  f = jax.shard_map(fn, mesh=_mesh(n), in_specs=(P("x"), P("x"), P("x"), P(), P()), out_specs=P())
  if not with_grads:
    return jax.jit(f)
  return jax.jit(
    jax.value_and_grad(lambda x, y, ids, lt, b: f(x, y, ids, lt, b), argnums=(0, 1, 3, 4))
  )


def _kernel_ring(n, schedule, interpret, block_sizes, with_grads=True):
  def local(x, y, ids, lt, b):
    return tpu_ring.ring_loss(
      x,
      y,
      ids,
      ids,
      lt,
      b,
      axis_name="x",
      schedule=schedule,
      interpret=interpret,
      block_sizes=block_sizes,
    )

  return _sharded(local, n, with_grads)


def _reference_ring(n, schedule, with_grads=True):
  def local(x, y, ids, lt, b):
    return reference_ring(x, y, ids, ids, lt, b, axis_name="x", schedule=schedule)

  return _sharded(local, n, with_grads)


def _assert_matches(got, want, tol, scales):
  """``scales``: sum |terms| of dlog_t and of dbias (tests.helpers.scalar_grad_scales). Both
  are sums of terms of either sign that largely cancel, so their float32 error is bounded
  relative to those sums, not to the results (as in the conformance suite)."""
  loss, (dx, dy, dlt, db) = got
  want_loss, (wdx, wdy, wdlt, wdb) = want
  assert rel_err(loss, want_loss) < tol
  assert rel_err(dx, wdx) < tol
  assert rel_err(dy, wdy) < tol
  assert abs(float(dlt) - float(wdlt)) < tol * scales[0]
  assert abs(float(db) - float(wdb)) < tol * scales[1]


def _assert_clean(capfd, races_checked):
  out, err = capfd.readouterr()
  assert LEFTOVER_SEMAPHORE not in out + err
  assert RACE not in out + err
  if races_checked:
    assert not _races_found()


def _check_ring(
  capfd, n, schedule, mode, dtype, races, block_sizes, b_local=64, dim=64, seed=0, ids=None
):
  batch = n * b_local
  x, y = random_inputs(seed, batch, dim, dtype)
  if ids is None:
    ids = jnp.arange(batch, dtype=jnp.int32)
  lt = jnp.float32(math.log(10.0) + 0.1 * (seed % 3))
  b = jnp.float32(-10.0 + seed % 5)
  kernel = _kernel_ring(n, schedule, _params(mode, races), block_sizes)
  got = jax.block_until_ready(kernel(x, y, ids, lt, b))
  _assert_clean(capfd, races)

  scale = scalar_grad_scales(x, y, lt, b, ids)
  tol = TOL[dtype]
  oracle = numpy_loss_and_grads(x, y, lt, b, ids)
  _assert_matches(got, oracle, tol, scale)
  _assert_matches(got, _reference_ring(n, schedule)(x, y, ids, lt, b), tol, scale)
  dense = jax.value_and_grad(sigmoid_loss_dense, argnums=(0, 1, 2, 3))(x, y, lt, b, ids)
  _assert_matches(got, dense, tol, scale)
  # Gradients come back in the input dtypes; log_t's and bias's are replicated scalars.
  assert got[1][0].dtype == dtype and got[1][1].dtype == dtype
  assert got[1][2].shape == () and got[1][3].shape == ()


# (devices, schedule, DMA execution mode, dtype, race detection, BlockSizes fields: tiles and
# fuse_dy, None being the default one-trip plan at these sizes, False the two trips).
# Multi-tile cases exercise the in-kernel tile pipeline; one-tile cases keep the larger rings
# fast.
CASES = [
  (2, "unidirectional", "on_wait", jnp.float32, False, (32, 64, False)),
  (2, "bidirectional", "eager", jnp.bfloat16, True, (16, 32)),
  (3, "bidirectional", "eager", jnp.float32, True, (64, 64, False)),
  (3, "bidirectional", "on_wait", jnp.float32, True, (32, 16)),
  (4, "unidirectional", "eager", jnp.float32, True, (32, 64)),
  pytest.param(4, "bidirectional", "on_wait", jnp.float32, False, (16, 32), marks=pytest.mark.slow),
  pytest.param(
    4, "bidirectional", "eager", jnp.bfloat16, True, (16, 32, False), marks=pytest.mark.slow
  ),
  pytest.param(8, "bidirectional", "on_wait", jnp.float32, False, (64, 64), marks=pytest.mark.slow),
  pytest.param(8, "unidirectional", "eager", jnp.float32, True, (64, 64), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("n,schedule,mode,dtype,races,tiles", CASES)
def test_ring_matches_reference(capfd, n, schedule, mode, dtype, races, tiles):
  _check_ring(
    capfd,
    n,
    schedule,
    mode,
    dtype,
    races,
    tpu_ring.BlockSizes(*tiles),
    seed=1000 + 17 * n + len(schedule) + len(mode),
  )


# The largest interpreted rings: 8 devices, b = 128, D = 128, 2 x 2 tiles per block. The f32
# dY landing slots of the one-trip plan (and in float32 the chunk slots) are 128 KiB: past the
# interpreter's 100 KiB stall, so these cases run with ``host_callbacks``.
@pytest.mark.parametrize(
  "schedule,mode,dtype,races,fuse_dy",
  [
    ("bidirectional", "on_wait", jnp.float32, False, None),
    pytest.param("unidirectional", "eager", jnp.bfloat16, True, False, marks=pytest.mark.slow),
    pytest.param("unidirectional", "eager", jnp.float32, True, None, marks=pytest.mark.slow),
    pytest.param("bidirectional", "eager", jnp.bfloat16, True, False, marks=pytest.mark.slow),
  ],
)
def test_ring_8_devices_b128(request, capfd, schedule, mode, dtype, races, fuse_dy):
  request.getfixturevalue("host_callbacks")
  _check_ring(
    capfd,
    8,
    schedule,
    mode,
    dtype,
    races,
    tpu_ring.BlockSizes(64, 64, fuse_dy),
    b_local=128,
    dim=128,
    seed=1300 + len(schedule) + len(mode),
  )


_STALL = textwrap.dedent("""
    import os, sys
    n, rows, patch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu
    from jax.sharding import Mesh, PartitionSpec as P
    if patch:
      from jax._src import callback, tree_util
      callback.io_callback_impl = (
          lambda *a, callback, **k: tree_util.tree_map(np.asarray, callback(*a)))

    def kernel(x_ref, o_ref, buf, sem):  # HBM -> VMEM -> HBM: no protocol of ours at all
      for src, dst in ((x_ref, buf), (buf, o_ref)):
        c = pltpu.make_async_copy(src, dst, sem)
        c.start()
        c.wait()

    def local(x):
      return pl.pallas_call(
          kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec(memory_space=pl.ANY),
          scratch_shapes=[pltpu.VMEM(x.shape, x.dtype), pltpu.SemaphoreType.DMA(())],
          interpret=pltpu.InterpretParams())(x)

    mesh = Mesh(np.array(jax.devices()[:n]), ("x",))
    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("x"), out_specs=P("x"),
                              check_vma=False))
    x = jnp.arange(n * rows * 128, dtype=jnp.float32).reshape(n * rows, 128)
    assert bool(jnp.all(f(x) == x))
    print("done")
""")


def _stall_case(rows, patch, timeout_s):
  """Runs the two-copy kernel on 2 simulated devices with (rows, 128) f32 buffers; True if
  it finished within ``timeout_s``."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  try:
    out = subprocess.run(
      [sys.executable, "-c", _STALL, "2", str(rows), str(int(patch))],
      capture_output=True,
      text=True,
      timeout=timeout_s,
      env=env,
    )
  except subprocess.TimeoutExpired:
    return False
  assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]
  return True


@pytest.mark.slow
def test_interpreter_stall_reproduction():
  # 199 x 128 x 4 = 101,888 bytes per buffer runs; 200 rows = 102,400 bytes = 100 KiB, PjRt
  # CPU's threshold for copying host buffers on its worker pool, stalls for good (seen: no
  # progress in 10 minutes); the same kernel with the callbacks' device_put skipped runs.
  # Seen on a 2-core host; with many more cores than devices the pool may have a free thread.
  assert _stall_case(199, patch=False, timeout_s=120)
  assert not _stall_case(200, patch=False, timeout_s=45), (
    f"the interpret-mode stall did not reproduce on this {os.cpu_count()}-core host"
  )
  assert _stall_case(200, patch=True, timeout_s=120)


@pytest.mark.slow
@pytest.mark.parametrize("fuse_dy", [True, False])
@pytest.mark.parametrize("mode", ["on_wait", "eager"])
@pytest.mark.parametrize("schedule", ["unidirectional", "bidirectional"])
@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ring_matches_reference_all(capfd, n, schedule, mode, dtype, fuse_dy):
  _check_ring(
    capfd,
    n,
    schedule,
    mode,
    dtype,
    True,
    tpu_ring.BlockSizes(16, 32, fuse_dy),
    seed=2000 + 31 * n + len(schedule) + len(mode) + (dtype == jnp.bfloat16),
  )


@pytest.mark.parametrize(
  "schedule,fuse_dy",
  [
    ("bidirectional", None),
    ("bidirectional", False),
    pytest.param("unidirectional", None, marks=pytest.mark.slow),
  ],
)
def test_pair_ids_and_ragged_batch(capfd, schedule, fuse_dy):
  # b = 20 is no multiple of the 16-row tiles: padded to 32 and masked. Duplicate ids on
  # different devices are positives across the ring.
  n, b_local = 3, 20
  ids = jax.random.randint(jax.random.key(77), (n * b_local,), 0, 25).astype(jnp.int32)
  _check_ring(
    capfd,
    n,
    schedule,
    "on_wait",
    jnp.float32,
    False,
    tpu_ring.BlockSizes(16, 16, fuse_dy),
    b_local=b_local,
    dim=24,
    seed=78 + len(schedule),
    ids=ids,
  )


@pytest.mark.parametrize("fuse_dy", [None, False])
def test_tiles_that_do_not_nest(capfd, fuse_dy):
  # b = 40 with 32 x 64 tiles: the text tile is the whole chunk (40 rows) and no image tile
  # between 16 and 32 rows divides 40. Fitted independently the two padded b to
  # lcm(32, 40) = 160 rows; the image tile now divides the text tile's batch (8 rows).
  assert tpu_ring._fit_tiles(40, tpu_ring.BlockSizes(32, 64), 8) == (8, 40, 40)
  assert tpu_ring._fit_tiles(1000, tpu_ring.BlockSizes(512, 1024), 16) == (336, 1008, 1008)
  assert tpu_ring._fit_tiles(4096, tpu_ring.BlockSizes(512, 1024), 16) == (512, 1024, 4096)
  assert tpu_ring._fit_tiles(20, tpu_ring.BlockSizes(16, 16), 8) == (16, 16, 32)
  _check_ring(
    capfd,
    3,
    "bidirectional",
    "on_wait",
    jnp.float32,
    False,
    tpu_ring.BlockSizes(32, 64, fuse_dy),
    b_local=40,
    dim=24,
    seed=79,
  )


@pytest.mark.parametrize("fuse_dy", [None, False])
def test_text_tiles_fill_whole_lanes(capfd, fuse_dy):
  # The text tile is the logits tile's lanes: 448 at b = 1792 leaves every row's last vreg
  # half empty, 256 divides b in whole vregs; 272 at 4352 likewise. 1664 has no multiple
  # of 128 from 208 to 416 that divides it (only 128): 416 stays. v6e's 896 is whole.
  fit = lambda b, bs: tpu_ring._fit_tiles(b, bs, 16)
  square, wide = tpu_ring.BlockSizes(512, 512), tpu_ring.BlockSizes(512, 1024)
  assert fit(1792, square) == (448, 256, 1792) and fit(4352, square) == (272, 256, 4352)
  assert fit(1664, square) == (416, 416, 1664) and fit(2048, square) == (512, 512, 2048)
  assert fit(1792, wide) == (448, 896, 1792)
  # v6e keeps its wide text tiles whole (narrowed, they gained nothing): 576 at b = 1152.
  assert tpu_ring._fit_tiles(1152, wide, 16, tpu_ring._lanes("v6e")) == (384, 576, 1152)
  assert tpu_ring._lanes("v5e") == tpu_ring._lanes("v4") == tpu_ring._lanes(None) == 128
  # In the kernel, one trip and two: b = 384 with 256-row tiles fits 192 x 128, not
  # 192 x 192.
  bs = tpu_ring.BlockSizes(256, 256, fuse_dy)
  assert tpu_ring._fit_tiles(384, bs, 8) == (192, 128, 384)
  _check_ring(
    capfd, 2, "bidirectional", "on_wait", jnp.float32, False, bs, b_local=384, dim=24, seed=80
  )


@pytest.mark.parametrize("fuse_dy", [True, False])
def test_row_strips_match_reference(capfd, fuse_dy):
  # The trips that make the loss in 128-row strips of 256-row image tiles (v6e's default
  # form, 256 of 512 or 1024 there): the one-trip plan, or the first of two trips beside a
  # whole-tile dY trip; then the loss alone. b = 300 pads to 512, so the last tile's second
  # strip is all padding, and duplicate ids put positives in both strips of a tile.
  n, b_local = 2, 300
  ids = jax.random.randint(jax.random.key(81), (n * b_local,), 0, 400).astype(jnp.int32)
  bs = tpu_ring.BlockSizes(256, 128, fuse_dy, strip_rows=128)
  assert tpu_ring._fit_tiles(b_local, bs, 8) == (256, 128, 512)
  seed = 82 + int(fuse_dy)
  _check_ring(
    capfd,
    n,
    "bidirectional",
    "on_wait",
    jnp.float32,
    False,
    bs,
    b_local=b_local,
    dim=24,
    seed=seed,
    ids=ids,
  )
  # The trip that makes dX in strips passes their logits through a (2, strip, tn) buffer.
  x, y = random_inputs(seed, n * b_local, 24)
  lt, b = jnp.float32(2.3), jnp.float32(-9.0)
  ring = _kernel_ring(n, "bidirectional", True, bs)
  calls = pallas_calls(jax.make_jaxpr(ring)(x, y, ids, lt, b).jaxpr)
  got = {p["name"]: (2, 128, 128) in scratch_shapes(p) for p in calls}
  want = {"siglip_ring_fwd_bwd_dx": True, "siglip_ring_fwd_bwd_dy": False}
  assert got == ({"siglip_ring_fwd_bwd": True} if fuse_dy else want)
  if fuse_dy:
    return
  loss = _kernel_ring(n, "bidirectional", True, bs, with_grads=False)(x, y, ids, lt, b)
  _assert_clean(capfd, False)
  assert rel_err(loss, numpy_loss_and_grads(x, y, lt, b, ids)[0]) < TOL[jnp.float32]


def test_default_tiles_follow_the_chip_and_the_plan(monkeypatch):
  mib = 2**20

  def default(chip, dim=1152, dtype=jnp.bfloat16, **kw):
    monkeypatch.setattr(tpu_ring, "_chip", lambda: chip)
    bs = tpu_ring.BlockSizes.get_default(dim, dtype, **kw)
    return bs.block_rows, bs.block_cols, bs.fuse_dy

  v6e, v5e, v4 = ("v6e", 128 * mib), ("v5e", 128 * mib), ("v4", 16 * mib)
  # v6e, bf16: 1024 x 1024 for the loss alone; with gradients 512 x 1024 for the one-trip
  # plan where it fits with them (its resident f32 dX: b = 4096 yes), else the square tiles
  # where the one-trip plan fits with those (16384 at D = 1152), else for the two trips.
  assert default(v6e, batch=16384, with_grads=False) == (1024, 1024, None)
  assert default(v6e, batch=4096) == (512, 1024, None)
  need = tpu_ring.fused_vmem_bytes(16384, 512, 1024, 1152, 2)
  assert need > mc.VMEM_BUDGET * 128 * mib
  assert tpu_ring.fused_vmem_bytes(16384, 512, 512, 1152, 2) <= mc.VMEM_BUDGET * 128 * mib
  assert default(v6e, batch=16384) == (512, 512, None)
  assert tpu_ring.fused_vmem_bytes(32768, 512, 512, 1152, 2) > mc.VMEM_BUDGET * 128 * mib
  assert default(v6e, batch=32768) == (512, 1024, None)
  assert default(v6e, batch=4096, fuse_dy=False) == (512, 1024, False)
  # Float32 inputs keep the square tiles (the wide ones are measured for bf16 only).
  assert default(v6e, dtype=jnp.float32, batch=4096, with_grads=False) == (512, 512, None)
  assert default(v5e, batch=4096, with_grads=False) == (512, 512, None)
  assert default(v4, batch=4096) == (256, 256, None)
  assert default((None, None), batch=4096, with_grads=False) == (256, 256, None)
  # Row strips (tpu.BlockSizes.strip_rows) on v6e, bf16, in every plan; not on v5e.
  monkeypatch.setattr(tpu_ring, "_chip", lambda: v6e)
  strip = lambda **kw: tpu_ring.BlockSizes.get_default(1152, jnp.bfloat16, **kw).strip_rows
  assert strip(batch=4096) == strip(batch=16384) == strip(batch=32768) == 256
  assert strip(with_grads=False) == 256
  monkeypatch.setattr(tpu_ring, "_chip", lambda: v5e)
  assert strip(batch=4096) is None


def test_lean_and_full_tiles_follow_the_ids(capfd):
  # ids repeat every 40 rows: positives sit 40 and 80 rows off the diagonal, across tiles and
  # devices. Tile pairs whose id ranges meet take the full body, the others the lean one; a
  # pair sent down the wrong body would lose its positives' terms.
  n, b_local = 2, 64
  _check_ring(
    capfd,
    n,
    "bidirectional",
    "on_wait",
    jnp.float32,
    False,
    tpu_ring.BlockSizes(16, 16),
    b_local=b_local,
    dim=32,
    seed=91,
    ids=jnp.arange(n * b_local, dtype=jnp.int32) % 40,
  )


def test_forward_only_matches_and_skips_gradients(capfd):
  n, b_local, dim = 4, 64, 64
  x, y = random_inputs(401, n * b_local, dim)
  ids = jnp.arange(n * b_local, dtype=jnp.int32)
  lt, b = jnp.float32(math.log(10.0)), jnp.float32(-10.0)
  kernel = _kernel_ring(
    n, "bidirectional", _params("eager", True), tpu_ring.BlockSizes(32, 64), with_grads=False
  )
  loss = kernel(x, y, ids, lt, b)
  _assert_clean(capfd, True)
  assert rel_err(loss, numpy_loss_and_grads(x, y, lt, b)[0]) < 1e-5
  # Without grad only the loss kernel runs: no gradient kernel in the program.
  text = str(jax.make_jaxpr(kernel)(x, y, ids, lt, b))
  assert "siglip_ring_fwd" in text and "siglip_ring_fwd_bwd" not in text


def test_the_plan_follows_the_vmem_budget(monkeypatch):
  # Value-and-grad is one trip (6 b^2 D) where the resident f32 dX fits the VMEM budget and
  # two trips otherwise; fuse_dy forces either. No chip is known here: the budget is the
  # smallest chip's (v4, 16 MiB).
  n, b_local, dim = 4, 64, 64
  x, y = random_inputs(402, n * b_local, dim)
  ids = jnp.arange(n * b_local, dtype=jnp.int32)
  lt, b = jnp.float32(2.3), jnp.float32(-10.0)

  def kernels(block_sizes):
    text = str(
      jax.make_jaxpr(_kernel_ring(n, "bidirectional", True, block_sizes))(x, y, ids, lt, b)
    )
    return {k for k in ("siglip_ring_fwd_bwd_dx", "siglip_ring_fwd_bwd_dy") if k in text} or (
      {"siglip_ring_fwd_bwd"} if "siglip_ring_fwd_bwd" in text else set()
    )

  one, two = {"siglip_ring_fwd_bwd"}, {"siglip_ring_fwd_bwd_dx", "siglip_ring_fwd_bwd_dy"}
  assert kernels(None) == one
  assert kernels(tpu_ring.BlockSizes(32, 32, fuse_dy=False)) == two
  need = tpu_ring.fused_vmem_bytes(b_local, 64, 64, dim, 4)
  monkeypatch.setattr(tpu_ring, "_SMALLEST_VMEM", int(need / mc.VMEM_BUDGET) - 1)
  assert kernels(None) == two
  assert kernels(tpu_ring.BlockSizes(64, 64, fuse_dy=True)) == one
  # Streams of the one-trip plan: under bidirectional each direction carries half the tiles.
  assert tpu_ring._fused_streams(5, "bidirectional", 5) == ((4, 4), ((0, 3), (3, 2)))
  assert tpu_ring._fused_streams(5, "unidirectional", 5) == ((4,), ((0, 5),))
  assert tpu_ring._fused_streams(2, "bidirectional", 4) == ((1,), ((0, 4),))
  assert tpu_ring._fused_streams(1, "bidirectional", 4) == ((), ((0, 4),))


@pytest.mark.parametrize("schedule", ["unidirectional", "bidirectional"])
@pytest.mark.parametrize("with_grads,fuse_dy", [(False, None), (True, False), (True, True)])
def test_every_copy_the_kernel_builds_is_used(caplog, schedule, with_grads, fuse_dy):
  # Pallas logs a DMA descriptor built and never started or waited on (when it is freed,
  # while tracing): a copy the kernel meant to make and did not, or a descriptor built for
  # a hop that has no such copy. The two trips' hop 0 (traced apart) built the landing
  # waits it skips: 8 such logs per value-and-grad on 4 chips.
  n, b_local, dim = 4, 32, 64
  x, y = random_inputs(403, n * b_local, dim)
  ids = jnp.arange(n * b_local, dtype=jnp.int32)
  ring = _kernel_ring(n, schedule, True, tpu_ring.BlockSizes(16, 16, fuse_dy), with_grads)
  with caplog.at_level(logging.ERROR):
    jax.make_jaxpr(ring)(x, y, ids, jnp.float32(2.3), jnp.float32(-10.0))
  unused = [r for r in caplog.records if "AsyncCopyDescriptor was not used" in r.getMessage()]
  assert not unused, f"{len(unused)} descriptors built and never used"


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_single_device(dtype):
  # axis_name=None (no shard_map) and a one-device ring: the local block, no DMA.
  b_local, dim = 48, 40
  x, y = random_inputs(501, b_local, dim, dtype)
  ids = jnp.arange(b_local, dtype=jnp.int32)
  lt, b = jnp.float32(2.0), jnp.float32(-5.0)
  f = lambda x, y, lt, b: tpu_ring.ring_loss(
    x, y, ids, ids, lt, b, interpret=True, block_sizes=tpu_ring.BlockSizes(16, 16)
  )
  got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(x, y, lt, b)
  scale = scalar_grad_scales(x, y, lt, b, ids)
  _assert_matches(got, numpy_loss_and_grads(x, y, lt, b), TOL[dtype], scale)
  one = _kernel_ring(1, "bidirectional", True, None)(x, y, ids, lt, b)
  _assert_matches(one, numpy_loss_and_grads(x, y, lt, b), TOL[dtype], scale)


def test_handshake_is_load_bearing(capfd, monkeypatch):
  # Negative control for the checks above: without the "slot is free" credits, the
  # neighbours' remote writes race with reads of the slot and the credit semaphores are
  # left non-zero. Both detectors must see it (the values may well still come out right).
  monkeypatch.setattr(tpu_ring, "_take_credit", lambda sem: None)
  n, b_local, dim = 4, 64, 64
  x, y = random_inputs(601, n * b_local, dim)
  ids = jnp.arange(n * b_local, dtype=jnp.int32)
  kernel = _kernel_ring(n, "unidirectional", _params("eager", True), tpu_ring.BlockSizes(64, 64))
  jax.block_until_ready(kernel(x, y, ids, jnp.float32(2.3), jnp.float32(-10.0)))
  out, err = capfd.readouterr()
  assert LEFTOVER_SEMAPHORE in out + err
  assert RACE in out + err and _races_found()


@pytest.mark.parametrize("fuse_dy", [False, True])
@pytest.mark.parametrize(
  "n,schedule", [(4, "bidirectional"), (5, "bidirectional"), (3, "unidirectional")]
)
def test_copies_overlap_compute(monkeypatch, n, schedule, fuse_dy):
  """Where each trip places its copies against the tile compute, in program order (the trace
  order). Only neighbours are written to. Every round opens by waiting for all its streams'
  chunks (but the own block's; in the one trip the rounds' loop runs hop 0 too, its waits
  skipped at run time), starts all its sends (under bidirectional both directions, so both are in flight at
  once) before its first tile and waits for them only after its last tile. In the one-trip
  plan dY tiles leave during the block, and this device's own dY tiles are waited for only
  after the last round."""
  events = []

  class Recorded:
    def __init__(self, kind, offset, desc):
      self.kind, self.offset, self.desc = kind, offset, desc

    def __getattr__(self, op):
      method = getattr(self.desc, op)

      def call():
        events.append((op, self.kind, self.offset))
        return method()

      return call

  real_copy, real_tile, real_kernel = tpu_ring._remote_copy, tpu_ring._tile, tpu_ring._ring_kernel
  monkeypatch.setattr(
    tpu_ring, "_remote_copy", lambda kind, off, *a: Recorded(kind, off, real_copy(kind, off, *a))
  )
  monkeypatch.setattr(
    tpu_ring, "_tile", lambda *a, **k: (events.append(("tile", None, None)), real_tile(*a, **k))[1]
  )
  monkeypatch.setattr(
    tpu_ring, "_ring_kernel", lambda *a: (events.append(("kernel", None, None)), real_kernel(*a))[1]
  )
  b_local, dim = 64, 64
  x, y = random_inputs(701, n * b_local, dim)
  ids = jnp.arange(n * b_local, dtype=jnp.int32)
  kernel = _kernel_ring(n, schedule, _params("on_wait"), tpu_ring.BlockSizes(32, 32, fuse_dy))
  jax.eval_shape(kernel, x, y, ids, jnp.float32(2.3), jnp.float32(-10.0))

  assert {off for _, kind, off in events if kind} <= {1, -1}
  directions = {1, -1} if schedule == "bidirectional" else {1}
  # Per trip (two without fuse_dy: x owned, then y owned; one with it): rounds opening with
  # the chunks' receives.
  trips, dy = [], []
  for e in events:
    if e[0] == "kernel":
      trips.append([[]])
      dy.append([])
      continue
    if e[1] == "dy":
      dy[-1].append((e, len(trips[-1])))
      continue
    if e[0] == "wait_recv" and trips[-1][-1] and trips[-1][-1][-1][0] != "wait_recv":
      trips[-1].append([])
    trips[-1][-1].append(e)
  assert len(trips) == (1 if fuse_dy else 2)
  # Traced once each: the one trip's loop round (hop 0 included); the two trips' own block
  # (hop 0, traced apart), the loop's round and, with an even device count under
  # bidirectional, the right copy's extra hop, whose chunk goes no further.
  own = not fuse_dy
  extra = not fuse_dy and schedule == "bidirectional" and n % 2 == 0
  for rounds in trips:
    assert len(rounds) == own + 1 + extra
    for k, ev in enumerate(rounds):
      tiles = [i for i, e in enumerate(ev) if e[0] == "tile"]
      at = lambda op: [i for i, e in enumerate(ev) if e[0] == op and e[1] == "chunk"]
      sent = {ev[i][2] for i in at("start")}
      if own and k == 0:
        assert not at("wait_recv")
      else:
        assert max(at("wait_recv")) < tiles[0]
      assert sent == (set() if extra and k == own + 1 else directions), (k, sent)
      assert all(i < tiles[0] for i in at("start"))
      assert all(i > tiles[-1] for i in at("wait_send"))
      assert {ev[i][2] for i in at("wait_send")} == sent
  if not fuse_dy:
    assert dy == [[], []]
    return
  # dY tiles leave in both directions during the round; the round waits for the tiles that
  # arrived; the own dY tiles come home after the last round.
  (dy,) = dy
  assert {e[2] for e, r in dy if r == 1 and e[0] == "start"} == directions
  assert {e[2] for e, r in dy if r == 1 and e[0] == "wait_recv"} == directions
  home = [e for e, r in dy if r == 1][-len(directions) :]
  assert [e[0] for e in home] == ["wait_recv"] * len(directions)


@pytest.mark.parametrize(
  "kwargs,exc,match",
  [
    (dict(block_sizes=tpu_ring.BlockSizes(12, 16)), ValueError, "block_rows"),
    (dict(block_sizes=tpu_ring.BlockSizes(16, 0)), ValueError, "block_cols"),
    (dict(block_sizes=tpu_ring.BlockSizes(16, 16, fuse_dy="yes")), TypeError, "fuse_dy"),
    (dict(block_sizes=tpu_ring.BlockSizes(256, 256, strip_rows=64)), ValueError, "strip_rows"),
    (dict(block_sizes=(16, 16)), TypeError, "block_sizes"),
    (dict(schedule="ring"), ValueError, "schedule"),
  ],
)
def test_bad_arguments(kwargs, exc, match):
  x, y = random_inputs(801, 32, 16)
  ids = jnp.arange(32, dtype=jnp.int32)
  with pytest.raises(exc, match=match):
    tpu_ring.ring_loss(x, y, ids, ids, 2.3, -10.0, interpret=True, **kwargs)


@pytest.mark.parametrize(
  "args,exc,match",
  [
    (lambda x, y, i: (x, y[:16], i, i[:16]), ValueError, "same shape"),
    (lambda x, y, i: (x, y.astype(jnp.bfloat16), i, i), TypeError, "dtype"),
    (lambda x, y, i: (x.astype(jnp.int32), y.astype(jnp.int32), i, i), TypeError, "float32"),
    (lambda x, y, i: (x, y, i.astype(jnp.float32), i), TypeError, "x_ids must be integers"),
    (lambda x, y, i: (x, y, i, i[:5]), ValueError, "y_ids must have shape"),
  ],
)
def test_bad_inputs(args, exc, match):
  x, y = random_inputs(802, 32, 16)
  ids = jnp.arange(32, dtype=jnp.int32)
  with pytest.raises(exc, match=match):
    tpu_ring.ring_loss(*args(x, y, ids), 2.3, -10.0, interpret=True)


def _compile_for_slice(monkeypatch, topology, schedule, b_local, dim=1152, grads=True):
  """AOT-compiles the kernel with its default tiles under shard_map for a compile-only TPU
  slice: the real Mosaic compiler (semaphore and VMEM budgets included) and XLA's TPU
  schedule. Returns (devices, the compiled program, the (tm, tn) tiles its trips ran, the row
  strips of its trips that make the loss)."""
  from jax.experimental import topologies

  try:
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except RuntimeError as e:  # no libtpu in this install
    pytest.skip(f"compile-only TPU topology unavailable: {e}")
  # One device per chip (v4 slices list both TensorCores of a chip): a ring of chips.
  chips = {}
  for d in devices:
    chips.setdefault(tuple(getattr(d, "coords", ()) or (d.id,)), d)
  devices = list(chips.values())
  mesh = Mesh(np.array(devices), ("batch",))
  n = len(devices)
  tiles, strips, ring_call = set(), set(), tpu_ring._ring_call

  def recording_call(plan, *args, **kwargs):
    tiles.add((plan.tm, plan.tn))
    if not plan.transposed:
      strips.add(plan.strip)
    return ring_call(plan, *args, **kwargs)

  monkeypatch.setattr(tpu_ring, "_ring_call", recording_call)

  def local(x, y, ids, lt, b):
    return tpu_ring.ring_loss(x, y, ids, ids, lt, b, axis_name="batch", schedule=schedule)

  f = jax.shard_map(
    local, mesh=mesh, in_specs=(P("batch"), P("batch"), P("batch"), P(), P()), out_specs=P()
  )
  shard = lambda shape, dtype, spec: jax.ShapeDtypeStruct(
    shape, dtype, sharding=NamedSharding(mesh, spec)
  )
  args = (
    shard((n * b_local, dim), jnp.bfloat16, P("batch")),
    shard((n * b_local, dim), jnp.bfloat16, P("batch")),
    shard((n * b_local,), jnp.int32, P("batch")),
    shard((), jnp.float32, P()),
    shard((), jnp.float32, P()),
  )
  fn = jax.value_and_grad(f, argnums=(0, 1, 3, 4)) if grads else f
  compiled = jax.jit(fn).lower(*args).compile()
  return n, compiled, tiles, strips


def _flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"]


def _check_compiled(compiled, n, b_local, dim, grads, fused=None):
  """``fused``: whether value-and-grad must be the one-trip plan (6 b^2 D per block) or
  the two trips (8 b^2 D)."""
  text = compiled.as_text()
  two_trips = "siglip_ring_fwd_bwd_dx" in text and "siglip_ring_fwd_bwd_dy" in text
  one_trip = "siglip_ring_fwd_bwd." in text or 'siglip_ring_fwd_bwd"' in text
  if grads:
    assert one_trip != two_trips and one_trip == fused
  else:
    assert "siglip_ring_fwd" in text and not (one_trip or two_trips)
  # The chunks travel inside the kernel: XLA schedules no collective permute of its own.
  assert "collective-permute" not in text
  # Per device: n blocks of b x b pairs, each D multiply-adds per logit and per gradient,
  # the logits twice in two trips.
  want = (2 if not grads else 6 if fused else 8) * b_local * b_local * dim * n
  assert abs(_flops(compiled) - want) < 0.01 * want
  # O(b D) per chip (landing slots, f32 gradients), nothing of size b x b (1 GiB of f32 at
  # b = 16384, against 576 MiB for this bound).
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= 8 * b_local * dim * 4, temp


def _slow(*case):
  return pytest.param(*case, marks=pytest.mark.slow)


@pytest.mark.parametrize(
  "topology,schedule,b_local,grads,fused,tiles",
  [
    # The one-trip plan's largest resident dX (72 MiB) on a 128 MiB chip; the shapes that
    # ran out of DMA semaphores (sflag) with one semaphore per dY tile.
    ("v5e:2x4", "bidirectional", 16384, True, True, (512, 512)),
    _slow("v5e:2x4", "bidirectional", 4096, True, True, (512, 512)),
    # v6e's wide tiles where the one-trip plan fits with them, square where only they fit.
    _slow("v6e:2x4", "bidirectional", 4096, True, True, (512, 1024)),
    _slow("v6e:2x4", "bidirectional", 16384, True, True, (512, 512)),
    _slow("v5e:2x4", "unidirectional", 16384, True, True, (512, 512)),
    _slow("v6e:2x4", "unidirectional", 16384, True, True, (512, 512)),
    # dX no longer fits: two trips (v6e: in the wide tiles).
    _slow("v5e:2x4", "unidirectional", 32768, True, False, (512, 512)),
    _slow("v6e:2x4", "bidirectional", 32768, True, False, (512, 1024)),
    # The loss alone.
    _slow("v5e:2x4", "bidirectional", 16384, False, None, (512, 512)),
    _slow("v6e:2x4", "bidirectional", 4096, False, None, (1024, 1024)),
    _slow("v5e:2x2", "bidirectional", 16384, True, True, (512, 512)),
    _slow("v4:2x2x1", "bidirectional", 16384, True, False, (256, 256)),
    _slow("v4:2x2x1", "unidirectional", 4096, False, None, (256, 256)),
  ],
)
def test_compiles_for_tpu_slice(monkeypatch, topology, schedule, b_local, grads, fused, tiles):
  dim = 1152
  n, compiled, ran, strips = _compile_for_slice(
    monkeypatch, topology, schedule, b_local, dim, grads
  )
  _check_compiled(compiled, n, b_local, dim, grads, fused)
  # Tile defaults come from the target chip (128 MiB of VMEM on v5e and v6e, 16 MiB on v4;
  # v6e's wide tiles), not the host: pltpu.get_tpu_info() inside shard_map on a
  # compile-only mesh sees the target.
  assert ran == {tiles}
  # v6e's trips that make the loss run in 256-row strips, the other chips' in whole tiles.
  assert strips == ({256} if topology.startswith("v6e") else {tiles[0]})

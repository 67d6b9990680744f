"""The in-kernel TPU ring (kernels/tpu_ring.py): TPU interpret mode on simulated CPU devices,
both schedules and both DMA execution modes, race detection, leftover semaphores, where the
copies sit against the compute, and AOT compilation for a real multi-chip TPU slice.

Every per-device buffer in the multi-device interpret cases stays under 96 KiB (DESIGN.md
section 5: larger buffers deadlocked the simulator), and every test runs under a watchdog
that dumps all threads and exits the process if a case hangs, so CI fails instead of
blocking.
"""

import faulthandler
import math
import os

# Compile-only libtpu may run beside other test processes that loaded it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from siglip_fast.kernels import tpu_ring  # noqa: E402
from siglip_fast.reference import ring_loss as reference_ring  # noqa: E402
from siglip_fast.reference import sigmoid_loss_dense  # noqa: E402
from tests.helpers import numpy_loss_and_grads, random_inputs, rel_err  # noqa: E402

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


def _races_found():
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  return bool(ipc.races is not None and ipc.races.races_found)


def _mesh(n):
  return Mesh(np.array(jax.devices()[:n]), ("x",))


def _params(mode, races=False):
  return pltpu.InterpretParams(dma_execution_mode=mode, detect_races=races)


def _sharded(fn, n, with_grads):
  """jit of fn(x, y, ids, log_t, bias) as a ring over n devices (value, or value and grads)."""
  f = jax.shard_map(fn, mesh=_mesh(n), in_specs=(P("x"), P("x"), P("x"), P(), P()),
                    out_specs=P())
  if not with_grads:
    return jax.jit(f)
  return jax.jit(jax.value_and_grad(lambda x, y, ids, lt, b: f(x, y, ids, lt, b),
                                    argnums=(0, 1, 3, 4)))


def _kernel_ring(n, schedule, interpret, block_sizes, with_grads=True):
  def local(x, y, ids, lt, b):
    return tpu_ring.ring_loss(x, y, ids, ids, lt, b, axis_name="x", schedule=schedule,
                              interpret=interpret, block_sizes=block_sizes)
  return _sharded(local, n, with_grads)


def _reference_ring(n, schedule, with_grads=True):
  def local(x, y, ids, lt, b):
    return reference_ring(x, y, ids, ids, lt, b, axis_name="x", schedule=schedule)
  return _sharded(local, n, with_grads)


def _dlogt_scale(x, y, log_t, bias, ids):
  """sum |dL/dlog_t terms|: dL/dlog_t is a sum of terms of both signs that mostly cancel,
  so its float32 error is relative to this, not to the (small) sum itself."""
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  ids = np.asarray(ids)
  logits = np.exp(np.float64(log_t)) * x @ y.T + np.float64(bias)
  g = 1.0 / (1.0 + np.exp(-logits)) - (ids[:, None] == ids[None, :])
  return float(np.sum(np.abs(g * (logits - bias)))) / x.shape[0]


def _assert_matches(got, want, tol, dlogt_scale):
  loss, (dx, dy, dlt, db) = got
  want_loss, (wdx, wdy, wdlt, wdb) = want
  assert rel_err(loss, want_loss) < tol
  assert rel_err(dx, wdx) < tol
  assert rel_err(dy, wdy) < tol
  assert abs(float(dlt) - float(wdlt)) < tol * dlogt_scale
  assert rel_err(db, wdb) < tol


def _assert_clean(capfd, races_checked):
  out, err = capfd.readouterr()
  assert LEFTOVER_SEMAPHORE not in out + err
  assert RACE not in out + err
  if races_checked:
    assert not _races_found()


def _check_ring(capfd, n, schedule, mode, dtype, races, block_sizes, b_local=64, dim=64,
                seed=0, ids=None):
  batch = n * b_local
  x, y = random_inputs(seed, batch, dim, dtype)
  if ids is None:
    ids = jnp.arange(batch, dtype=jnp.int32)
  lt = jnp.float32(math.log(10.0) + 0.1 * (seed % 3))
  b = jnp.float32(-10.0 + seed % 5)
  kernel = _kernel_ring(n, schedule, _params(mode, races), block_sizes)
  got = jax.block_until_ready(kernel(x, y, ids, lt, b))
  _assert_clean(capfd, races)

  scale = _dlogt_scale(x, y, lt, b, ids)
  tol = TOL[dtype]
  oracle = numpy_loss_and_grads(x, y, lt, b, ids)
  _assert_matches(got, oracle, tol, scale)
  _assert_matches(got, _reference_ring(n, schedule)(x, y, ids, lt, b), tol, scale)
  dense = jax.value_and_grad(sigmoid_loss_dense, argnums=(0, 1, 2, 3))(x, y, lt, b, ids)
  _assert_matches(got, dense, tol, scale)
  # Gradients come back in the input dtypes; log_t's and bias's are replicated scalars.
  assert got[1][0].dtype == dtype and got[1][1].dtype == dtype
  assert got[1][2].shape == () and got[1][3].shape == ()


# (devices, schedule, DMA execution mode, dtype, race detection, tiles). Multi-tile cases
# exercise the in-kernel tile pipeline; one-tile cases keep the larger rings fast.
CASES = [
    (2, "unidirectional", "on_wait", jnp.float32, False, (32, 64)),
    (2, "bidirectional", "eager", jnp.bfloat16, True, (16, 32)),
    (3, "bidirectional", "eager", jnp.float32, True, (64, 64)),
    (4, "unidirectional", "eager", jnp.float32, True, (32, 64)),
    (8, "bidirectional", "on_wait", jnp.float32, False, (64, 64)),
    pytest.param(4, "bidirectional", "on_wait", jnp.float32, False, (16, 32),
                 marks=pytest.mark.slow),
    pytest.param(8, "unidirectional", "eager", jnp.float32, True, (64, 64),
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("n,schedule,mode,dtype,races,tiles", CASES)
def test_ring_matches_reference(capfd, n, schedule, mode, dtype, races, tiles):
  _check_ring(capfd, n, schedule, mode, dtype, races, tpu_ring.BlockSizes(*tiles),
              seed=1000 + 17 * n + len(schedule) + len(mode))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["on_wait", "eager"])
@pytest.mark.parametrize("schedule", ["unidirectional", "bidirectional"])
@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ring_matches_reference_all(capfd, n, schedule, mode, dtype):
  _check_ring(capfd, n, schedule, mode, dtype, True, tpu_ring.BlockSizes(16, 32),
              seed=2000 + 31 * n + len(schedule) + len(mode) + (dtype == jnp.bfloat16))


@pytest.mark.parametrize("schedule", [
    "bidirectional", pytest.param("unidirectional", marks=pytest.mark.slow)])
def test_pair_ids_and_ragged_batch(capfd, schedule):
  # b = 20 is no multiple of the 16-row tiles: padded to 32 and masked. Duplicate ids on
  # different devices are positives across the ring.
  n, b_local = 3, 20
  ids = jax.random.randint(jax.random.key(77), (n * b_local,), 0, 25).astype(jnp.int32)
  _check_ring(capfd, n, schedule, "on_wait", jnp.float32, False, tpu_ring.BlockSizes(16, 16),
              b_local=b_local, dim=24, seed=78 + len(schedule), ids=ids)


def test_forward_only_matches_and_skips_gradients(capfd):
  n, b_local, dim = 4, 64, 64
  x, y = random_inputs(401, n * b_local, dim)
  ids = jnp.arange(n * b_local, dtype=jnp.int32)
  lt, b = jnp.float32(math.log(10.0)), jnp.float32(-10.0)
  kernel = _kernel_ring(n, "bidirectional", _params("eager", True), tpu_ring.BlockSizes(32, 64),
                        with_grads=False)
  loss = kernel(x, y, ids, lt, b)
  _assert_clean(capfd, True)
  assert rel_err(loss, numpy_loss_and_grads(x, y, lt, b)[0]) < 1e-5
  # Without grad only the loss kernel runs: no gradient kernel in the program.
  text = str(jax.make_jaxpr(kernel)(x, y, ids, lt, b))
  assert "siglip_ring_fwd" in text and "siglip_ring_fwd_bwd" not in text


@pytest.mark.parametrize("dtype", [
    jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_single_device(dtype):
  # axis_name=None (no shard_map) and a one-device ring: the local block, no DMA.
  b_local, dim = 48, 40
  x, y = random_inputs(501, b_local, dim, dtype)
  ids = jnp.arange(b_local, dtype=jnp.int32)
  lt, b = jnp.float32(2.0), jnp.float32(-5.0)
  f = lambda x, y, lt, b: tpu_ring.ring_loss(x, y, ids, ids, lt, b, interpret=True,
                                             block_sizes=tpu_ring.BlockSizes(16, 16))
  got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(x, y, lt, b)
  scale = _dlogt_scale(x, y, lt, b, ids)
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


def test_copies_overlap_compute(monkeypatch):
  """Where the kernel places its copies against the tile compute, in program order (the
  trace order): each hop starts sending its chunk on before its first tile and waits for
  that send only after its last; the dY that came with the chunk is waited for only after
  the loss-and-dX sweep, tile by tile; dY tiles leave from inside the dY sweep, each wait
  for the previous tile's copy coming before the next tile's copy starts."""
  events = []

  class Recorded:
    def __init__(self, kind, desc):
      self.kind, self.desc = kind, desc

    def __getattr__(self, op):
      method = getattr(self.desc, op)

      def call():
        events.append((op, self.kind))
        return method()
      return call

  real_copy, real_tile = tpu_ring._remote_copy, tpu_ring._tile
  monkeypatch.setattr(tpu_ring, "_remote_copy",
                      lambda kind, *a: Recorded(kind, real_copy(kind, *a)))
  monkeypatch.setattr(tpu_ring, "_tile",
                      lambda *a: (events.append(("tile", None)), real_tile(*a))[1])
  n, b_local, dim = 4, 64, 64  # bidirectional: hop 0, right hop, left hop, last right hop
  x, y = random_inputs(701, n * b_local, dim)
  ids = jnp.arange(n * b_local, dtype=jnp.int32)
  kernel = _kernel_ring(n, "bidirectional", _params("on_wait"), tpu_ring.BlockSizes(32, 32))
  jax.eval_shape(kernel, x, y, ids, jnp.float32(2.3), jnp.float32(-10.0))

  # Split the trace into hops: each hop after the first opens by waiting for its chunk.
  hops, cur = [], []
  for e in events:
    if e == ("wait_recv", "y"):
      hops.append(cur)
      cur = []
    cur.append(e)
  hops.append(cur)
  assert len(hops) == 4
  first = lambda hop, e: hop.index(e)
  last = lambda hop, e: len(hop) - 1 - hop[::-1].index(e)
  tile = ("tile", None)

  for k, hop in enumerate(hops):
    if ("start", "y") in hop:  # every hop but a stream's last forwards its chunk
      assert first(hop, ("start", "y")) < first(hop, tile)
      assert last(hop, tile) < first(hop, ("wait_send", "y"))
    if k and ("wait_recv", "dy") in hop:
      assert first(hop, tile) < first(hop, ("wait_recv", "dy"))
    for kind in ("dy", "dy_home"):
      if ("start", kind) in hop:
        assert first(hop, tile) < first(hop, ("start", kind))
        assert first(hop, ("wait_send", kind)) < last(hop, ("start", kind))
  assert any(("start", "dy_home") in hop for hop in hops)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(block_sizes=tpu_ring.BlockSizes(12, 16)), ValueError, "block_rows"),
    (dict(block_sizes=tpu_ring.BlockSizes(16, 0)), ValueError, "block_cols"),
    (dict(block_sizes=(16, 16)), TypeError, "block_sizes"),
    (dict(schedule="ring"), ValueError, "schedule"),
])
def test_bad_arguments(kwargs, exc, match):
  x, y = random_inputs(801, 32, 16)
  ids = jnp.arange(32, dtype=jnp.int32)
  with pytest.raises(exc, match=match):
    tpu_ring.ring_loss(x, y, ids, ids, 2.3, -10.0, interpret=True, **kwargs)


@pytest.mark.parametrize("args,exc,match", [
    (lambda x, y, i: (x, y[:16], i, i), ValueError, "same shape"),
    (lambda x, y, i: (x, y.astype(jnp.bfloat16), i, i), ValueError, "dtype"),
    (lambda x, y, i: (x.astype(jnp.int32), y.astype(jnp.int32), i, i), TypeError, "float32"),
    (lambda x, y, i: (x, y, i.astype(jnp.float32), i), ValueError, "x_ids"),
    (lambda x, y, i: (x, y, i, i[:5]), ValueError, "y_ids"),
])
def test_bad_inputs(args, exc, match):
  x, y = random_inputs(802, 32, 16)
  ids = jnp.arange(32, dtype=jnp.int32)
  with pytest.raises(exc, match=match):
    tpu_ring.ring_loss(*args(x, y, ids), 2.3, -10.0, interpret=True)


def _compile_for_slice(topology, schedule, b_local=4096, dim=1152):
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  # One device per chip (v4 slices list both TensorCores of a chip): a ring of chips.
  chips = {}
  for d in devices:
    chips.setdefault(tuple(getattr(d, "coords", ()) or (d.id,)), d)
  devices = list(chips.values())
  mesh = Mesh(np.array(devices), ("x",))
  n = len(devices)

  def local(x, y, ids, lt, b):
    return tpu_ring.ring_loss(x, y, ids, ids, lt, b, axis_name="x", schedule=schedule)

  f = jax.shard_map(local, mesh=mesh, in_specs=(P("x"), P("x"), P("x"), P(), P()),
                    out_specs=P())
  shard = lambda shape, dtype, spec: jax.ShapeDtypeStruct(shape, dtype,
                                                          sharding=NamedSharding(mesh, spec))
  args = (shard((n * b_local, dim), jnp.bfloat16, P("x")),
          shard((n * b_local, dim), jnp.bfloat16, P("x")),
          shard((n * b_local,), jnp.int32, P("x")),
          shard((), jnp.float32, P()), shard((), jnp.float32, P()))
  fwd = jax.jit(f).lower(*args).compile()
  vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 3, 4))).lower(*args).compile()
  return n, fwd, vg


def _flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"]


@pytest.mark.parametrize("topology,schedule", [
    ("v5e:2x2", "unidirectional"),
    pytest.param("v4:2x2x1", "bidirectional", marks=pytest.mark.slow),
])
def test_compiles_for_tpu_slice(topology, schedule):
  try:
    n, fwd, vg = _compile_for_slice(topology, schedule)
  except RuntimeError as e:  # no libtpu in this install
    pytest.skip(f"compile-only TPU topology unavailable: {e}")
  b_local, dim = 4096, 1152
  for compiled, kernel, flops_per_pair in ((fwd, "siglip_ring_fwd", 2),
                                           (vg, "siglip_ring_fwd_bwd", 8)):
    text = compiled.as_text()
    assert kernel in text
    # The chunks travel inside the kernel: XLA schedules no collective permute of its own.
    assert "collective-permute" not in text
    # Per device: n blocks of b x b pairs, each D multiply-adds per logit (and per gradient).
    want = flops_per_pair * b_local * b_local * dim * n
    assert abs(_flops(compiled) - want) < 0.01 * want

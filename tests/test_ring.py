"""The ring over simulated CPU devices against the dense loss, both schedules."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import siglip_fast
from siglip_fast.reference import ring_loss, sigmoid_loss_dense
from tests.helpers import numpy_loss_and_grads, random_inputs, rel_err

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _mesh(n):
  return Mesh(np.array(jax.devices()[:n]), ("x",))


def _ring_value_and_grads(n_dev, schedule, x, y, log_t, bias, ids):
  mesh = _mesh(n_dev)

  def local(x, y, ids, lt, b):
    return ring_loss(x, y, ids, ids, lt, b, axis_name="x", schedule=schedule)

  f = jax.shard_map(local, mesh=mesh, in_specs=(P("x"), P("x"), P("x"), P(), P()), out_specs=P())
  g = lambda x, y, lt, b: f(x, y, ids, lt, b)
  return jax.jit(jax.value_and_grad(g, argnums=(0, 1, 2, 3)))(x, y, log_t, bias)


@pytest.mark.parametrize("schedule", ["unidirectional", "bidirectional"])
@pytest.mark.parametrize("n_dev", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ring_matches_dense(schedule, n_dev, dtype):
  b_local, dim = 5, 6
  batch = b_local * n_dev
  x, y = random_inputs(100 + n_dev, batch, dim, dtype)
  ids = jnp.arange(batch, dtype=jnp.int32)
  lt, b = jnp.float32(math.log(10.0)), jnp.float32(-10.0)
  loss, grads = _ring_value_and_grads(n_dev, schedule, x, y, lt, b, ids)
  ref_loss, ref_grads = numpy_loss_and_grads(x, y, lt, b)
  assert rel_err(loss, ref_loss) < TOL[dtype]
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) < TOL[dtype]
  # And against the dense reference itself (same float32 arithmetic, reordered sums).
  dense = jax.value_and_grad(sigmoid_loss_dense, argnums=(0, 1, 2, 3))(x, y, lt, b)
  assert rel_err(loss, dense[0]) < TOL[dtype]
  for g, r in zip(grads, dense[1]):
    assert rel_err(g, np.asarray(r, np.float32)) < TOL[dtype]


@pytest.mark.parametrize("schedule", ["unidirectional", "bidirectional"])
def test_ring_pair_ids_across_devices(schedule):
  # Duplicated ids on different devices are positives across the ring.
  n_dev, b_local, dim = 4, 6, 8
  batch = n_dev * b_local
  x, y = random_inputs(11, batch, dim)
  ids = jax.random.randint(jax.random.key(12), (batch,), 0, 9).astype(jnp.int32)
  lt, b = jnp.float32(math.log(10.0)), jnp.float32(-10.0)
  loss, grads = _ring_value_and_grads(n_dev, schedule, x, y, lt, b, ids)
  ref_loss, ref_grads = numpy_loss_and_grads(x, y, lt, b, ids)
  assert rel_err(loss, ref_loss) < 1e-5
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("b_local", [1, 5])
def test_value_and_grad_permutes_only_to_ring_neighbours(b_local):
  # With gradients each chunk's dY must come home. Under the bidirectional schedule half of
  # each chunk goes each way all the way round, so every permute (rows, ids, dY, the dY
  # home) is to a ring neighbour; a whole-chunk copy sent half way round would bring its dY
  # home across n / 2 links, every device's at once. A one-row chunk travels whole.
  n_dev = 6
  batch = b_local * n_dev
  x, y = random_inputs(7, batch, 8)
  ids = jnp.arange(batch, dtype=jnp.int32)
  lt, b = jnp.float32(math.log(10.0)), jnp.float32(-10.0)
  mesh = _mesh(n_dev)

  def local(x, y, ids, lt, b):
    return ring_loss(x, y, ids, ids, lt, b, axis_name="x", schedule="bidirectional")

  f = jax.shard_map(local, mesh=mesh, in_specs=(P("x"), P("x"), P("x"), P(), P()), out_specs=P())
  vg = jax.jit(jax.value_and_grad(lambda x, y, lt, b: f(x, y, ids, lt, b), argnums=(0, 1, 2, 3)))
  hlo = vg.lower(x, y, lt, b).compile().as_text()
  shifts = {
    (int(dst) - int(src)) % n_dev
    for pairs in re.findall(r"source_target_pairs=\{(.*?)\}\}", hlo)
    for src, dst in re.findall(r"(\d+),(\d+)", pairs)
  }
  assert shifts == ({1} if b_local == 1 else {1, n_dev - 1}), shifts
  loss, grads = vg(x, y, lt, b)
  ref_loss, ref_grads = numpy_loss_and_grads(x, y, lt, b)
  assert rel_err(loss, ref_loss) < 1e-5
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) < 1e-5


def test_forward_only_matches_value_and_grad_forward():
  n_dev, b_local, dim = 4, 8, 16
  x, y = random_inputs(21, n_dev * b_local, dim)
  mesh = _mesh(n_dev)
  lt, b = jnp.float32(math.log(10.0)), jnp.float32(-10.0)
  loss = jax.jit(
    lambda x, y: siglip_fast.sigmoid_loss_sharded(x, y, lt, b, mesh=mesh, axis_name="x")
  )(x, y)
  ref_loss, _ = numpy_loss_and_grads(x, y, lt, b)
  assert rel_err(loss, ref_loss) < 1e-5


def test_public_api_inside_shard_map_grad_of_replicated_params():
  # A training step that differentiates inside shard_map: replicated log_t/bias and a
  # replicated projection matrix must get the full (global) gradient on every device.
  n_dev, b_local, dim = 4, 4, 8
  batch = n_dev * b_local
  x, y = random_inputs(31, batch, dim)
  w = jnp.eye(dim) + 0.1 * jax.random.normal(jax.random.key(32), (dim, dim))
  mesh = _mesh(n_dev)
  params = {"w": w, "log_t": jnp.float32(math.log(10.0)), "bias": jnp.float32(-10.0)}

  def loss_fn(p, x, y):
    return siglip_fast.sigmoid_loss(x @ p["w"], y, p["log_t"], p["bias"], axis_name="x")

  step = jax.shard_map(jax.grad(loss_fn), mesh=mesh, in_specs=(P(), P("x"), P("x")), out_specs=P())
  got = jax.jit(step)(params, x, y)
  want = jax.grad(lambda p: sigmoid_loss_dense(x @ p["w"], y, p["log_t"], p["bias"]))(params)
  for k in params:
    assert rel_err(got[k], np.asarray(want[k])) < 1e-5, k


@pytest.mark.parametrize("schedule", ["unidirectional", "bidirectional"])
def test_ring_temp_memory_does_not_grow_with_device_count(schedule):
  """Compiled per-device temp memory is O(b^2 + b*D), independent of the device count."""
  b_local, dim = 256, 64
  temps = {}
  for n_dev in (2, 4, 8):
    mesh = _mesh(n_dev)
    batch = b_local * n_dev

    def local(x, y, ids, lt, b):
      return ring_loss(x, y, ids, ids, lt, b, axis_name="x", schedule=schedule)

    f = jax.shard_map(local, mesh=mesh, in_specs=(P("x"), P("x"), P("x"), P(), P()), out_specs=P())
    vg = jax.value_and_grad(lambda x, y, ids, lt, b: f(x, y, ids, lt, b), argnums=(0, 1, 3, 4))
    sh = NamedSharding(mesh, P("x"))
    rep = NamedSharding(mesh, P())
    args = (
      jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sh),
      jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sh),
      jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sh),
      jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
      jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
    )
    temps[n_dev] = jax.jit(vg).lower(*args).compile().memory_analysis().temp_size_in_bytes
  block_bytes = 4 * b_local * b_local
  chunk_bytes = 4 * b_local * dim
  for n_dev, temp in temps.items():
    # A handful of b x b float32 tiles (logits, sigmoid, their grads) and travelling chunks;
    # nothing proportional to the global batch (4 * b_local * n_dev * ...).
    assert temp < 8 * block_bytes + 16 * chunk_bytes, (n_dev, temp)
  # Growth from 4 to 8 devices (more rounds of the same hops). Two devices run no round at
  # all (the own block and one hop), a program of another shape, so they are no baseline:
  # XLA:CPU gives its straight-line blocks separate buffers where a loop reuses them.
  assert temps[8] <= temps[4] * 1.25 + chunk_bytes, temps

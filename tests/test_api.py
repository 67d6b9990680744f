"""The public API: dispatch, jit/grad, the Flax module, and every promised input error."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import siglip_fast
from siglip_fast import SigmoidLoss, sigmoid_loss, sigmoid_loss_sharded
from tests.helpers import numpy_loss_and_grads, random_inputs, rel_err, scalar_grad_scales

LT, B = jnp.float32(math.log(10.0)), jnp.float32(-10.0)


def test_xla_under_jit_and_grad():
  x, y = random_inputs(0, 24, 16)
  f = jax.jit(
    jax.value_and_grad(lambda *a: sigmoid_loss(*a, implementation="xla"), argnums=(0, 1, 2, 3))
  )
  loss, grads = f(x, y, LT, B)
  ref_loss, ref_grads = numpy_loss_and_grads(x, y, LT, B)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  assert rel_err(loss, ref_loss) < 1e-5
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) < 1e-5


def test_default_implementation_on_cpu_is_xla():
  assert siglip_fast.default_implementation("cpu") == "xla"
  x, y = random_inputs(1, 8, 4)
  np.testing.assert_allclose(
    float(sigmoid_loss(x, y, LT, B)), float(sigmoid_loss(x, y, LT, B, implementation="xla"))
  )


def test_scalars_of_shape_one_and_python_floats():
  x, y = random_inputs(2, 8, 4)
  want = float(sigmoid_loss(x, y, LT, B))
  np.testing.assert_allclose(float(sigmoid_loss(x, y, LT.reshape(1), B.reshape(1))), want)
  np.testing.assert_allclose(float(sigmoid_loss(x, y, math.log(10.0), -10.0)), want, rtol=1e-6)


def test_flax_module_parameters_and_gradients():
  x, y = random_inputs(3, 12, 8)
  module = SigmoidLoss(log_t_init=math.log(5.0), bias_init=-2.71)
  params = module.init(jax.random.key(0), x, y)
  assert float(params["params"]["log_t"]) == pytest.approx(math.log(5.0))
  assert float(params["params"]["bias"]) == pytest.approx(-2.71)
  loss, grads = jax.value_and_grad(lambda p: module.apply(p, x, y))(params)
  ref_loss, (_, _, rdlt, rdb) = numpy_loss_and_grads(x, y, math.log(5.0), -2.71)
  assert rel_err(loss, ref_loss) < 1e-5
  assert rel_err(grads["params"]["log_t"], rdlt) < 1e-5
  assert rel_err(grads["params"]["bias"], rdb) < 1e-5
  default = SigmoidLoss().init(jax.random.key(0), x, y)["params"]
  assert float(default["log_t"]) == pytest.approx(math.log(10.0))
  assert float(default["bias"]) == -10.0


def test_sharded_wrapper_matches_dense():
  mesh = Mesh(np.array(jax.devices()[:4]), ("batch",))
  x, y = random_inputs(4, 16, 8)
  ids = jnp.array([0, 1, 2, 3] * 4, jnp.int32)
  loss = sigmoid_loss_sharded(x, y, LT, B, mesh=mesh, axis_name="batch", pair_ids=ids)
  ref_loss, _ = numpy_loss_and_grads(x, y, LT, B, ids)
  assert rel_err(loss, ref_loss) < 1e-5


# --- errors -------------------------------------------------------------------------------

X, Y = random_inputs(5, 8, 4)


@pytest.mark.parametrize(
  "args,kwargs,exc,match",
  [
    ((X[0], Y, LT, B), {}, ValueError, "img_emb must have shape \\(batch, dim\\)"),
    ((X, Y[None], LT, B), {}, ValueError, "txt_emb must have shape \\(batch, dim\\)"),
    ((X, Y[:7], LT, B), {}, ValueError, "same \\(batch, dim\\) shape"),
    ((X, Y[:, :3], LT, B), {}, ValueError, "same \\(batch, dim\\) shape"),
    ((X.astype(jnp.int32), Y, LT, B), {}, TypeError, "img_emb must be float32 or bfloat16"),
    ((X, np.asarray(Y, np.float64), LT, B), {}, TypeError, "txt_emb must be float32 or bfloat16"),
    ((X, Y.astype(jnp.bfloat16), LT, B), {}, TypeError, "same dtype"),
    ((X, [[1.0]], LT, B), {}, TypeError, "txt_emb must be an array"),
    ((X[:0], Y[:0], LT, B), {}, ValueError, "non-empty"),
    ((X, Y, jnp.ones((2,)), B), {}, ValueError, "log_t must be a scalar"),
    ((X, Y, LT, jnp.ones((2, 1))), {}, ValueError, "bias must be a scalar"),
    ((X, Y, "2.3", B), {}, TypeError, "log_t must be a real scalar"),
    ((X, Y, LT, jnp.complex64(1)), {}, TypeError, "bias must be a real"),
    ((X, Y, True, B), {}, TypeError, "log_t must be a real scalar"),
    ((X, Y, LT, B), {"pair_ids": jnp.arange(7)}, ValueError, "pair_ids must have shape"),
    ((X, Y, LT, B), {"pair_ids": jnp.arange(8.0)}, TypeError, "pair_ids must be integers"),
    ((X, Y, LT, B), {"implementation": "cuda"}, ValueError, "implementation must be one of"),
    ((X, Y, LT, B), {"implementation": "pallas_tpu"}, ValueError, "interpret=True"),
    ((X, Y, LT, B), {"implementation": "pallas_gpu"}, ValueError, "interpret=True"),
    ((X, Y, LT, B), {"schedule": "ring"}, ValueError, "schedule must be one of"),
    (
      (X, Y, LT, B),
      {"implementation": "xla", "block_sizes": object()},
      ValueError,
      "block_sizes applies to the Pallas",
    ),
    ((X, Y, LT, B), {"axis_name": "nope"}, ValueError, "is not a mesh axis in scope"),
    ((X.at[0, 0].set(jnp.nan), Y, LT, B), {}, ValueError, "img_emb contains non-finite"),
    ((X, Y, LT, jnp.float32(jnp.inf)), {}, ValueError, "bias contains non-finite"),
  ],
)
def test_bad_input_raises_naming_the_argument(args, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    sigmoid_loss(*args, **kwargs)


def test_sharded_batch_not_divisible_by_devices():
  mesh = Mesh(np.array(jax.devices()[:3]), ("batch",))
  with pytest.raises(
    ValueError,
    match="batch \\(8\\) must be divisible by the number of devices on axis 'batch' \\(3\\)",
  ):
    sigmoid_loss_sharded(X, Y, LT, B, mesh=mesh, axis_name="batch")
  with pytest.raises(ValueError, match="is not an axis of the mesh"):
    sigmoid_loss_sharded(X, Y, LT, B, mesh=mesh, axis_name="data")


def test_errors_are_raised_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="same \\(batch, dim\\) shape"):
    jax.jit(sigmoid_loss)(X, Y[:4], LT, B)


def test_shard_map_local_pair_ids_shape_checked():
  mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
  f = jax.shard_map(
    lambda x, y: sigmoid_loss(x, y, LT, B, axis_name="x", pair_ids=jnp.arange(8, dtype=jnp.int32)),
    mesh=mesh,
    in_specs=(P("x"), P("x")),
    out_specs=P(),
  )
  with pytest.raises(ValueError, match="pair_ids must have shape \\(batch,\\) = \\(4,\\)"):
    f(X, Y)


def test_pallas_tpu_with_axis_name_runs_the_in_kernel_ring():
  # The dispatch path: sigmoid_loss(axis_name=..., implementation="pallas_tpu") is the
  # remote-DMA ring kernel (TPU interpret mode here), held to the float64 oracle.
  mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
  x, y = random_inputs(41, 64, 128)

  def local(x, y, lt, b):
    return sigmoid_loss(x, y, lt, b, axis_name="x", implementation="pallas_tpu", interpret=True)

  f = jax.shard_map(local, mesh=mesh, in_specs=(P("x"), P("x"), P(), P()), out_specs=P())
  loss, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(x, y, LT, B)
  ref_loss, ref_grads = numpy_loss_and_grads(x, y, LT, B)
  assert rel_err(loss, ref_loss) < 1e-5
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) < 1e-5


# --- gradients under every set-up: the plain-JAX ring is the oracle of the transforms ------

IMPLS = [("xla", {}), ("pallas_tpu", {"interpret": True}), ("pallas_gpu", {"interpret": True})]


def _plain_ring_loss(x, y, lt, b):
  """The same loss written with standard collectives only (all_gather + dense + psum), so
  that JAX's own transpose rules define its gradients under each transformation."""
  from siglip_fast.reference import dense  # pylint: disable=import-outside-toplevel

  xs = jax.lax.all_gather(y, "batch", tiled=True)
  k = jax.lax.axis_index("batch")
  my_ids = k * x.shape[0] + jnp.arange(x.shape[0])
  local = dense.block_loss_sum(x, xs, my_ids, jnp.arange(xs.shape[0]), lt, b)
  return jax.lax.psum(local, "batch") / xs.shape[0]


@pytest.mark.parametrize("impl,kw", IMPLS, ids=[i for i, _ in IMPLS])
@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("grad_inside", [True, False])
def test_gradients_under_shard_map_check_vma(impl, kw, check_vma, grad_inside):
  # check_vma=False used to scale the embedding gradients by 1 / devices silently.
  n = 4
  mesh = Mesh(np.array(jax.devices()[:n]), ("batch",))
  x, y = random_inputs(50, 8 * n, 16)
  lt, b = jnp.float32(math.log(10.0)), jnp.float32(-10.0)

  def ours(x, y, lt, b):
    return sigmoid_loss(x, y, lt, b, axis_name="batch", implementation=impl, **kw)

  specs = (P("batch"), P("batch"), P(), P())
  grad = lambda f: jax.grad(f, argnums=(0, 1, 2, 3))
  if grad_inside:
    run = lambda f: jax.jit(
      jax.shard_map(grad(f), mesh=mesh, in_specs=specs, out_specs=specs, check_vma=check_vma)
    )
  else:
    run = lambda f: jax.jit(
      grad(jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=check_vma))
    )
  got, want = run(ours)(x, y, lt, b), run(_plain_ring_loss)(x, y, lt, b)
  # dlog_t and dbias are cancelling sums: error against the sum of their terms' magnitudes;
  # where JAX's rule makes each device's value n times its partial sum, n times that.
  factor = n if grad_inside and not check_vma else 1
  scales = [factor * v for v in scalar_grad_scales(x, y, lt, b)]

  def close(got, want):
    for g, w in zip(got[:2], want[:2]):
      assert rel_err(g, np.asarray(w, np.float64)) < 1e-5
    for g, w, scale in zip(got[2:], want[2:], scales):
      assert abs(float(g) - float(w)) / scale < 1e-5, (g, w)

  close(got, want)
  if check_vma:  # and then both are the true gradient
    _, ref = numpy_loss_and_grads(x, y, lt, b)
    close(got, ref)


@pytest.mark.parametrize("impl,kw", IMPLS, ids=[i for i, _ in IMPLS])
def test_pmap_with_pmean_of_gradients_is_exact(impl, kw):
  # big_vision's older trainers: grads of a tower inside pmap, then pmean across devices.
  n, b, d = 4, 8, 16
  x, y = random_inputs(51, n * b, d)
  w = jnp.eye(d) + 0.1 * jax.random.normal(jax.random.key(52), (d, d))
  lt, bias = jnp.float32(math.log(10.0)), jnp.float32(-10.0)

  def loss(params, a, c):
    return sigmoid_loss(
      a @ params["w"], c, params["lt"], params["b"], axis_name="batch", implementation=impl, **kw
    )

  def step(params, a, c):
    return jax.lax.pmean(jax.grad(loss)(params, a, c), "batch")

  params = {"w": w, "lt": lt, "b": bias}
  got = jax.pmap(step, axis_name="batch", in_axes=(None, 0, 0), devices=jax.devices()[:n])(
    params, x.reshape(n, b, d), y.reshape(n, b, d)
  )
  want = jax.grad(
    lambda p: siglip_fast.reference.sigmoid_loss_dense(x @ p["w"], y, p["lt"], p["b"])
  )(params)
  assert rel_err(got["w"][0], np.asarray(want["w"], np.float64)) < 1e-5
  # dlog_t and dbias are cancelling sums: error against the sum of their terms' magnitudes.
  scales = scalar_grad_scales(x @ w, y, lt, bias)
  for k, scale in zip(("lt", "b"), scales):
    assert abs(float(got[k][0]) - float(want[k])) / scale < 1e-5, k


@pytest.mark.parametrize("kind", ["classic", "make_mesh_explicit", "make_mesh_auto"])
def test_sharded_wrapper_and_readme_recipe_on_every_mesh_kind(kind):
  n = 4
  if kind == "classic":
    mesh = Mesh(np.array(jax.devices()[:n]), ("batch",))
  else:
    axis_type = getattr(jax.sharding.AxisType, "Explicit" if kind.endswith("explicit") else "Auto")
    mesh = jax.make_mesh((n,), ("batch",), axis_types=(axis_type,), devices=jax.devices()[:n])
  x, y = random_inputs(53, 8 * n, 16)
  ref_loss, ref_grads = numpy_loss_and_grads(x, y, math.log(10.0), -10.0)
  for f in (
    sigmoid_loss_sharded,
    jax.jit(sigmoid_loss_sharded, static_argnames=("mesh", "axis_name")),
  ):
    loss = f(x, y, math.log(10.0), -10.0, mesh=mesh, axis_name="batch")
    assert rel_err(loss, ref_loss) < 1e-5

  # The README's shard_map recipe, on global arrays laid out on the mesh.
  def step(params, img_local, txt_local):
    return sigmoid_loss(img_local, txt_local, params["log_t"], params["bias"], axis_name="batch")

  shard = lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, P("batch")))
  params = {"log_t": jnp.float32(math.log(10.0)), "bias": jnp.float32(-10.0)}
  grads = jax.jit(
    jax.shard_map(jax.grad(step), mesh=mesh, in_specs=(P(), P("batch"), P("batch")), out_specs=P())
  )(params, shard(x), shard(y))
  assert rel_err(grads["log_t"], ref_grads[2]) < 1e-5
  assert rel_err(grads["bias"], ref_grads[3]) < 1e-5


def test_integer_and_python_scalars_are_accepted():
  x, y = random_inputs(54, 8, 4)
  want = float(sigmoid_loss(x, y, jnp.float32(2.0), jnp.float32(-10.0)))
  for lt, b in ((2, -10), (2.0, -10.0), (jnp.int32(2), jnp.int32(-10)), (np.float64(2.0), -10)):
    np.testing.assert_allclose(float(sigmoid_loss(x, y, lt, b)), want, rtol=1e-6)


def test_non_finite_inputs_raise_in_eager_grad_too():
  x, y = random_inputs(55, 8, 4)
  bad = x.at[1, 2].set(jnp.nan)
  with pytest.raises(ValueError, match="img_emb contains non-finite"):
    jax.grad(sigmoid_loss)(bad, y, LT, B)
  with pytest.raises(ValueError, match="log_t contains non-finite"):
    jax.value_and_grad(sigmoid_loss, argnums=2)(x, y, jnp.float32(jnp.inf), B)
  # Under jit values are unknown at trace time: no check, no error (documented).
  assert not np.isfinite(float(jax.jit(sigmoid_loss)(bad, y, LT, B)))


def test_block_sizes_go_to_the_kernel_that_runs():
  from siglip_fast.kernels import gpu, tpu, tpu_ring  # pylint: disable=import-outside-toplevel

  mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
  x, y = random_inputs(56, 32, 128)

  def ring(bs):
    f = lambda x, y: sigmoid_loss(
      x, y, LT, B, axis_name="x", implementation="pallas_tpu", interpret=True, block_sizes=bs
    )
    ring = jax.shard_map(f, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=P())
    return jax.jit(jax.value_and_grad(ring, argnums=(0, 1)))

  ref_loss, (ref_dx, ref_dy, _, _) = numpy_loss_and_grads(x, y, LT, B)
  # With axis_name the kind of BlockSizes picks the kernel: the whole ring in one kernel,
  # or the block kernels under the shared ring driver (the default on megacore chips).
  for bs, kernel in (
    (tpu_ring.BlockSizes(16, 16), "siglip_ring"),
    (tpu.BlockSizes(128, 128), "siglip_fwd_dx"),
  ):
    calls = str(jax.make_jaxpr(ring(bs))(x, y))  # the pallas_calls, by name
    assert kernel in calls and ("siglip_ring" in calls) == (kernel == "siglip_ring"), kernel
    loss, (dx, dy) = ring(bs)(x, y)
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(dx, ref_dx) < 1e-5 and rel_err(dy, ref_dy) < 1e-5
  with pytest.raises(
    TypeError,
    match="with axis_name must be a siglip_fast.kernels.tpu_ring.BlockSizes .* or a "
    "siglip_fast.kernels.tpu.BlockSizes .*, got siglip_fast.kernels.gpu.BlockSizes",
  ):
    ring(gpu.BlockSizes())(x, y)
  with pytest.raises(
    TypeError, match="without axis_name must be a siglip_fast.kernels.tpu.BlockSizes"
  ):
    sigmoid_loss(
      x,
      y,
      LT,
      B,
      implementation="pallas_tpu",
      interpret=True,
      block_sizes=tpu_ring.BlockSizes(16, 16),
    )

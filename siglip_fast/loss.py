"""The public loss: ``sigmoid_loss``, one differentiable function over every implementation.

Implementations (``implementation=``), one registry entry each (``REGISTRY``):
  "xla"         the pure-JAX reference (``siglip_fast.reference``); runs anywhere.
  "pallas_tpu"  fused Pallas Mosaic kernels (``siglip_fast.kernels.tpu``; with ``axis_name``
                the whole ring in one kernel, ``siglip_fast.kernels.tpu_ring``, except on
                megacore chips, v4 and v5p, at large local batches, where the block kernels
                run in the shared ring driver); TPU, or CPU with ``interpret=True`` (TPU
                interpret mode).
  "pallas_gpu"  fused Pallas Triton kernels (``siglip_fast.kernels.gpu``); CUDA GPU, or CPU
                with ``interpret=True``.
None picks the registry's default for the platform being compiled for.

An implementation provides block ops (the loss of one image-rows x text-rows block, and its
gradients), which run in the shared ring driver (``siglip_fast.ring``; with ``axis_name=None`` the
ring has one device and this is the dense loss), and may provide a whole-ring kernel, which
replaces that ring when ``axis_name`` is given. Either way the custom VJP covers only the
per-device loss sum; the psum and the 1/B are plain JAX (``siglip_fast.ring.global_mean``).

The platform is the one the call is traced for (``siglip_fast.target``): the devices of the
arguments' shardings or of the enclosing mesh, else the default backend; so the public API
compiles ahead of time for a TPU from a CPU host. Input checks run once, at trace time.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp

from siglip_fast import target as target_lib
from siglip_fast import validate
from siglip_fast import ring as ring_lib
from siglip_fast.reference import ring as reference_ring


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One registry entry.

  platform: the jax platform its kernels compile for; None runs anywhere.
  block_module: module under ``siglip_fast.kernels`` with ``BlockSizes`` and
    ``block_ops(*, interpret, block_sizes, target)``; None means the reference block.
  ring_module: module under ``siglip_fast.kernels`` with ``BlockSizes``,
    ``ring_trip(...)`` running the whole ring in one kernel, and
    ``runs_by_default(target, batch)``: whether a call with ``axis_name`` and no
    ``block_sizes`` runs it on that target at that local batch (else the block kernels
    under the shared ring driver); None: always the shared ring driver.
  default_on: platforms where ``implementation=None`` picks it.
  """

  name: str
  platform: str | None
  block_module: str | None
  ring_module: str | None
  default_on: tuple[str, ...] = ()


REGISTRY = {
  impl.name: impl
  for impl in (
    Implementation("xla", None, None, None),
    Implementation("pallas_tpu", "tpu", "tpu", "tpu_ring", default_on=("tpu",)),
    Implementation("pallas_gpu", "gpu", "gpu", None, default_on=("gpu",)),
  )
}
IMPLEMENTATIONS = tuple(REGISTRY)


def _kernel_module(name: str):
  return importlib.import_module(f"siglip_fast.kernels.{name}")


def _available(impl: Implementation) -> bool:
  try:
    for mod in (impl.block_module, impl.ring_module):
      if mod is not None:
        _kernel_module(mod)
  except ImportError:
    return False
  return True


def default_implementation(platform: str | None = None) -> str:
  """The implementation ``implementation=None`` resolves to on ``platform`` (default: the
  default backend's)."""
  platform = platform or jax.default_backend()
  for impl in REGISTRY.values():
    if platform in impl.default_on and _available(impl):
      return impl.name
  return "xla"


def _resolve(
  implementation: str | None, interpret: bool, target: target_lib.Target
) -> Implementation:
  """The registry entry to run, after checking it can run on ``target``."""
  name = default_implementation(target.platform) if implementation is None else implementation
  if name not in REGISTRY:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {name!r}")
  impl = REGISTRY[name]
  if impl.platform is not None and not interpret and target.platform != impl.platform:
    raise ValueError(
      f"implementation={name!r} compiles for {impl.platform.upper()}, but this call is "
      f"traced for {target.platform!r} devices ({target.device_kind}); pass interpret=True "
      "to run it in interpret mode, or use implementation='xla'"
    )
  if not _available(impl):
    try:
      _kernel_module(impl.block_module)
    except ImportError as e:
      raise ValueError(f"implementation={name!r} is not available in this install: {e}") from e
  return impl


def _runs_ring_kernel(impl: Implementation, block_sizes, target: target_lib.Target, batch) -> bool:
  """With ``axis_name``: whether the whole-ring kernel runs rather than the block kernels
  under the shared ring driver. ``block_sizes`` of either kernel picks that kernel; None
  leaves it to the ring module for the target and local batch (the block kernels on
  megacore TPUs at large b)."""
  if impl.ring_module is None:
    return False
  ring_module = _kernel_module(impl.ring_module)
  if block_sizes is not None:
    return isinstance(block_sizes, ring_module.BlockSizes)
  return ring_module.runs_by_default(target, batch)


def _check_block_sizes(impl: Implementation, module_name: str | None, block_sizes, ring: bool):
  """``module_name``: the kernel module that runs; ``ring``: the call has ``axis_name``."""
  if block_sizes is None:
    return
  if module_name is None:
    raise ValueError(f"block_sizes applies to the Pallas implementations, not {impl.name!r}")
  if isinstance(block_sizes, _kernel_module(module_name).BlockSizes):
    return
  got = f"{type(block_sizes).__module__}.{type(block_sizes).__name__}"
  if ring and impl.ring_module is not None:
    raise TypeError(
      f"block_sizes for implementation={impl.name!r} with axis_name must be a "
      f"siglip_fast.kernels.{impl.ring_module}.BlockSizes (the whole-ring kernel) or a "
      f"siglip_fast.kernels.{impl.block_module}.BlockSizes (the block kernels under the "
      f"shared ring driver), got {got}"
    )
  where = "with" if ring else "without"
  raise TypeError(
    f"block_sizes for implementation={impl.name!r} {where} axis_name must be a "
    f"siglip_fast.kernels.{module_name}.BlockSizes, got {got}"
  )


def block_ops(
  implementation: str | None = None,
  *,
  interpret: bool = False,
  block_sizes=None,
  target: target_lib.Target | None = None,
) -> ring_lib.BlockOps:
  """The ``BlockOps`` of an implementation, after checking it can run on ``target``
  (default: the default backend's devices)."""
  target = target or target_lib.target_of()
  impl = _resolve(implementation, interpret, target)
  _check_block_sizes(impl, impl.block_module, block_sizes, ring=False)
  if impl.block_module is None:
    return reference_ring.REFERENCE_OPS
  return _kernel_module(impl.block_module).block_ops(
    interpret=interpret, block_sizes=block_sizes, target=target
  )


def sigmoid_loss(
  img_emb,
  txt_emb,
  log_t,
  bias,
  *,
  pair_ids=None,
  axis_name=None,
  implementation: str | None = None,
  interpret: bool = False,
  schedule: str = "bidirectional",
  block_sizes=None,
) -> jax.Array:
  """Mean SigLIP pairwise sigmoid loss, a float32 scalar.

  loss = (1/B) sum_ij softplus(-z_ij (t <x_i, y_j> + b)), t = exp(log_t), z_ij = +1 for
  positive pairs and -1 otherwise, B the global batch.

  Args:
    img_emb, txt_emb: (B, D) L2-normalised embeddings, float32 or bfloat16. With
      ``axis_name``, the (b, D) local shards of a global batch of b * axis_size pairs.
    log_t: scalar log-temperature t' (the logits are scaled by t = exp(t')); a Python number
      or a real array of shape () or (1,).
    bias: scalar logit bias b, likewise.
    pair_ids: optional (B,) integer ids; pairs with equal ids are positives (so a batch
      holding the same image twice does not push it away from its own caption). With
      ``axis_name``, the local shard, compared with the ids on every device. Default: each
      example's global position, so only the diagonal is positive.
    axis_name: run the ring over this mesh axis; call from inside ``shard_map`` (or ``pmap``).
    implementation: "xla", "pallas_tpu", "pallas_gpu" or None (the default for the platform
      the call is compiled for).
    interpret: run a Pallas kernel in interpret mode (e.g. on CPU).
    schedule: "bidirectional" (both directions of every link: for the loss, a copy of each
      chunk each way, about half the steps; under grad, half of each chunk each way all the
      way round) or "unidirectional" (n - 1 permutes, n devices). Only matters with
      ``axis_name``.
    block_sizes: the running kernel's ``BlockSizes`` (``siglip_fast.kernels.tpu`` or ``gpu``
      without ``axis_name``). With it, "pallas_tpu" takes ``siglip_fast.kernels.tpu_ring``'s
      (the whole ring in one kernel) or ``siglip_fast.kernels.tpu``'s (the block kernels
      under the shared ring driver): the kind picks the kernel. None picks defaults by shape
      and target chip, and with ``axis_name`` the whole-ring kernel except on megacore chips
      (v4, v5p) at large local batches, where the block kernels keep both TensorCores busy.

  Differentiable w.r.t. both embeddings, ``log_t`` and ``bias``, with the gradients JAX's
  own rules give for a psum over the ring: correct under ``shard_map`` with
  ``check_vma=True`` or ``False`` and under ``pmap``.
  """
  validate.check_embeddings(img_emb, txt_emb)
  log_t, bias = validate.as_scalar("log_t", log_t), validate.as_scalar("bias", bias)
  if schedule not in ring_lib.SCHEDULES:
    raise ValueError(f"schedule must be one of {ring_lib.SCHEDULES}, got {schedule!r}")
  target = target_lib.target_of(img_emb, txt_emb)
  impl = _resolve(implementation, interpret, target)
  batch = img_emb.shape[0]
  ring_kernel = axis_name is not None and _runs_ring_kernel(impl, block_sizes, target, batch)
  module = impl.ring_module if ring_kernel else impl.block_module
  _check_block_sizes(impl, module, block_sizes, ring=axis_name is not None)

  if axis_name is None:
    offset = 0
  else:
    try:
      offset = jax.lax.axis_index(axis_name) * batch
    except NameError as e:
      raise ValueError(
        f"axis_name={axis_name!r} is not a mesh axis in scope; call "
        "sigmoid_loss inside shard_map over that axis"
      ) from e
  if pair_ids is None:
    ids = offset + jnp.arange(batch, dtype=jnp.int32)
  else:
    ids = validate.check_ids("pair_ids", pair_ids, batch)
  validate.check_finite_if_concrete(img_emb=img_emb, txt_emb=txt_emb, log_t=log_t, bias=bias)

  if ring_kernel:
    trip = _kernel_module(module).ring_trip(
      axis_name=axis_name, schedule=schedule, interpret=interpret, block_sizes=block_sizes
    )
  else:
    ops = block_ops(impl.name, interpret=interpret, block_sizes=block_sizes, target=target)
    trip = ring_lib.block_trip(axis_name=axis_name, schedule=schedule, ops=ops)
  return ring_lib.global_mean(trip, img_emb, txt_emb, ids, ids, log_t, bias, axis_name)


def _reshard(a, mesh, spec):
  """``a`` laid out as ``spec`` on ``mesh``, so that shard_map's in_specs match it: needed
  where the mesh's axes are Explicit (``jax.make_mesh``'s default), harmless elsewhere."""
  sharding = jax.sharding.NamedSharding(mesh, spec)
  if isinstance(a, jax.core.Tracer):
    reshard = getattr(jax.sharding, "reshard", None)
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    if reshard is not None and explicit in tuple(getattr(mesh, "axis_types", ()) or ()):
      return reshard(a, sharding)
    return jax.lax.with_sharding_constraint(a, sharding)
  return jax.device_put(a, sharding)


def sigmoid_loss_sharded(
  img_emb, txt_emb, log_t, bias, *, mesh, axis_name, pair_ids=None, **kwargs
) -> jax.Array:
  """``sigmoid_loss`` on global (B, D) arrays, run as the ring over ``mesh``'s ``axis_name``.

  For callers outside ``shard_map``: shards the batch over the axis, runs the ring, and
  returns the replicated mean loss. ``mesh``: a ``jax.sharding.Mesh`` (classic, or from
  ``jax.make_mesh`` with Explicit or Auto axes). ``kwargs`` are those of ``sigmoid_loss``.
  """
  validate.check_embeddings(img_emb, txt_emb)
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {mesh.axis_names}")
  n_dev = mesh.shape[axis_name]
  if img_emb.shape[0] % n_dev:
    raise ValueError(
      f"the batch ({img_emb.shape[0]}) must be divisible by the number of "
      f"devices on axis {axis_name!r} ({n_dev})"
    )
  P = jax.sharding.PartitionSpec
  log_t, bias = validate.as_scalar("log_t", log_t), validate.as_scalar("bias", bias)
  if pair_ids is None:
    pair_ids = jnp.arange(img_emb.shape[0], dtype=jnp.int32)
  pair_ids = validate.check_ids("pair_ids", pair_ids, img_emb.shape[0])

  def local(x, y, ids, lt, b):
    return sigmoid_loss(x, y, lt, b, pair_ids=ids, axis_name=axis_name, **kwargs)

  specs = (P(axis_name), P(axis_name), P(axis_name), P(), P())
  args = tuple(
    _reshard(a, mesh, s) for a, s in zip((img_emb, txt_emb, pair_ids, log_t, bias), specs)
  )
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*args)

"""The public loss: ``sigmoid_loss``, one differentiable function over every implementation.

Implementations (``implementation=``):
  "xla"         the pure-JAX reference (``siglip_fast.reference``); runs anywhere.
  "pallas_tpu"  fused Pallas Mosaic kernels (``siglip_fast.kernels.tpu``); TPU, or CPU with
                ``interpret=True`` (TPU interpret mode).
  "pallas_gpu"  fused Pallas Triton kernels (``siglip_fast.kernels.gpu``); CUDA GPU, or CPU
                with ``interpret=True``.
None picks the fastest for the default backend.

Every implementation is a ``BlockOps`` (the loss of one image-rows x text-rows block, and its
gradients) plugged into the same ring (``reference.ring``); with ``axis_name=None`` the ring has
one device and this is the dense loss. The exception is "pallas_tpu" with ``axis_name``: the
whole ring runs inside one kernel (``siglip_fast.kernels.tpu_ring``), its remote DMAs of text
chunks overlapped with the fused blocks. Input checks run once, at trace time.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

from siglip_fast.reference import ring as ring_lib

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_gpu")
# Kernel modules (under siglip_fast.kernels) and the backend each compiles for.
_KERNELS = {"pallas_tpu": ("tpu", "tpu"), "pallas_gpu": ("gpu", "gpu")}
_DEFAULT_FOR_BACKEND = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}
_EMB_DTYPES = (jnp.float32, jnp.bfloat16)


def default_implementation(backend: str | None = None) -> str:
  """The implementation ``implementation=None`` resolves to on ``backend`` (default: jax's)."""
  backend = backend or jax.default_backend()
  name = _DEFAULT_FOR_BACKEND.get(backend, "xla")
  return name if _kernel_available(name) else "xla"


def _kernel_available(name: str) -> bool:
  if name == "xla":
    return True
  try:
    _kernel_module(name)
  except ImportError:
    return False
  return True


def _kernel_module(name: str):
  return importlib.import_module(f"siglip_fast.kernels.{_KERNELS[name][0]}")


def _resolve(implementation: str | None, interpret: bool) -> str:
  """The implementation name to run, after checking it can run here."""
  name = default_implementation() if implementation is None else implementation
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {name!r}")
  if name == "xla":
    return name
  _, backend = _KERNELS[name]
  if not interpret and jax.default_backend() != backend:
    raise ValueError(
        f"implementation={name!r} compiles for {backend.upper()}, but the default backend is "
        f"{jax.default_backend()!r}; pass interpret=True to run it in interpret mode, or use "
        "implementation='xla'")
  try:
    _kernel_module(name)
  except ImportError as e:
    raise ValueError(f"implementation={name!r} is not available in this install: {e}") from e
  return name


def block_ops(implementation: str | None = None, *, interpret: bool = False,
              block_sizes=None) -> ring_lib.BlockOps:
  """The ``BlockOps`` of an implementation, after checking it can run here."""
  name = _resolve(implementation, interpret)
  if name == "xla":
    if block_sizes is not None:
      raise ValueError("block_sizes applies to the Pallas implementations, not 'xla'")
    return ring_lib.REFERENCE_OPS
  return _kernel_module(name).block_ops(interpret=interpret, block_sizes=block_sizes)


def _check_embeddings(img_emb, txt_emb):
  for arg, a in (("img_emb", img_emb), ("txt_emb", txt_emb)):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
      raise TypeError(f"{arg} must be an array, got {type(a).__name__}")
    if a.ndim != 2:
      raise ValueError(f"{arg} must have shape (batch, dim), got shape {tuple(a.shape)}")
    if a.dtype not in _EMB_DTYPES:
      raise TypeError(f"{arg} must be float32 or bfloat16, got {a.dtype}")
  if img_emb.shape != txt_emb.shape:
    raise ValueError(f"img_emb and txt_emb must have the same (batch, dim) shape, got "
                     f"{tuple(img_emb.shape)} and {tuple(txt_emb.shape)}")
  if img_emb.dtype != txt_emb.dtype:
    raise TypeError(f"img_emb and txt_emb must have the same dtype, got {img_emb.dtype} and "
                    f"{txt_emb.dtype}")
  if img_emb.shape[0] == 0 or img_emb.shape[1] == 0:
    raise ValueError(f"img_emb and txt_emb must be non-empty, got shape {tuple(img_emb.shape)}")


def _as_scalar(arg, v):
  v = jnp.asarray(v)
  if v.shape not in ((), (1,)):
    raise ValueError(f"{arg} must be a scalar (shape () or (1,)), got shape {v.shape}")
  if not jnp.issubdtype(v.dtype, jnp.floating):
    raise TypeError(f"{arg} must be a floating-point scalar, got {v.dtype}")
  return v.reshape(()).astype(jnp.float32)


def _check_pair_ids(pair_ids, batch):
  if not jnp.issubdtype(pair_ids.dtype, jnp.integer):
    raise TypeError(f"pair_ids must be integers, got {pair_ids.dtype}")
  if pair_ids.shape != (batch,):
    raise ValueError(f"pair_ids must have shape (batch,) = ({batch},), got {pair_ids.shape}")
  return pair_ids.astype(jnp.int32)


def _check_finite_if_concrete(**arrays):
  # Under jit the values are unknown; eager calls (and the trainer's data checks) catch
  # NaN/inf before they poison the parameters.
  for arg, a in arrays.items():
    if isinstance(a, jax.core.Tracer):
      continue
    if not bool(jnp.all(jnp.isfinite(a))):
      raise ValueError(f"{arg} contains non-finite values (NaN or inf)")


def sigmoid_loss(img_emb, txt_emb, log_t, bias, *, pair_ids=None, axis_name=None,
                 implementation: str | None = None, interpret: bool = False,
                 schedule: str = "bidirectional", block_sizes=None) -> jax.Array:
  """Mean SigLIP pairwise sigmoid loss, a float32 scalar (DESIGN.md section 1).

  Args:
    img_emb, txt_emb: (B, D) L2-normalised embeddings, float32 or bfloat16. With
      ``axis_name``, the (b, D) local shards of a global batch of b * axis_size pairs.
    log_t: scalar log-temperature t' (the logits are scaled by t = exp(t')).
    bias: scalar logit bias b.
    pair_ids: optional (B,) integer ids; pairs with equal ids are positives (so a batch
      holding the same image twice does not push it away from its own caption). With
      ``axis_name``, the local shard, compared with the ids on every device. Default: each
      example's global position, so only the diagonal is positive.
    axis_name: run the ring over this mesh axis; call from inside ``shard_map``.
    implementation: "xla", "pallas_tpu", "pallas_gpu" or None (best for the backend).
    interpret: run a Pallas kernel in interpret mode (e.g. on CPU).
    schedule: "bidirectional" (chunks travel both ways round the ring, about half the steps)
      or "unidirectional" (D - 1 permutes). Only matters with ``axis_name``.
    block_sizes: the kernel module's ``BlockSizes``; None picks defaults by shape and chip.

  Differentiable w.r.t. both embeddings, ``log_t`` and ``bias``.
  """
  _check_embeddings(img_emb, txt_emb)
  log_t, bias = _as_scalar("log_t", log_t), _as_scalar("bias", bias)
  if schedule not in ring_lib.SCHEDULES:
    raise ValueError(f"schedule must be one of {ring_lib.SCHEDULES}, got {schedule!r}")
  name = _resolve(implementation, interpret)
  ops = block_ops(name, interpret=interpret, block_sizes=block_sizes)

  batch = img_emb.shape[0]
  if axis_name is None:
    offset = 0
  else:
    try:
      offset = jax.lax.axis_index(axis_name) * batch
    except NameError as e:
      raise ValueError(f"axis_name={axis_name!r} is not a mesh axis in scope; call "
                       "sigmoid_loss inside shard_map over that axis") from e
  if pair_ids is None:
    ids = offset + jnp.arange(batch, dtype=jnp.int32)
  else:
    ids = _check_pair_ids(jnp.asarray(pair_ids), batch)
  _check_finite_if_concrete(img_emb=img_emb, txt_emb=txt_emb, log_t=log_t, bias=bias)
  if name == "pallas_tpu" and axis_name is not None:
    # The whole ring in one kernel: remote DMAs of text chunks overlap the fused blocks.
    from siglip_fast.kernels import tpu_ring  # pylint: disable=import-outside-toplevel
    return tpu_ring.ring_loss(img_emb, txt_emb, ids, ids, log_t, bias, axis_name=axis_name,
                              schedule=schedule, interpret=interpret, block_sizes=block_sizes)
  return ring_lib.ring_loss(img_emb, txt_emb, ids, ids, log_t, bias, axis_name=axis_name,
                            schedule=schedule, ops=ops)


def sigmoid_loss_sharded(img_emb, txt_emb, log_t, bias, *, mesh, axis_name,
                         pair_ids=None, **kwargs) -> jax.Array:
  """``sigmoid_loss`` on global (B, D) arrays, run as the ring over ``mesh``'s ``axis_name``.

  For callers outside ``shard_map``: shards the batch over the axis, runs the ring, and
  returns the replicated mean loss. ``kwargs`` are those of ``sigmoid_loss``.
  """
  _check_embeddings(img_emb, txt_emb)
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {mesh.axis_names}")
  n_dev = mesh.shape[axis_name]
  if img_emb.shape[0] % n_dev:
    raise ValueError(f"the batch ({img_emb.shape[0]}) must be divisible by the number of "
                     f"devices on axis {axis_name!r} ({n_dev})")
  P = jax.sharding.PartitionSpec
  log_t, bias = _as_scalar("log_t", log_t), _as_scalar("bias", bias)
  if pair_ids is None:
    pair_ids = jnp.arange(img_emb.shape[0], dtype=jnp.int32)
  pair_ids = _check_pair_ids(jnp.asarray(pair_ids), img_emb.shape[0])

  def local(x, y, ids, lt, b):
    return sigmoid_loss(x, y, lt, b, pair_ids=ids, axis_name=axis_name, **kwargs)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(axis_name), P(axis_name), P(axis_name),
                                                   P(), P()),
                       out_specs=P())(img_emb, txt_emb, pair_ids, log_t, bias)

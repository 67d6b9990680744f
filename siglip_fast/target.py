"""Which devices a computation is being traced for.

A performance engineer compiles ahead of time for chips the host does not have
(``jax.jit(f).lower(<ShapeDtypeStructs sharded on a compile-only TPU topology>).compile()``),
so the implementation and its default tiles must follow the devices being lowered for, not
``jax.default_backend()``. jax carries those devices' kind on the abstract mesh of each
argument's sharding and of the enclosing ``shard_map`` / ``jax.set_mesh``; only when neither
says anything (a plain call on default devices) is the default backend the target.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Target:
  """platform: "tpu", "gpu", "cpu", ...; device_kind: e.g. "TPU v5 lite", "NVIDIA H100 80GB
  HBM3"; num_cores: TensorCores (TPU) or SMs (GPU) per device, when known."""

  platform: str
  device_kind: str
  num_cores: int | None = None


def _from_abstract_device(dev) -> Target | None:
  if dev is None or getattr(dev, "platform", None) is None:
    return None
  return Target(dev.platform, dev.device_kind, getattr(dev, "num_cores", None))


def _mesh_device(mesh):
  return getattr(mesh, "abstract_device", None)


def target_of(*arrays) -> Target:
  """The devices that ``arrays`` (concrete or traced) will be computed on."""
  for a in arrays:
    try:
      sharding = jax.typeof(a).sharding
    except Exception:  # pylint: disable=broad-except  # no aval sharding on this jax/value
      continue
    t = _from_abstract_device(_mesh_device(getattr(sharding, "mesh", None)))
    if t is not None:
      return t
  get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
  if get_mesh is not None:
    t = _from_abstract_device(_mesh_device(get_mesh()))
    if t is not None:
      return t
  d = jax.devices()[0]
  return Target(d.platform, d.device_kind, getattr(d, "num_cores", None))

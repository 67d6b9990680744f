"""Start quietly on machines without a TPU: ``quiet_start()`` before jax's first computation.

Why: the ``tpu`` extra installs libtpu, and jax, left to choose its platforms, loads libtpu's
PJRT plugin even where no TPU chip is attached (jax itself knows there is none: it sets
``TPU_SKIP_MDS_QUERY``). libtpu then probes for a TPU and writes to stderr "Failed to find host
bounds for accelerator type", "could not determine TPU worker hostnames" and
``E0000 ... INVALID_ARGUMENT: Error: unexpected worker hostname ...``, before jax quietly falls
back to the CPU. Nothing is wrong; the lines only look like an error.

What it does: only when the user has not chosen platforms (``JAX_PLATFORMS`` or the
``jax_platforms`` config), has not asked for TPU initialisation (``JAX_FORCE_TPU_INIT``) and no
TPU chip is attached (jax's own PCI check, plus ``/dev/accel*`` and ``/dev/vfio/<n>``), it sets
``jax_platforms`` to the platforms that are there: ``cuda`` (a CUDA plugin is installed and an
NVIDIA device is visible), ``rocm`` (likewise), then ``cpu``. So libtpu is never loaded where it
cannot find a TPU, and nothing is filtered or silenced: a platform that is listed and fails to
start raises jax's own error. With a TPU attached, or any choice of the user's, it does nothing.

Used by ``python -m siglip_fast.train``; the benchmarks can call it the same way.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"


def tpu_attached() -> bool:
  """True if this machine may have a TPU chip (when in doubt, True)."""
  if glob.glob("/dev/accel*") or any(
    os.path.basename(p).isdigit() for p in glob.glob("/dev/vfio/*")
  ):
    return True
  try:
    from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel

    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # pylint: disable=broad-except  # jax internals moved: scan PCI ourselves
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
      try:
        with open(vendor) as f:
          if f.read().strip() == _GOOGLE_PCI_VENDOR:
            return True  # a TPU, or another Google device: stay out of the way
      except OSError:
        continue
    return False


def _plugin_installed(*modules) -> bool:
  for m in modules:
    try:
      if importlib.util.find_spec(m) is not None:
        return True
    except (ImportError, ValueError):
      continue
  return False


def platforms_without_tpu() -> list[str]:
  """The platforms of this machine other than TPU, in jax's order of preference."""
  out = []
  if glob.glob("/dev/nvidia[0-9]*") and _plugin_installed(
    "jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"
  ):
    out.append("cuda")
  if os.path.exists("/dev/kfd") and _plugin_installed(
    "jax_rocm7_plugin", "jax_rocm60_plugin", "jax_plugins.xla_rocm7", "jax_plugins.xla_rocm60"
  ):
    out.append("rocm")
  return out + ["cpu"]


def quiet_start() -> str | None:
  """Keep jax from loading libtpu on a machine without a TPU (see the module docstring).

  Call before jax initialises its backends (importing jax first is fine). Returns the
  platforms it set, or None when it left jax's choice alone."""
  if os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_FORCE_TPU_INIT"):
    return None
  if "jax" in sys.modules:
    import jax  # pylint: disable=import-outside-toplevel

    if jax.config.jax_platforms:
      return None
  if tpu_attached():
    return None
  platforms = ",".join(platforms_without_tpu())
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_platforms", platforms)
  else:
    os.environ["JAX_PLATFORMS"] = platforms
  return platforms

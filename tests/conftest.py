"""Test set-up: 8 simulated CPU devices for the ring, CPU only, and the --runslow switch.

The environment must be set before jax is imported anywhere, hence at the top of conftest.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Compile-only TPU checks in several processes (pytest -n, subprocess tests) share libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
  parser.addoption(
    "--runslow", action="store_true", default=False, help="also run tests marked slow"
  )


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)

"""``pip install siglip-fast`` brings only what the loss needs: the loss imports and runs with
the trainer's dependencies blocked from import, and pyproject.toml keeps them in extras."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_DEPS = ("flax", "optax", "orbax", "ml_collections", "absl", "PIL", "matplotlib")

# A child that cannot import any trainer dependency (a meta-path finder refuses them, as if
# they were not installed), then uses the loss: value and gradients, eager and under jit.
_CHILD = r"""
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{name} is blocked (not installed)")
    return None

sys.meta_path.insert(0, Block())
import jax, jax.numpy as jnp
import siglip_fast
x = jax.random.normal(jax.random.key(0), (8, 4))
x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
y = jnp.roll(x, 1, axis=0)
loss = siglip_fast.sigmoid_loss(x, y, jnp.log(10.0), -10.0)
g = jax.jit(jax.grad(siglip_fast.sigmoid_loss, argnums=(0, 1, 2, 3)))(x, y, jnp.log(10.0), -10.0)
assert jnp.isfinite(loss) and all(bool(jnp.all(jnp.isfinite(a))) for a in g)
loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
assert not loaded, loaded
try:
  siglip_fast.SigmoidLoss
except ImportError as e:
  assert "siglip-fast[flax]" in str(e), e
else:
  raise AssertionError("SigmoidLoss imported without flax")
print("LOSS", float(loss))
"""


def test_loss_works_without_the_trainer_dependencies():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
    [sys.executable, "-c", _CHILD, ",".join(TRAIN_DEPS)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  assert "LOSS" in out.stdout


def test_core_dependencies_are_jax_and_numpy_only():
  with open(ROOT / "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
  names = lambda reqs: {
    r.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in reqs
  }
  assert names(project["dependencies"]) == {"jax", "numpy"}
  extras = project["optional-dependencies"]
  assert {
    "flax",
    "optax",
    "orbax-checkpoint",
    "ml_collections",
    "pillow",
    "matplotlib",
    "absl-py",
  } <= names(extras["train"])
  assert names(extras["tpu"]) == {"jax"} and "jax[tpu]" in extras["tpu"][0]


def test_readme_and_ci_install_the_trainer_for_development():
  readme = (ROOT / "README.md").read_text()
  ci = (ROOT / ".ci" / "run").read_text()
  install = next(l for l in readme.splitlines() if "pip install" in l and ".venv" in l)
  command = install.split("#")[0].strip()
  assert '".[tpu,train,dev]"' in command
  assert command in ci

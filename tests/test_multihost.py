"""Multi-host through jax.distributed: two processes on localhost (CPU, gloo collectives),
two CPU devices each, so the loss's ring crosses processes as well as devices.

The fast test runs the ring loss and its gradients over the 2 x 2 mesh and checks them
against the float64 oracle; the slow one trains with ``python -m siglip_fast.train`` on both
processes and compares with the same run on four devices of this one process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from siglip_fast.train import trainer as train
from tests.helpers import numpy_loss_and_grads, persistent_compilation_cache, random_inputs, rel_err
from tests.train_helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  with persistent_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache"):
    yield


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _child_env(devices_per_process: int) -> dict:
  # Exactly `devices_per_process` CPU devices per child, not this process's eight.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(
    JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}"
  )
  return env


def _run_pair(make_cmd, tmp_path, env) -> list[str]:
  """Start processes 0 and 1 (make_cmd(process_id, port) -> argv), wait with a bounded
  timeout, kill both on failure, and return their outputs (each must exit 0)."""
  port = _free_port()
  procs, logs = [], []
  for pid in range(2):
    log = open(tmp_path / f"proc{pid}.log", "w+")
    procs.append(
      subprocess.Popen(make_cmd(pid, port), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    )
    logs.append(log)
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  out = []
  for log in logs:
    log.seek(0)
    out.append(log.read())
    log.close()
  for p, text in zip(procs, out):
    assert p.returncode == 0, f"process exited with {p.returncode}:\n{text[-4000:]}"
  return out


# A child of the fast test: the ring loss over all devices of both processes, on global
# inputs that every process builds from the same seed. Prints its own rows' gradients.
_WORKER = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from siglip_fast import sigmoid_loss_sharded
from siglip_fast.train import trainer as train
from tests.helpers import random_inputs
pid, port, batch, dim = map(int, sys.argv[1:5])
train.setup_distributed(f"localhost:{port}", 2, pid, timeout=120)
assert jax.process_count() == 2 and jax.device_count() == 4
mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",))
P = jax.sharding.PartitionSpec
rows = jax.sharding.NamedSharding(mesh, P("batch"))
x, y = random_inputs(11, batch, dim)
ids = np.arange(batch, dtype=np.int32) // 2  # pairs of duplicates: positives off the diagonal
lo, hi = pid * batch // 2, (pid + 1) * batch // 2
glob = lambda a: jax.make_array_from_process_local_data(rows, np.asarray(a)[lo:hi])
f = jax.jit(jax.value_and_grad(
    lambda x, y, lt, b, i: sigmoid_loss_sharded(x, y, lt, b, mesh=mesh, axis_name="batch",
                                                pair_ids=i), argnums=(0, 1, 2, 3)))
loss, (dx, dy, dlt, db) = f(glob(x), glob(y), 1.7, -3.0, glob(ids))
local = lambda a: np.concatenate([np.asarray(s.data) for s in
                                  sorted(a.addressable_shards, key=lambda s: s.index[0].start)])
host = lambda a: float(np.asarray(a.addressable_data(0)))
print("RESULT " + json.dumps({"loss": host(loss), "dlog_t": host(dlt), "dbias": host(db),
                              "dx": local(dx).tolist(), "dy": local(dy).tolist()}))
"""


def test_ring_loss_across_two_processes(tmp_path):
  batch, dim = 16, 8
  out = _run_pair(
    lambda pid, port: [sys.executable, "-c", _WORKER, str(pid), str(port), str(batch), str(dim)],
    tmp_path,
    _child_env(2),
  )
  res = [json.loads(next(l for l in o.splitlines() if l.startswith("RESULT "))[7:]) for o in out]
  x, y = random_inputs(11, batch, dim)
  ids = np.arange(batch) // 2
  loss, (dx, dy, dlt, db) = numpy_loss_and_grads(x, y, 1.7, -3.0, ids)
  # Both processes hold the same replicated loss and scalar gradients.
  for r in res:
    assert rel_err(r["loss"], loss) < 1e-5
    assert rel_err(r["dlog_t"], dlt) < 1e-5 and rel_err(r["dbias"], db) < 1e-5
  # Each holds its half of the rows' gradients.
  assert rel_err(np.concatenate([r["dx"] for r in res]), dx) < 1e-5
  assert rel_err(np.concatenate([r["dy"] for r in res]), dy) < 1e-5


def _overrides(cfg) -> list[str]:
  """--config.x=v flags reproducing ``cfg``'s numeric and boolean leaves."""
  flat = {}

  def walk(prefix, node):
    for k, v in node.items():
      if hasattr(v, "items"):
        walk(f"{prefix}{k}.", v)
      elif isinstance(v, (bool, int, float)):
        flat[prefix + k] = v

  walk("", cfg)
  return [f"--config.{k}={v}" for k, v in flat.items()]


def _flatten(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _losses(path):
  with open(path) as f:
    return [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]


@pytest.mark.slow
def test_trainer_on_two_processes(tmp_path):
  cfg = tiny_config(num_devices=0)
  workdir = tmp_path / "multihost"
  out = _run_pair(
    lambda pid, port: [
      sys.executable,
      "-m",
      "siglip_fast.train",
      f"--workdir={workdir}",
      f"--coordinator_address=localhost:{port}",
      "--num_processes=2",
      f"--process_id={pid}",
      "--distributed_timeout=120",
      *_overrides(cfg),
    ],
    tmp_path,
    _child_env(2),
  )
  assert "2 process(es), 4 device(s)" in out[0]
  assert "held-out evaluation" in out[0] and "held-out evaluation" not in out[1]

  # The same global batch on four devices of this one process.
  ref = train.train_and_evaluate(tiny_config(num_devices=4), str(tmp_path / "one"), verbose=False)
  # Reopening the multi-host workdir restores its final checkpoint (nothing left to train).
  multi = train.train_and_evaluate(tiny_config(num_devices=4), str(workdir), verbose=False)
  assert multi["resumed_from"] == 4
  # Same programs per device; only the order of the cross-device float32 sums differs
  # (gloo vs in-process), so losses agree to float32 rounding, and parameters after four
  # Adam steps (whose per-coordinate normalisation magnifies rounding in tiny gradient
  # entries) to 1e-5.
  ours, theirs = _losses(workdir / "metrics.jsonl"), _losses(tmp_path / "one" / "metrics.jsonl")
  assert len(ours) == len(theirs) == 4
  assert ours[0] == pytest.approx(theirs[0], rel=1e-6)  # before any update
  for a, b in zip(ours[1:], theirs[1:]):
    assert a == pytest.approx(b, rel=1e-5)
  assert rel_err(_flatten(multi["params"]), _flatten(ref["params"])) < 1e-5

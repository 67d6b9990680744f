"""Multi-host training through jax.distributed: two processes on localhost (CPU, gloo
collectives), two CPU devices each, so the loss's ring crosses processes as well as
devices. Checked against the same run on four devices of this one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from siglip_fast import train
from tests.helpers import rel_err
from tests.test_train import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _overrides(cfg) -> list[str]:
  """--config.x=v flags reproducing ``cfg``'s leaves (strings left out: all defaults)."""
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


def test_two_processes_match_one_process(tmp_path):
  cfg = tiny(total_steps=2, num_devices=0)
  workdir = tmp_path / "multihost"
  port = _free_port()
  # The children get exactly two CPU devices each, not this process's eight.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs, logs = [], []
  for pid in range(2):
    log = open(tmp_path / f"proc{pid}.log", "w+")
    cmd = [sys.executable, "-m", "siglip_fast.train", f"--workdir={workdir}",
           f"--coordinator_address=localhost:{port}", "--num_processes=2",
           f"--process_id={pid}", "--distributed_timeout=120", *_overrides(cfg)]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
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
  assert "2 process(es), 4 device(s)" in out[0]
  assert "held-out evaluation" in out[0] and "held-out evaluation" not in out[1]

  # The same global batch on four devices of one process.
  ref = train.train_and_evaluate(tiny(total_steps=2, num_devices=4), str(tmp_path / "one"),
                                 verbose=False)
  # Reopening the multi-host workdir restores its final checkpoint (nothing left to train).
  multi = train.train_and_evaluate(tiny(total_steps=2, num_devices=4), str(workdir),
                                   verbose=False)
  assert multi["resumed_from"] == 2
  assert rel_err(_flatten(multi["params"]), _flatten(ref["params"])) < 1e-6
  with open(workdir / "metrics.jsonl") as f:
    first = json.loads(f.readline())
  with open(tmp_path / "one" / "metrics.jsonl") as f:
    ref_first = json.loads(f.readline())
  assert first["step"] == 1 and first["loss"] == pytest.approx(ref_first["loss"], rel=1e-6)

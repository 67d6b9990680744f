"""``python -m siglip_fast.train`` as a user runs it, in a subprocess: it starts quietly on a
machine without a TPU, and rejects an invalid config with one line before writing anything."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from siglip_fast import _quiet

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "siglip_fast" / "train" / "configs" / "tiny_shapes.py")
# What libtpu prints when it probes for a TPU that is not there.
NOISE = (
  "E0000",
  "INVALID_ARGUMENT",
  "TPU_WORKER_HOSTNAMES",
  "could not determine TPU",
  "host bounds",
  "Logging before InitGoogle",
)


def _env(**extra):
  """The environment of a user's shell: no JAX_PLATFORMS (conftest sets it for this process),
  one CPU device."""
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "TPU_SKIP_MDS_QUERY")
  }
  env.update(extra)
  return env


def _run(args, env, timeout=240):
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )


needs_no_tpu = pytest.mark.skipif(_quiet.tpu_attached(), reason="a TPU is attached here")


@needs_no_tpu
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_libtpu_is_noisy_without_the_helper_and_quiet_with_it():
  """The control: plain jax on this machine prints libtpu's probe (so the test below can see
  it); after quiet_start it does not, and the CPU is still there."""
  probe = "import jax; print('DEVICES', jax.devices())"
  loud = _run(["-c", probe], _env(), timeout=120)
  assert loud.returncode == 0 and any(n in loud.stderr for n in NOISE), loud.stderr
  quiet = _run(
    ["-c", "from siglip_fast import _quiet; print('SET', _quiet.quiet_start()); " + probe],
    _env(),
    timeout=120,
  )
  assert quiet.returncode == 0, quiet.stderr
  assert "SET cpu" in quiet.stdout and "DEVICES [CpuDevice(id=0)]" in quiet.stdout
  assert not any(n in quiet.stderr for n in NOISE), quiet.stderr


@needs_no_tpu
def test_trainer_starts_quietly(tmp_path):
  out = _run(
    [
      "-m",
      "siglip_fast.train",
      f"--config={TINY}",
      f"--workdir={tmp_path / 'w'}",
      "--config.total_steps=2",
    ],
    _env(),
  )
  assert out.returncode == 0, out.stderr[-4000:]
  assert "loss 'xla'" in out.stdout and "held-out evaluation after 2 steps" in out.stdout
  noisy = [l for l in out.stderr.splitlines() if any(n in l for n in NOISE)]
  assert not noisy, out.stderr


def test_users_choice_of_platform_is_left_alone(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert _quiet.quiet_start() is None


@pytest.mark.parametrize(
  "flag,message",
  [
    ("--config.batch_size=0", "error: config.batch_size=0 is invalid: must be an integer >= 1"),
    ("--config.batch_size=-1", "error: config.batch_size=-1 is invalid: must be an integer >= 1"),
  ],
)
def test_invalid_config_is_one_line_and_writes_nothing(tmp_path, flag, message):
  workdir = tmp_path / "w"
  out = _run(
    ["-m", "siglip_fast.train", f"--config={TINY}", f"--workdir={workdir}", flag],
    _env(JAX_PLATFORMS="cpu"),
    timeout=120,
  )
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == message, out.stderr
  assert "Traceback" not in out.stderr
  assert not workdir.exists()

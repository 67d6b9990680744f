"""The benchmark and the device check run end to end on CPU in their smoke modes."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args, timeout):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device is enough
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _rows(out_dir):
  (path,) = pathlib.Path(out_dir).glob("bench_cpu_*.json")
  data = json.loads(path.read_text())
  assert data["meta"]["backend"] == "cpu" and data["meta"]["jax"]
  return data["rows"]


def test_bench_loss_smoke_xla_and_chunked(tmp_path):
  proc = _run(["benchmarks.bench_loss", "--sizes", "256x128", "--impls", "xla,chunked",
               "--repeats", "3", "--warmup", "1", "--min-sample-ms", "1",
               "--out-dir", str(tmp_path)], timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = _rows(tmp_path)
  assert {(r["impl"], r["mode"]) for r in rows} == {
      ("xla", "fwd"), ("xla", "vg"), ("chunked", "fwd"), ("chunked", "vg")}
  for r in rows:
    assert r["ms"] > 0 and r["finite"] and r["temp_bytes"] is not None
    assert r["flops"] == (2 if r["mode"] == "fwd" else 6) * 256 * 256 * 128
  # Both compute the same loss.
  losses = {r["impl"]: r["loss"] for r in rows if r["mode"] == "fwd"}
  assert losses["xla"] == pytest.approx(losses["chunked"], rel=1e-5)
  assert "B=256" in proc.stdout and "temp_MiB" in proc.stdout


@pytest.mark.slow
def test_bench_loss_smoke_interpreted_kernel_big_and_tune(tmp_path):
  proc = _run(["benchmarks.bench_loss", "--sizes", "64x32", "--impls", "kernel,xla,matmul",
               "--interpret", "--big", "128x32", "--tune", "64x32", "--repeats", "2",
               "--warmup", "1", "--min-sample-ms", "1", "--out-dir", str(tmp_path)],
              timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = _rows(tmp_path)
  kernel = [r for r in rows if r["impl"] == "pallas_gpu" and not r.get("big")]
  assert {r["mode"] for r in kernel} == {"fwd", "vg"}
  assert all(r["ms"] and r["finite"] for r in rows), [r.get("error") for r in rows]
  xla_loss = next(r["loss"] for r in rows if r["impl"] == "xla" and r["mode"] == "fwd")
  for r in rows:
    if r["impl"].startswith("pallas_gpu") and r["B"] == 64:
      assert r["loss"] == pytest.approx(xla_loss, rel=1e-5)
  assert any(r.get("big") for r in rows) and any(r.get("tune") for r in rows)


@pytest.mark.slow
def test_h100_check_smoke_interpreted():
  proc = _run(["benchmarks.h100_check", "--cases", "48x32:float32:dup:api,40x16:bfloat16",
               "--interpret"], timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "all passed" in proc.stdout


def test_h100_check_refuses_without_gpu():
  proc = _run(["benchmarks.h100_check"], timeout=120)
  assert proc.returncode == 2 and "no GPU" in proc.stdout

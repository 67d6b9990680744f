"""The benchmark, the device check and the one GPU command (benchmarks/run_gpu.sh) run end
to end on CPU in their smoke and dry-run modes; the dY wire study's replay holds its claims."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args, timeout):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device is enough
  return subprocess.run(
    [sys.executable, "-m", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _rows(out_dir):
  (path,) = pathlib.Path(out_dir).glob("bench_cpu_*.json")
  data = json.loads(path.read_text())
  assert data["meta"]["backend"] == "cpu" and data["meta"]["jax"]
  return data["rows"]


def test_bench_loss_smoke_xla_and_chunked(tmp_path):
  proc = _run(
    [
      "benchmarks.bench_loss",
      "--sizes",
      "256x128",
      "--impls",
      "xla,chunked",
      "--repeats",
      "3",
      "--warmup",
      "1",
      "--min-sample-ms",
      "1",
      "--out-dir",
      str(tmp_path),
    ],
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = _rows(tmp_path)
  assert {(r["impl"], r["mode"]) for r in rows} == {
    ("xla", "fwd"),
    ("xla", "vg"),
    ("chunked", "fwd"),
    ("chunked", "vg"),
  }
  for r in rows:
    assert r["ms"] > 0 and r["finite"] and r["temp_bytes"] is not None
    assert r["flops"] == (2 if r["mode"] == "fwd" else 6) * 256 * 256 * 128
  # Both compute the same loss.
  losses = {r["impl"]: r["loss"] for r in rows if r["mode"] == "fwd"}
  assert losses["xla"] == pytest.approx(losses["chunked"], rel=1e-5)
  assert "B=256" in proc.stdout and "temp_MiB" in proc.stdout


@pytest.mark.slow
def test_bench_loss_smoke_interpreted_kernel_big_and_tune(tmp_path):
  proc = _run(
    [
      "benchmarks.bench_loss",
      "--sizes",
      "64x32",
      "--impls",
      "kernel,xla,matmul",
      "--interpret",
      "--big",
      "128x32",
      "--tune",
      "64x32",
      "--repeats",
      "2",
      "--warmup",
      "1",
      "--min-sample-ms",
      "1",
      "--out-dir",
      str(tmp_path),
    ],
    timeout=600,
  )
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
def test_gpu_check_smoke_interpreted():
  proc = _run(
    ["benchmarks.gpu_check", "--cases", "48x32:float32:dup:api,40x16:bfloat16", "--interpret"],
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "all passed" in proc.stdout


def test_gpu_check_refuses_without_gpu():
  proc = _run(["benchmarks.gpu_check"], timeout=120)
  assert proc.returncode == 2 and "no GPU" in proc.stdout


def _run_gpu_sh(out_dir, timeout, **env):
  """benchmarks/run_gpu.sh in its dry-run mode (CPU, interpret mode, tiny shapes)."""
  full = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    SIGLIP_DRY_RUN="1",
    OUT=str(out_dir),
    PYTHON=sys.executable,
    **env,
  )
  full.pop("XLA_FLAGS", None)
  return subprocess.run(
    ["bash", str(ROOT / "benchmarks" / "run_gpu.sh")],
    cwd=ROOT,
    env=full,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_run_gpu_sh_dry_run_end_to_end(tmp_path):
  # The one prepared GPU command, end to end on this CPU: a broken script shows up here, not
  # on the rarely lent GPU.
  proc = _run_gpu_sh(tmp_path, timeout=400)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["dry_run"] is True and summary["final_rc"] == 0
  assert [s["stage"] for s in summary["stages"]] == ["install", "gpu_check", "bench_loss"]
  assert all(s["rc"] == 0 for s in summary["stages"])
  (name,) = summary["bench_json"]
  assert name.startswith("bench_cpu_cpu_jax") and (tmp_path / name).is_file()
  data = json.loads((tmp_path / name).read_text())
  assert data["meta"]["device_kind"] and data["meta"]["jax"] and data["meta"]["date"]
  impls = {(r["impl"], r["mode"]) for r in data["rows"]}
  assert {("pallas_gpu", "fwd"), ("pallas_gpu", "vg"), ("xla", "vg"), ("matmul", "mm")} <= impls
  assert all(r.get("ms") and r.get("finite") for r in data["rows"]), data["rows"]
  goals = {g["goal"].split(" (")[0] for g in data["meta"]["goals"]}
  assert {
    "vg <= 1.25x the 6B^2D floor",
    "fwd <= 1.1x one bf16 matmul",
    "vg temp >= 50x below XLA dense",
    "vg runs at B=128, D=32",
  } <= goals
  text = (tmp_path / "summary.txt").read_text()
  assert "gpu_check: all passed" in text and "Goals at B=64, D=32" in text
  assert "not performance figures" in text
  for f in ("run.log", "gpu_check.log", "bench.log"):
    assert (tmp_path / f).is_file()
  assert "exit 0" in proc.stdout


def test_run_gpu_sh_maps_its_own_timeouts_to_75(tmp_path):
  # A stage killed by the script's own limit must not exit 124 (the tool's timeout code).
  # Also the fallback when the install fails or siglip_fast's __init__ cannot import: the
  # PYTHONPATH shim, whose package __init__ imports nothing.
  proc = _run_gpu_sh(
    tmp_path, timeout=200, SIGLIP_STAGES="gpu_check", CHECK_S="1", SIGLIP_FORCE_SHIM="1"
  )
  assert proc.returncode == 75, proc.stdout[-3000:]
  assert "using the shim" in proc.stdout
  assert "killed by this script's own 1s limit" in proc.stdout
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["final_rc"] == 75
  assert [(s["stage"], s["rc"]) for s in summary["stages"]] == [("install", 0), ("gpu_check", 75)]


def test_dy_wire_precision_float32_wire_is_one_rounding_at_any_ring_size():
  from benchmarks import dy_wire_precision as dwp  # pylint: disable=import-outside-toplevel

  rows = [
    dwp.chunk_dy(n, 64, 128, 30.0, -5.0, "unidirectional", np.random.default_rng(1))
    for n in (4, 32)
  ]
  for r in rows:
    # The float32 wire: the caller's final bf16 rounding and nothing else (2^-9 relative per
    # element, about 2^-9 / sqrt(3) in norm for uniform rounding errors).
    assert r["f32_wire_rel"] < 2.0**-9, r
    # The bf16 wire adds one rounding per hop on top.
    assert r["bf16_wire_rel"] > r["f32_wire_rel"], r
  assert rows[1]["bf16_wire_rel"] > 1.5 * rows[0]["bf16_wire_rel"], rows  # grows with hops

"""Utilisation report of the SigLIP loss: FLOPs, bytes, time, fraction of peak and the bound.

    python -m benchmarks.utilisation                          # what this host can do
    python -m benchmarks.utilisation --shapes "16384,1152,bfloat16;32768,768,bfloat16"
    python -m benchmarks.utilisation --trace /tmp/siglip-trace   # plus a jax.profiler trace

The default run on a CPU-only host (compile-only, one shape, every implementation, every TPU
generation) took 9.5 minutes wall (5.5 of CPU) on a busy 2-core machine; one generation
(``--generations v5e``) or one implementation narrows it.

One row per kernel call: an implementation ("xla", "pallas_tpu", "pallas_gpu"; the fused
ring kernel "pallas_tpu_ring"), a kind ("block": the loss of a B x B batch on one device, as
``sigmoid_loss`` without ``axis_name`` runs it; "ring": the global batch B over ``--ring``
devices in ``shard_map``, per-device figures) and a pass ("fwd": the loss; "vag": value and
gradients, the call ``jax.grad`` makes).

Modes (``--mode auto`` picks the first that applies):
  measured      on a TPU or GPU: the compiled call is timed (median of ``--iters``) on the
                local chip; achieved TFLOP/s, fraction of the chip's peak, MFU.
  compile-only  anywhere else (a CPU host with jax[tpu]): every call is compiled for real TPU
                generations on compile-only topologies (no TPU needed) and its time is
                MODELLED from the cost analysis and the chip table (benchmarks/chips.py):
                max(FLOPs / peak, bytes / HBM bandwidth, wire bytes / link bandwidth). A
                modelled time is a lower bound, never a measurement.

Columns: FLOPs, bytes and transcendentals come from ``compiled.cost_analysis()`` (a Pallas
kernel reports its ``pl.CostEstimate``); model FLOPs are the useful work (2 B^2 D forward,
6 B^2 D value-and-grad; per device for the ring), so MFU compares implementations that
recompute differently. AI = FLOPs / byte against the chip's ridge (peak / HBM bandwidth) gives
the bound: MXU / tensor cores above it, HBM below; a ring row is wire bound when its hops
(chunk bytes / link bandwidth) take longer than its compute. temp = XLA's temporary HBM
(memory analysis); VMEM = the scoped VMEM limit the Pallas TPU kernels compiled under (use is
at most that; Mosaic fails to compile past it). rel err = largest relative error of the loss
and gradients against a float64 NumPy oracle, on fresh random inputs (batches up to
``--check-max-batch``; compile-only mode checks the kernels in interpret mode on CPU).

Static schedule (compile-only mode): where a ``python -m benchmarks.tpu_profile`` JSON has the
same generation, kernel, B and D (``--static-profile``; default: the committed
benchmarks/results/tpu_profile_*.json), a Pallas row also gets "static ms" (loop-body
bundles x grid steps at the chip's clock, summed over the call's kernels) and "unit" (the VLIW
unit the schedule keeps busiest). These are read from libtpu's own schedule, so unlike the
roofline they see the VPU/EUP work and the register spills; they are STATIC, not
measurements: they leave out stalls on DMA waits (HBM, ICI), semaphores, pipeline fill and
drain, and clock throttling, and count every bundle as one cycle.

XLA's cost analysis counts a while-loop body once: rows whose program keeps a loop (the ring
over more than 4 devices) say so in ``note`` and are modelled from the model FLOPs instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib
import json
import math
import os
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

try:
  from benchmarks import chips as chips_lib
except ImportError:  # run as a file (python benchmarks/utilisation.py): add the repo root
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from benchmarks import chips as chips_lib
from benchmarks.static_profiles import load_static_profiles

from siglip_fast.loss import REGISTRY
from siglip_fast import ring as ring_lib
from siglip_fast import target as target_lib
from siglip_fast.reference import ring as reference_ring

AXIS = "ring"
PASSES = ("fwd", "vag")
DEFAULT_SHAPES = "16384,1152,bfloat16"
DEFAULT_RESULTS = pathlib.Path(__file__).resolve().parent / "results"
_MODEL_FLOPS_PER_B2D = {"fwd": 2, "vag": 6}
# Kernel implementations, from the registry: (module under siglip_fast.kernels, platform,
# kinds it serves). A whole-ring kernel is its own row, "<name>_ring", serving the ring.
_KERNELS = {}
for _impl in REGISTRY.values():
  if _impl.block_module is not None:
    _KERNELS[_impl.name] = (_impl.block_module, _impl.platform, ("block", "ring"))
  if _impl.ring_module is not None:
    _KERNELS[f"{_impl.name}_ring"] = (_impl.ring_module, _impl.platform, ("ring",))
del _impl


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  dim: int
  dtype: str = "bfloat16"


def parse_shapes(text: str) -> list[Shape]:
  """ "B,D[,dtype];..." -> shapes; dtype float32 or bfloat16 (default bfloat16)."""
  shapes = []
  for part in filter(None, (p.strip() for p in text.split(";"))):
    fields = [f.strip() for f in part.split(",")]
    if len(fields) not in (2, 3):
      raise ValueError(f"shape {part!r} must be 'B,D' or 'B,D,dtype'")
    try:
      batch, dim = int(fields[0]), int(fields[1])
    except ValueError:
      raise ValueError(f"shape {part!r}: B and D must be integers") from None
    dtype = fields[2] if len(fields) == 3 else "bfloat16"
    if batch < 1 or dim < 1:
      raise ValueError(f"shape {part!r}: B and D must be positive")
    if dtype not in ("float32", "bfloat16"):
      raise ValueError(f"shape {part!r}: dtype must be float32 or bfloat16, got {dtype!r}")
    shapes.append(Shape(batch, dim, dtype))
  if not shapes:
    raise ValueError("--shapes is empty")
  return shapes


# ------------------------------------------------------------------------------------------
# Implementations


def kernel_module(impl: str):
  return importlib.import_module(f"siglip_fast.kernels.{_KERNELS[impl][0]}")


def available_implementations(backend: str) -> list[str]:
  """ "xla" plus every kernel for ``backend`` whose module is present in this install.

  A module that is present but fails to import is listed anyway, so its rows show the error.
  """
  impls = ["xla"]
  for impl, (mod, kernel_backend, _) in _KERNELS.items():
    if kernel_backend != backend:
      continue
    try:
      kernel_module(impl)
    except ModuleNotFoundError as e:
      if e.name == f"siglip_fast.kernels.{mod}":
        continue
    except Exception:  # noqa: BLE001 - reported in the rows
      pass
    impls.append(impl)
  return impls


def _block_ops(impl: str, target: target_lib.Target | None, interpret: bool) -> ring_lib.BlockOps:
  if impl == "xla":
    return reference_ring.REFERENCE_OPS
  # Compiling for a TPU from a CPU host: name the chip, so that the kernels pick its defaults
  # (tiles for this shape, the value-and-grad plan, the VMEM cap) as they would on it.
  return kernel_module(impl).block_ops(interpret=interpret, target=None if interpret else target)


def loss_function(
  impl: str,
  kind: str,
  pass_: str,
  *,
  mesh=None,
  target=None,
  interpret=False,
  schedule="bidirectional",
):
  """f(x, y, ids, log_t, bias) -> loss (fwd) or (loss, (dx, dy, dlog_t, dbias)) (vag).
  ``target``: the ``siglip_fast.target.Target`` the block kernels pick defaults for."""
  axis = AXIS if kind == "ring" else None
  if impl == "pallas_tpu_ring":
    ring_loss = functools.partial(kernel_module(impl).ring_loss, interpret=interpret)
  else:
    ring_loss = functools.partial(reference_ring.ring_loss, ops=_block_ops(impl, target, interpret))

  def local(x, y, ids, log_t, bias):
    return ring_loss(x, y, ids, ids, log_t, bias, axis_name=axis, schedule=schedule)

  f = local
  if kind == "ring":
    f = jax.shard_map(
      local, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(AXIS), P(), P()), out_specs=P()
    )
  if pass_ == "vag":
    f = jax.value_and_grad(f, argnums=(0, 1, 3, 4))
  return f


# ------------------------------------------------------------------------------------------
# Inputs and the float64 oracle


def _inputs(shape: Shape, seed: int):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((shape.batch, shape.dim), dtype=np.float32)
  y = rng.standard_normal((shape.batch, shape.dim), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  dt = jnp.dtype(shape.dtype)
  return (
    jnp.asarray(x, dt),
    jnp.asarray(y, dt),
    jnp.arange(shape.batch, dtype=jnp.int32),
    jnp.float32(math.log(10.0)),
    jnp.float32(-10.0),
  )


def oracle(x, y, log_t, bias):
  """Mean loss and (dx, dy, dlog_t, dbias) in float64 NumPy (docs/DESIGN.md section 1)."""
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  n = x.shape[0]
  t = math.exp(float(log_t))
  logits = t * (x @ y.T) + float(bias)
  pos = np.eye(n, dtype=bool)
  u = np.where(pos, -logits, logits)
  loss = np.sum(np.maximum(u, 0) + np.log1p(np.exp(-np.abs(u)))) / n
  g = (0.5 * (1 + np.tanh(0.5 * logits)) - pos) / n
  return loss, (t * g @ y, t * g.T @ x, np.sum(g * (logits - float(bias))), np.sum(g))


def _rel_err(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_rel_err(out, pass_: str, args) -> float:
  x, y, _, log_t, bias = args
  ref_loss, ref_grads = oracle(x, y, log_t, bias)
  if pass_ == "fwd":
    return _rel_err(out, ref_loss)
  loss, grads = out
  return max([_rel_err(loss, ref_loss)] + [_rel_err(g, r) for g, r in zip(grads, ref_grads)])


# ------------------------------------------------------------------------------------------
# Compiling, costing, timing


def _abstract(shape: Shape, shardings):
  """ShapeDtypeStructs of (x, y, ids, log_t, bias): compiling needs no data."""
  dt = jnp.dtype(shape.dtype)
  specs = (
    ((shape.batch, shape.dim), dt),
    ((shape.batch, shape.dim), dt),
    ((shape.batch,), jnp.int32),
    ((), jnp.float32),
    ((), jnp.float32),
  )
  return tuple(jax.ShapeDtypeStruct(s, d, sharding=sh) for (s, d), sh in zip(specs, shardings))


def _shardings(kind, device=None, mesh=None):
  if kind == "ring":
    sharded, rep = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    return (sharded, sharded, sharded, rep, rep)
  return (SingleDeviceSharding(device),) * 5


def _cost(compiled) -> dict:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax: one dict per program
    ca = ca[0] if ca else {}
  ca = ca or {}
  out = {
    "flops": ca.get("flops"),
    "bytes": ca.get("bytes accessed"),
    "transcendentals": ca.get("transcendentals"),
  }
  est = ca.get("optimal_seconds")
  out["xla_estimate_s"] = est if est is not None and est > 0 else None
  try:
    out["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
  except Exception:  # noqa: BLE001 - not every backend has a memory analysis
    out["temp_bytes"] = None
  text = compiled.as_text()
  out["vmem_limit_bytes"] = _kernel_vmem_limit(text)
  out["has_loop"] = bool(re.search(r"\bwhile\(", text))
  out["ring_plan"] = _ring_kernel_plan(text)
  return out


def _ring_kernel_plan(hlo_text: str) -> str | None:
  """The value-and-grad plan of the ring kernel (kernels/tpu_ring.py) a compiled program
  runs, from its kernels' op names: "one trip" (``siglip_ring_fwd_bwd``), "two trips"
  (``siglip_ring_fwd_bwd_dx`` then ``_dy``), or None (no ring kernel with gradients)."""
  if re.search(r"%siglip_ring_fwd_bwd_dx[.\s=]", hlo_text):
    return "two trips"
  if re.search(r"%siglip_ring_fwd_bwd[.\s=]", hlo_text):
    return "one trip"
  return None


def _kernel_vmem_limit(hlo_text: str) -> int | None:
  """Largest scoped-VMEM limit of the Pallas (Mosaic) custom calls in a compiled TPU program.

  Each ``tpu_custom_call`` carries its ``scoped_memory_configs`` in the backend config that
  follows it (XLA's own fusions carry theirs too, so only the first config after each kernel
  is read). None when the program has no Pallas kernel.
  """
  limits, start = [], 0
  while (i := hlo_text.find('custom_call_target="tpu_custom_call"', start)) >= 0:
    m = re.compile(r'"scoped_memory_configs":\[([^\]]*)\]').search(hlo_text, i)
    if m:
      limits += [int(v) for v in re.findall(r'"size":"(\d+)"', m.group(1))]
    start = i + 1
  return max(limits) if limits else None


def _time_call(compiled, args, iters: int) -> float:
  jax.block_until_ready(compiled(*args))  # warm-up: first run pays for transfers
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _ring_hops(n_dev: int, schedule: str) -> int:
  """Hops each chunk makes along the busiest link direction in one trip round the ring."""
  return n_dev - 1 if schedule == "unidirectional" else math.ceil((n_dev - 1) / 2)


def model_row(row: dict, chip: chips_lib.Chip | None, devices_per_chip: int, schedule: str) -> dict:
  """Adds intensity, modelled times and the bound to a costed row (in place)."""
  flops, nbytes = row.get("flops"), row.get("bytes")
  if flops and nbytes:
    row["intensity"] = flops / nbytes
  # A loop body is counted once: never model from less than the useful work.
  if row.get("has_loop"):
    row["note"] = "cost analysis counts the loop body once; modelled from model FLOPs"
    flops = max(flops or 0, row["model_flops"])
  if row.get("measured_s"):
    row["tflops"] = (row.get("flops") or 0) / row["measured_s"] / 1e12
  if chip is None or not flops:
    return row
  peak = chip.bf16_flops / devices_per_chip
  hbm = chip.hbm_bw / devices_per_chip
  row["peak_flops"] = peak
  row["compute_s"] = flops / peak
  row["hbm_s"] = (nbytes or 0) / hbm
  compute_bound = row["compute_s"] >= row["hbm_s"]
  row["bound"] = chip.matmul_unit if compute_bound else "HBM"
  row["modelled_s"] = max(row["compute_s"], row["hbm_s"])
  if row["kind"] == "ring":
    n, b = row["devices"], row["batch"] // row["devices"]
    isz = jnp.dtype(row["dtype"]).itemsize
    both_ways = schedule == "bidirectional" and n > 2
    chunk = b * row["dim"] * isz + 4 * b  # the text chunk and its ids
    hops = _ring_hops(n, schedule)
    plan = row.get("ring_plan") if row["pass"] == "vag" else None
    if plan == "two trips":  # text chunks, then image chunks: no float32 on the wire
      hops *= 2
    elif plan == "one trip":
      # Each chunk's float32 dY travels with it all the way round and then home; both
      # directions carry half of every chunk's tiles.
      chunk = (chunk + 4 * b * row["dim"]) // (2 if both_ways else 1)
      hops = n
    elif row["pass"] == "vag":
      # The shared driver: each part of a chunk (half each way under the bidirectional
      # schedule) goes all the way round, its float32 dY with it from its second hop on,
      # then home: n - 1 transfers of its rows and n - 1 of its dY.
      chunk = (chunk + 4 * b * row["dim"]) // (2 if both_ways else 1)
      hops = n - 1
    per_hop = chunk / chip.link_bw
    if both_ways:  # both neighbours at once share the egress
      per_hop = max(per_hop, 2 * chunk / chip.egress_bw)
    row.update(
      wire_bytes_per_hop=chunk,
      wire_hops=hops,
      wire_s=hops * per_hop,
      wire_s_per_hop=per_hop,
      compute_s_per_block=row["compute_s"] / n,
    )
    if row["wire_s"] > row["modelled_s"]:
      row["bound"] = f"wire ({chip.wire})"
    row["modelled_s"] = max(row["modelled_s"], row["wire_s"])
  if row.get("measured_s"):
    row["frac_peak"] = (row.get("flops") or 0) / row["measured_s"] / peak
    row["mfu"] = row["model_flops"] / row["measured_s"] / peak
  return row


def _base_row(target, mode, impl, kind, pass_, shape, n_dev):
  per_device = shape.batch * shape.batch * shape.dim / n_dev
  return {
    "target": target,
    "mode": mode,
    "impl": impl,
    "kind": kind,
    "pass": pass_,
    "batch": shape.batch,
    "dim": shape.dim,
    "dtype": shape.dtype,
    "devices": n_dev,
    "model_flops": _MODEL_FLOPS_PER_B2D[pass_] * per_device,
  }


def _error(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


# ------------------------------------------------------------------------------------------
# The two modes


def compile_only_rows(shapes, generations, impls, ring, schedule, check_max, seed, log):
  """Compile every call for each TPU generation; model its time; check small ones on CPU."""
  # Compile-only libtpu needs no chip: let it load beside another process that holds it
  # (a test run, a second report) instead of failing on libtpu's lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  rows, checked = [], {}
  for gen in generations:
    chip = chips_lib.CHIPS[gen]
    try:
      topo = topologies.get_topology_desc(platform="tpu", topology_name=chip.topology)
    except Exception as e:  # noqa: BLE001 - e.g. no libtpu: say so in the report
      rows.append(
        {
          "target": f"{gen} (compile-only)",
          "mode": "compile-only",
          "impl": "-",
          "kind": "-",
          "pass": "-",
          "error": _error(e),
        }
      )
      continue
    devices, per_chip = chips_lib.one_device_per_chip(topo.devices)
    target = f"{gen} (compile-only)"
    chip_target = target_lib.Target("tpu", devices[0].device_kind)
    for shape in shapes:
      cases = [("block", 1), ("ring", min(ring, len(devices)))] if ring > 1 else [("block", 1)]
      for kind, n_dev in cases:
        if kind == "ring" and (n_dev < 2 or shape.batch % n_dev):
          continue
        mesh = Mesh(np.array(devices[:n_dev]), (AXIS,)) if kind == "ring" else None
        for impl in impls:
          if impl != "xla" and kind not in _KERNELS[impl][2]:
            continue
          for pass_ in PASSES:
            row = _base_row(target, "compile-only", impl, kind, pass_, shape, n_dev)
            log(
              f"compiling {gen} {impl} {kind} {pass_} B={shape.batch} D={shape.dim} {shape.dtype}"
            )
            try:
              f = loss_function(impl, kind, pass_, mesh=mesh, target=chip_target, schedule=schedule)
              compiled = (
                jax.jit(f).lower(*_abstract(shape, _shardings(kind, devices[0], mesh))).compile()
              )
              row.update(_cost(compiled))
              model_row(row, chip, per_chip, schedule)
              if kind == "block" and shape.batch <= check_max:
                key = (impl, pass_, shape)
                if key not in checked:
                  # Interpreted numerics on this host's CPU: the same code path, run once
                  # per call whatever the generation (the kernels' numerics do not depend
                  # on it in interpret mode).
                  args = _inputs(shape, seed)
                  g = jax.jit(loss_function(impl, kind, pass_, interpret=impl != "xla"))
                  checked[key] = max_rel_err(g(*args), pass_, args)
                row["rel_err"] = checked[key]
            except Exception as e:  # noqa: BLE001 - a failing call is a row, not a crash
              row["error"] = _error(e)
            rows.append(row)
  return rows


def measured_rows(shapes, impls, ring, schedule, iters, check_max, seed, interpret, log):
  """Compile, time and check every call on the local devices."""
  devices = jax.devices()
  chip = chips_lib.chip_for_device_kind(devices[0].device_kind)
  _, per_chip = chips_lib.one_device_per_chip(devices)
  target = f"{devices[0].device_kind} (measured)"
  rows = []
  for shape in shapes:
    n_ring = min(ring, len(devices))
    cases = [("block", 1)] + ([("ring", n_ring)] if n_ring > 1 else [])
    for kind, n_dev in cases:
      if kind == "ring" and shape.batch % n_dev:
        continue
      mesh = Mesh(np.array(devices[:n_dev]), (AXIS,)) if kind == "ring" else None
      for impl in impls:
        if impl != "xla" and kind not in _KERNELS[impl][2]:
          continue
        for pass_ in PASSES:
          row = _base_row(target, "measured", impl, kind, pass_, shape, n_dev)
          log(f"timing {impl} {kind} {pass_} B={shape.batch} D={shape.dim} {shape.dtype}")
          try:
            shardings = _shardings(kind, devices[0], mesh)
            args = tuple(jax.device_put(a, s) for a, s in zip(_inputs(shape, seed), shardings))
            f = loss_function(
              impl, kind, pass_, mesh=mesh, interpret=interpret and impl != "xla", schedule=schedule
            )
            compiled = jax.jit(f).lower(*_abstract(shape, shardings)).compile()
            row.update(_cost(compiled))
            row["measured_s"] = _time_call(compiled, args, iters)
            model_row(row, chip, per_chip, schedule)
            if shape.batch <= check_max:
              row["rel_err"] = max_rel_err(compiled(*args), pass_, args)
          except Exception as e:  # noqa: BLE001
            row["error"] = _error(e)
          rows.append(row)
  return rows


# ------------------------------------------------------------------------------------------
# Profiler trace


def capture_trace(
  trace_dir: str, shape: Shape, implementation: str | None, steps: int = 3, seed: int = 0
) -> str:
  """jax.profiler trace of the loss (value and grad) and of a small training step.

  The step is two linear towers (features -> D, L2-normalised) trained by AdamW through
  ``siglip_fast.sigmoid_loss``: enough to see the loss kernels next to the matmuls,
  optimizer update and host work of a real step. Open the trace with TensorBoard's profile
  plugin or Perfetto (``*.trace.json.gz``).
  """
  import optax

  import siglip_fast

  loss = functools.partial(siglip_fast.sigmoid_loss, implementation=implementation)
  x, y, _, log_t, bias = _inputs(shape, seed)
  vag = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

  feat = 2 * shape.dim
  kx, ky, kw, kv = jax.random.split(jax.random.key(seed), 4)
  dt = jnp.dtype(shape.dtype)
  batch = (
    jax.random.normal(kx, (shape.batch, feat), dt),
    jax.random.normal(ky, (shape.batch, feat), dt),
  )
  params = {
    "img": jax.random.normal(kw, (feat, shape.dim), jnp.float32) / math.sqrt(feat),
    "txt": jax.random.normal(kv, (feat, shape.dim), jnp.float32) / math.sqrt(feat),
    "log_t": jnp.float32(math.log(10.0)),
    "bias": jnp.float32(-10.0),
  }
  tx = optax.adamw(1e-3, b2=0.95)  # beta2 0.95: the paper's large-batch setting

  def tower(w, f):
    z = (f @ w.astype(dt)).astype(jnp.float32)
    return (z / jnp.linalg.norm(z, axis=-1, keepdims=True)).astype(dt)

  def train_loss(p, b):
    return loss(tower(p["img"], b[0]), tower(p["txt"], b[1]), p["log_t"], p["bias"])

  @jax.jit
  def train_step(p, opt, b):
    value, grads = jax.value_and_grad(train_loss)(p, b)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, value

  opt = tx.init(params)
  jax.block_until_ready(vag(x, y, log_t, bias))  # compile outside the trace
  jax.block_until_ready(train_step(params, opt, batch))
  with jax.profiler.trace(trace_dir):
    for i in range(steps):
      with jax.profiler.TraceAnnotation(f"siglip_loss_value_and_grad_{i}"):
        jax.block_until_ready(vag(x, y, log_t, bias))
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation("train", step_num=i):
        params, opt, value = train_step(params, opt, batch)
        jax.block_until_ready(value)
  return trace_dir


# ------------------------------------------------------------------------------------------
# Output


# ------------------------------------------------------------------------------------------
# Static schedule figures (benchmarks/tpu_profile.py)

# (impl, kind, pass) -> the tpu_profile kernel that call runs.
_STATIC_KERNELS = {
  ("pallas_tpu", "block", "fwd"): "fwd",
  ("pallas_tpu", "block", "vag"): "value_and_grad",
  ("pallas_tpu", "ring", "vag"): "ring_blocks",
  ("pallas_tpu_ring", "ring", "vag"): "ring_hop",
  ("pallas_tpu_ring", "ring", "fwd"): "ring_hop_fwd",
}


def default_static_profiles() -> list[pathlib.Path]:
  """The committed tpu_profile JSONs, oldest first (by name: tpu_profile_<date>*.json)."""
  return sorted(DEFAULT_RESULTS.glob("tpu_profile_*.json"))


def _shown(path) -> str:
  """A path as the report records it: relative to the repository when inside it (a clone
  elsewhere reads the same report)."""
  path = pathlib.Path(path).resolve()
  try:
    return str(path.relative_to(DEFAULT_RESULTS.parents[1]))
  except ValueError:
    return str(path)


def attach_static(rows: list[dict], profile_rows: list[dict]) -> list[dict]:
  """Adds ``static_s`` and ``static_unit`` to the rows a static profile row matches exactly
  (generation, kernel, B, D; the ring also its device count). Nothing is extrapolated: a row
  without an exact match, or whose match lacks a figure, gets none."""
  for row in rows:
    if row.get("error") or row.get("mode") != "compile-only":
      continue
    kernel = _STATIC_KERNELS.get((row.get("impl"), row.get("kind"), row.get("pass")))
    gen = row["target"].split(" ")[0]
    match = [
      p
      for p in profile_rows
      if not p.get("error")
      and p.get("generation") == gen
      and p.get("kernel") == kernel
      and p.get("dim") == row.get("dim")
      and p.get("batch") == row.get("batch")
      and (
        kernel is None
        or not kernel.startswith("ring")
        or p.get("ring_devices") == row.get("devices")
      )
    ]
    # The steady-state step where the profile has it (one-off regions skipped).
    us = lambda p: p.get("steady_static_us") or p.get("static_us")
    if not match or any(us(p) is None for p in match):
      continue
    # A kernel dumped once for several calls (the ring driver's blocks) counts each call.
    row["static_s"] = sum(us(p) * p.get("calls_per_row", 1) for p in match) * 1e-6
    row["static_unit"] = max(match, key=us)["bound"]
    row["static_ops"] = [p["op"] for p in match]
  return rows


def _fmt(v, scale=1.0, digits=3):
  if v is None:
    return "-"
  v = v * scale
  return f"{v:.{digits}g}"


_COLUMNS = (
  ("target", lambda r: r["target"]),
  ("impl", lambda r: r["impl"]),
  ("kind", lambda r: r["kind"] + (f"/{r['devices']}" if r.get("kind") == "ring" else "")),
  ("pass", lambda r: r["pass"]),
  ("B", lambda r: str(r.get("batch", "-"))),
  ("D", lambda r: str(r.get("dim", "-"))),
  ("dtype", lambda r: {"bfloat16": "bf16", "float32": "f32"}.get(r.get("dtype"), "-")),
  ("GFLOP", lambda r: _fmt(r.get("flops"), 1e-9)),
  ("model GFLOP", lambda r: _fmt(r.get("model_flops"), 1e-9)),
  ("MB", lambda r: _fmt(r.get("bytes"), 1e-6)),
  ("AI", lambda r: _fmt(r.get("intensity"), 1, 4)),
  ("bound", lambda r: r.get("bound", "-")),
  ("modelled ms", lambda r: _fmt(r.get("modelled_s"), 1e3)),
  ("static ms", lambda r: _fmt(r.get("static_s"), 1e3)),
  ("unit", lambda r: r.get("static_unit", "-")),
  ("measured ms", lambda r: _fmt(r.get("measured_s"), 1e3)),
  ("TFLOP/s", lambda r: _fmt(r.get("tflops"))),
  ("% peak", lambda r: _fmt(r.get("frac_peak"), 100)),
  ("MFU %", lambda r: _fmt(r.get("mfu"), 100)),
  ("temp MiB", lambda r: _fmt(r.get("temp_bytes"), 2**-20)),
  ("VMEM MiB", lambda r: _fmt(r.get("vmem_limit_bytes"), 2**-20)),
  ("wire ms", lambda r: _fmt(r.get("wire_s"), 1e3)),
  ("rel err", lambda r: _fmt(r.get("rel_err"), 1, 2)),
)


def format_table(rows: list[dict]) -> str:
  """Aligned text table; columns with no value in any row (e.g. measured ones in a
  compile-only report) are left out."""
  ok = [r for r in rows if not r.get("error")]
  columns = [
    (i, name, get)
    for i, (name, get) in enumerate(_COLUMNS)
    if i < 4 or any(get(r) != "-" for r in ok)
  ]
  cells = [[name for _, name, _ in columns]]
  for r in rows:
    cells.append([get(r) if not r.get("error") or i < 4 else "" for i, _, get in columns])
  widths = [max(len(c[k]) for c in cells) for k in range(len(columns))]
  lines = []
  for k, (c, r) in enumerate(zip(cells, [None] + rows)):
    line = "  ".join(
      s.rjust(w) if i >= 4 else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths))
    )
    if r is not None and r.get("error"):
      line = line.rstrip() + "  ERROR " + r["error"]
    elif r is not None and r.get("note"):
      line += "  (" + r["note"] + ")"
    lines.append(line)
    if k == 0:
      lines.append("  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _header(mode: str) -> str:
  if mode == "compile-only":
    return (
      "COMPILE-ONLY report: no TPU here. Each call was compiled for real TPU generations "
      "on compile-only topologies;\ntimes are MODELLED = max(FLOPs/peak, bytes/HBM BW, "
      "wire bytes/link BW) from benchmarks/chips.py: lower bounds, not measurements.\n"
      "rel err: the same call run on CPU (kernels in interpret mode) against a float64 "
      "oracle.\nstatic ms / unit (Pallas rows a tpu_profile JSON covers): loop-body "
      "bundles x grid steps at the chip's clock from libtpu's VLIW schedule, and its "
      "busiest unit;\n"
      "STATIC, not measured: no stalls on DMA waits (HBM, ICI) or semaphores, no "
      "throttling, every bundle one cycle."
    )
  return (
    "MEASURED report: median wall time of the compiled call on this device; % peak from "
    "cost-analysis FLOPs, MFU from model FLOPs (2 B^2 D fwd, 6 B^2 D vag)."
  )


def build_report(args) -> dict:
  backend = jax.default_backend()
  mode = args.mode
  if mode == "auto":
    mode = "measured" if backend in ("tpu", "gpu") else "compile-only"
  shapes = parse_shapes(args.shapes)
  log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else (lambda s: None)
  kernel_backend = "tpu" if mode == "compile-only" else backend
  impls = available_implementations(kernel_backend)
  if args.implementations:
    wanted = [s.strip() for s in args.implementations.split(",") if s.strip()]
    unknown = [w for w in wanted if w != "xla" and w not in _KERNELS]
    if unknown:
      raise ValueError(f"--implementations: unknown {unknown}; known: xla, {', '.join(_KERNELS)}")
    impls = [w for w in wanted if w in impls or (args.interpret and w != "xla")]
  static = []
  if mode == "compile-only":
    generations = [g.strip() for g in args.generations.split(",") if g.strip()]
    bad = [g for g in generations if g not in chips_lib.TPU_GENERATIONS]
    if bad:
      raise ValueError(
        f"--generations: unknown {bad}; known: {', '.join(chips_lib.TPU_GENERATIONS)}"
      )
    rows = compile_only_rows(
      shapes, generations, impls, args.ring, args.schedule, args.check_max_batch, args.seed, log
    )
    static = (
      default_static_profiles()
      if args.static_profile is None
      else []
      if args.static_profile == "-"
      else args.static_profile.split(",")
    )
    if static:
      attach_static(rows, load_static_profiles(static))
  else:
    rows = measured_rows(
      shapes,
      impls,
      args.ring,
      args.schedule,
      args.iters,
      args.check_max_batch,
      args.seed,
      args.interpret,
      log,
    )
  used = {r["target"].split(" ")[0] for r in rows} if mode == "compile-only" else set()
  return {
    "mode": mode,
    "backend": backend,
    "jax_version": jax.__version__,
    "devices": [d.device_kind for d in jax.devices()],
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "schedule": args.schedule,
    "implementations": impls,
    "chips": {
      k: dataclasses.asdict(c)
      for k, c in chips_lib.CHIPS.items()
      if k in used or mode == "measured"
    },
    "static_profiles": [_shown(p) for p in static],
    "rows": rows,
  }


def main(argv=None) -> int:
  summary, _, details = __doc__.partition("\n\n")
  p = argparse.ArgumentParser(
    description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--shapes",
    default=DEFAULT_SHAPES,
    help='"B,D[,dtype];..." global batch, feature dim, float32|bfloat16 '
    f"(default {DEFAULT_SHAPES!r})",
  )
  p.add_argument(
    "--mode",
    choices=("auto", "measured", "compile-only"),
    default="auto",
    help="auto: measured on TPU/GPU, compile-only elsewhere",
  )
  p.add_argument(
    "--implementations",
    default="",
    help="comma list (xla, pallas_tpu, pallas_gpu, pallas_tpu_ring); "
    "default: all available for the target",
  )
  p.add_argument(
    "--generations",
    default=",".join(chips_lib.TPU_GENERATIONS),
    help="compile-only: TPU generations to compile for",
  )
  p.add_argument(
    "--ring", type=int, default=4, help="devices in the ring rows (0 or 1: no ring rows; default 4)"
  )
  p.add_argument("--schedule", choices=ring_lib.SCHEDULES, default="bidirectional")
  p.add_argument("--iters", type=int, default=20, help="measured: timed runs (median)")
  p.add_argument(
    "--check-max-batch",
    type=int,
    default=1024,
    help="check numerics against the float64 oracle up to this batch",
  )
  p.add_argument("--seed", type=int, default=2027, help="seed of the random inputs")
  p.add_argument(
    "--interpret",
    action="store_true",
    help="measured mode: run kernels in interpret mode (e.g. on CPU)",
  )
  p.add_argument(
    "--static-profile",
    default=None,
    metavar="PATH",
    help="compile-only: benchmarks.tpu_profile JSONs (comma list) whose static "
    "schedule figures go beside the roofline (default: every "
    "benchmarks/results/tpu_profile_*.json; '-' for none)",
  )
  p.add_argument(
    "--json",
    default=None,
    help="where to write the JSON report (default benchmarks/results/"
    "utilisation-<mode>-<backend>.json; '-' for none)",
  )
  p.add_argument(
    "--trace",
    default=None,
    metavar="DIR",
    help="also capture a jax.profiler trace of the loss and a training step",
  )
  p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
  args = p.parse_args(argv)

  report = build_report(args)
  print(_header(report["mode"]))
  print(format_table(report["rows"]))
  if args.trace:
    shape = parse_shapes(args.shapes)[0]
    impl = None if report["backend"] in ("tpu", "gpu") else "xla"
    capture_trace(args.trace, shape, impl)
    report["trace_dir"] = os.path.abspath(args.trace)
    print(f"profiler trace of the loss and a training step: {report['trace_dir']}")
  out = args.json
  if out is None:
    out = DEFAULT_RESULTS / f"utilisation-{report['mode']}-{report['backend']}.json"
  if out != "-":
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"JSON: {out}")
  return 1 if any(r.get("error") for r in report["rows"]) else 0


if __name__ == "__main__":
  sys.exit(main())

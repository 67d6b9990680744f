"""Time the fused SigLIP loss against XLA, side by side, on whatever backend is present.

    python -m benchmarks.bench_loss                                   # the full GPU run
    python -m benchmarks.bench_loss --sizes 256x128 --impls xla,chunked   # CPU smoke, seconds

For every (B, D) in ``--sizes`` (bfloat16 by default; run in the order given, smallest first
by default), each implementation is compiled once
(AOT) and timed, forward ("fwd": the loss) and value-and-grad ("vg": loss and the gradients
w.r.t. both embeddings, log_t and bias):

  pallas_gpu / pallas_tpu  the fused kernel of this backend, via ``siglip_fast.sigmoid_loss``
                           (skipped where it cannot run; ``--interpret`` runs it on CPU)
  xla                      the dense loss, materialising B x B logits (``sigmoid_loss_dense``);
                           skipped where its temporaries would not fit the device
  chunked                  lax.map over 1024-row chunks under jax.checkpoint
  matmul                   the bf16 B x D @ D x B matmul with float32 output, same run

Reported per row: median time over ``--repeats`` samples after ``--warmup`` calls (each
sample times back-to-back calls on rotating input sets until ``--min-sample-ms``, then
blocks), achieved TFLOP/s on the useful FLOPs (2 B^2 D forward, 6 B^2 D value-and-grad),
time over the matmul (forward) or over three matmuls (the 6 B^2 D floor, value-and-grad),
speed-up over XLA dense, and compiled temp memory (``memory_analysis().temp_size_in_bytes``).

Also, on a GPU: ``--big`` (default 1048576x768) runs the kernel's value-and-grad where XLA
dense cannot, and ``--tune`` (default 32768x1152) times a few block-size variants of the
kernel, labelled as such. ``--budget-s`` stops starting new work past that many seconds;
results are written after every row to benchmarks/results/ (or ``--out-dir``), named with
backend, device kind (as jax reports it: an H100 or an H200), jax version and date.

Goals (``summary``), each a ratio of two timings or sizes from this same run, never a lone
time: value-and-grad <= 1.25x the 6 B^2 D floor (three times the same-shape bf16 matmul
measured here, i.e. 6 B^2 D at the measured matmul rate); forward <= 1.1x one such matmul;
compiled temp memory of the value-and-grad >= 50x below XLA dense's; and the B = 1,048,576,
D = 768 value-and-grad runs (finite). Checked at the largest size measured (32768 x 1152 in
the full run), listed per size in the JSON. On a CPU (interpret mode) the ratios say nothing
about performance: the script says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

from siglip_fast import loss as api
from siglip_fast.reference import dense

# Smallest first: compiles and the smaller rows land before any budget cut.
DEFAULT_SIZES = (
  "4096x768",
  "4096x1152",
  "8192x768",
  "8192x1152",
  "16384x768",
  "16384x1152",
  "32768x768",
  "32768x1152",
)
TARGET = (32768, 1152)
GOAL_VG_FLOOR, GOAL_FWD_MATMUL, GOAL_TEMP = 1.25, 1.1, 50
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
LOG_T, BIAS = math.log(10.0), -10.0


# --- the implementations ------------------------------------------------------------------


def _kernel_for(backend):
  """The registry's default kernel for a backend, or None where it has only "xla"."""
  name = api.default_implementation(backend)
  return None if name == "xla" else name


def chunked_loss(x, y, log_t, bias, chunk=1024):
  """Mean loss by lax.map over row chunks, each under jax.checkpoint (the usual memory fix
  for the dense loss: XLA's remat baseline)."""
  batch, dim = x.shape
  chunk = math.gcd(batch, chunk)
  ids = jnp.arange(batch, dtype=jnp.int32)

  @jax.checkpoint
  def one(args):
    xc, ic = args
    return dense.block_loss_sum(xc, y, ic, ids, log_t, bias)

  parts = lax.map(one, (x.reshape(-1, chunk, dim), ids.reshape(-1, chunk)))
  return jnp.sum(parts) / batch


def matmul(x, y):
  return jnp.einsum("nd,md->nm", x, y, preferred_element_type=jnp.float32)


def loss_fn(impl, interpret=False, block_sizes=None):
  if impl == "xla":
    return dense.sigmoid_loss_dense
  if impl == "chunked":
    return chunked_loss
  kw = dict(implementation=impl, interpret=interpret)
  if block_sizes is not None:
    kw["block_sizes"] = block_sizes
  return lambda x, y, lt, b: api.sigmoid_loss(x, y, lt, b, **kw)


def vg(fn):
  return jax.value_and_grad(fn, argnums=(0, 1, 2, 3))


# --- timing -------------------------------------------------------------------------------


def make_inputs(batch, dim, dtype, n_sets, seed=0):
  """``n_sets`` fresh (x, y, log_t, bias) sets of L2-normalised rows, on the device."""
  sets = []
  for k in range(n_sets):
    kx, ky = jax.random.split(jax.random.key(seed + k))
    x = jax.random.normal(kx, (batch, dim), jnp.float32)
    y = jax.random.normal(ky, (batch, dim), jnp.float32)
    x = (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)
    y = (y / jnp.linalg.norm(y, axis=-1, keepdims=True)).astype(dtype)
    sets.append((x, y, jnp.float32(LOG_T), jnp.float32(BIAS)))
  jax.block_until_ready(sets)
  return sets


def compile_fn(fn, args):
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
  return compiled, temp, time.perf_counter() - t0


def time_compiled(compiled, arg_sets, warmup, repeats, min_sample_ms):
  """Median seconds per call; also the first output (to check it is finite)."""
  t0 = time.perf_counter()
  first = out = compiled(*arg_sets[0])
  jax.block_until_ready(out)
  single = time.perf_counter() - t0
  for k in range(warmup):  # the last warm-up call sizes the samples
    t0 = time.perf_counter()
    out = compiled(*arg_sets[(k + 1) % len(arg_sets)])
    jax.block_until_ready(out)
    single = time.perf_counter() - t0
  inner = max(1, int(math.ceil(min_sample_ms / 1e3 / max(single, 1e-7))))
  samples, k = [], 0
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = compiled(*arg_sets[k % len(arg_sets)])
      k += 1
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / inner)
  return statistics.median(samples), first, inner


def finite(out) -> bool:
  return all(
    bool(jnp.all(jnp.isfinite(leaf)))
    for leaf in jax.tree.leaves(out)
    if jnp.issubdtype(leaf.dtype, jnp.floating)
  )


def device_bytes():
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 - not every backend has memory stats
    stats = {}
  return stats.get("bytes_limit")


# --- the run ------------------------------------------------------------------------------


class Runner:
  """Runs entries, keeps the rows, writes the JSON after each, and watches the budget."""

  def __init__(self, args):
    self.args = args
    self.start = time.perf_counter()
    self.rows = []
    self.skipped = []
    dev = jax.devices()[0]
    self.backend = jax.default_backend()
    self.card = getattr(dev, "device_kind", self.backend)
    self.meta = dict(
      backend=self.backend,
      device_kind=self.card,
      n_devices=jax.device_count(),
      jax=jax.__version__,
      jaxlib=_jaxlib_version(),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      argv=sys.argv[1:],
      dtype=args.dtype,
      interpret=bool(args.interpret),
      note=(
        "Times are medians of samples of back-to-back calls on rotating inputs, after "
        "warm-up. TFLOP/s count useful FLOPs: 2 B^2 D forward, 6 B^2 D value-and-grad. "
        "vs_matmul: forward time / one B x D @ D x B bf16 matmul (f32 out); value-and-"
        "grad time / three such matmuls (the 6 B^2 D floor)."
      ),
    )
    safe = re.sub(r"[^A-Za-z0-9]+", "-", str(self.card)).strip("-").lower()
    day = datetime.date.today().isoformat()
    # Results are written only where asked: a smoke run leaves the tree alone.
    self.path = None
    if args.out_dir:
      out_dir = pathlib.Path(args.out_dir)
      out_dir.mkdir(parents=True, exist_ok=True)
      self.path = out_dir / f"bench_{self.backend}_{safe}_jax{jax.__version__}_{day}.json"

  def elapsed(self):
    return time.perf_counter() - self.start

  def over_budget(self, what):
    if self.args.budget_s and self.elapsed() > self.args.budget_s:
      self.skipped.append(what)
      print(
        f"  [budget] {self.elapsed():.0f}s > {self.args.budget_s}s: skipping {what}", flush=True
      )
      return True
    return False

  def write(self):
    payload = dict(
      meta=self.meta, rows=self.rows, skipped=self.skipped, elapsed_s=round(self.elapsed(), 1)
    )
    if self.path is not None:
      self.path.write_text(json.dumps(payload, indent=1, default=str))

  def add(self, row):
    self.rows.append(row)
    self.write()
    ms = row.get("ms")
    temp = row.get("temp_bytes")
    print(
      f"  {row['impl']:<22} {row['mode']:<3} B={row['B']:<8} D={row['D']:<5} "
      + (
        f"{ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s"
        if ms is not None
        else f"{'-':>9}    {'-':>7}        "
      )
      + (f"  temp {temp / 2**20:9.1f} MiB" if temp is not None else "")
      + (f"  [{row['error']}]" if row.get("error") else ""),
      flush=True,
    )


def _jaxlib_version():
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top

    return jaxlib.__version__
  except Exception:  # noqa: BLE001
    return None


def run_entry(
  runner, impl, mode, batch, dim, fn, arg_sets, flops, extra=None, repeats=None, warmup=None
):
  args = runner.args
  row = dict(impl=impl, mode=mode, B=batch, D=dim, dtype=args.dtype, flops=flops, **(extra or {}))
  try:
    compiled, temp, compile_s = compile_fn(fn, arg_sets[0])
    row.update(temp_bytes=temp, compile_s=round(compile_s, 2))
    sec, first, inner = time_compiled(
      compiled,
      arg_sets,
      args.warmup if warmup is None else warmup,
      repeats or args.repeats,
      args.min_sample_ms,
    )
    row.update(
      ms=sec * 1e3, tflops=flops / sec / 1e12, calls_per_sample=inner, finite=finite(first)
    )
    if mode in ("fwd", "vg"):
      row["loss"] = float(first if mode == "fwd" else first[0])
    del compiled
  except Exception as e:  # noqa: BLE001 - record and go on: one failure must not end the run
    row.update(ms=None, tflops=None, error=f"{type(e).__name__}: {str(e)[:300]}")
  runner.add(row)
  return row


def bench_size(runner, batch, dim, impls):
  args = runner.args
  dtype = jnp.dtype(args.dtype)
  what = f"{batch}x{dim}"
  if runner.over_budget(what):
    return
  print(f"B={batch} D={dim} {dtype.name}", flush=True)
  arg_sets = make_inputs(batch, dim, dtype, args.input_sets, seed=batch + dim)
  fwd_flops, vg_flops = 2 * batch * batch * dim, 6 * batch * batch * dim
  limit = device_bytes()
  rows = {}
  for impl in impls:
    if runner.over_budget(f"{what} {impl}"):
      break
    if impl == "matmul":
      rows["matmul"] = run_entry(
        runner, "matmul", "mm", batch, dim, matmul, [a[:2] for a in arg_sets], fwd_flops
      )
      continue
    for mode, flops in (("fwd", fwd_flops), ("vg", vg_flops)):
      # XLA dense keeps ~2 (forward) or ~3 (value-and-grad) B x B float32 arrays.
      need = (2 if mode == "fwd" else 3) * 4 * batch * batch
      if impl == "xla" and limit and need > 0.8 * limit:
        runner.add(
          dict(
            impl=impl,
            mode=mode,
            B=batch,
            D=dim,
            dtype=args.dtype,
            flops=flops,
            ms=None,
            tflops=None,
            error=f"skipped: needs ~{need / 2**30:.0f} GiB",
          )
        )
        continue
      fn = loss_fn(impl, interpret=args.interpret)
      extra = {}
      if impl == "pallas_gpu":
        from siglip_fast.kernels import gpu  # pylint: disable=g-import-not-at-top

        extra["block_sizes"] = dataclasses.asdict(gpu.default_block_sizes(batch, batch, dim, dtype))
      rows[(impl, mode)] = run_entry(
        runner, impl, mode, batch, dim, fn if mode == "fwd" else vg(fn), arg_sets, flops, extra
      )
  _derive(runner, batch, dim)
  summary(runner, quiet=True)


def _derive(runner, batch, dim):
  """Fill in vs_matmul and speedup_vs_xla for this size's rows."""
  rows = [r for r in runner.rows if r["B"] == batch and r["D"] == dim]
  mm = next((r["ms"] for r in rows if r["impl"] == "matmul" and r.get("ms")), None)
  xla = {r["mode"]: r["ms"] for r in rows if r["impl"] == "xla" and r.get("ms")}
  for r in rows:
    if not r.get("ms") or r["impl"] == "matmul":
      continue
    if mm:
      r["vs_matmul"] = r["ms"] / (mm if r["mode"] == "fwd" else 3 * mm)
    if r["mode"] in xla:
      r["speedup_vs_xla"] = xla[r["mode"]] / r["ms"]
  runner.write()


def bench_big(runner, batch, dim, kernel):
  """The kernel's value-and-grad at a batch XLA dense cannot hold (B^2 floats)."""
  if runner.over_budget(f"big {batch}x{dim}"):
    return
  print(
    f"big: B={batch} D={dim} value-and-grad, {kernel} only "
    f"(XLA dense would need {12 * batch * batch / 2**40:.0f} TiB)",
    flush=True,
  )
  arg_sets = make_inputs(batch, dim, jnp.dtype(runner.args.dtype), 1, seed=7)
  run_entry(
    runner,
    kernel,
    "vg",
    batch,
    dim,
    vg(loss_fn(kernel, runner.args.interpret)),
    arg_sets,
    6 * batch * batch * dim,
    dict(big=True),
    repeats=runner.args.big_repeats,
    warmup=0,
  )  # the first call is the warm-up: each call is seconds
  del arg_sets


def tune_variants(batch, dim, dtype):
  """Block-size variants around the defaults (bf16, Hopper), each of which compiles for
  sm_90a with no spills (``benchmarks/gpu_ptxas.py``: Triton + ptxas on the Pallas-emitted
  Triton IR, no GPU); what registers and tile shape trade (programs per SM, operand bytes
  per FLOP from L2) only the device can tell."""
  from siglip_fast.kernels import gpu  # pylint: disable=g-import-not-at-top

  base = gpu.default_block_sizes(batch, batch, dim, dtype)

  def r(bs, **kw):  # keep grad_chunk a multiple of the value-and-grad tile's columns
    cols = kw.get("grad_block_cols") or bs.grad_block_cols or kw.get("block_cols", bs.block_cols)
    kw["grad_chunk"] = -(-kw.get("grad_chunk", bs.grad_chunk) // cols) * cols
    return dataclasses.replace(bs, **kw)

  fwd = [
    base,
    r(base, num_stages=4),  # 164 registers, 128 KiB
    r(base, block_rows=64, block_cols=256),  # 156 registers, 120 KiB
    r(base, block_rows=64, num_warps=4),  # 153 registers, 72 KiB
    r(base, fwd_group=8),
  ]
  vgs = [
    base,
    r(base, grad_block_rows=64, grad_num_warps=8),  # 128 registers: 2 per SM
    r(base, grad_block_rows=64, grad_block_cols=256, grad_num_warps=8),  # 237
    r(base, block_k=32, num_stages=4, grad_num_warps=8),  # 209 registers, 64 KiB
    r(base, grad_chunk=2 * base.grad_chunk),
  ]  # 2x the G slab, half the steps
  return fwd, vgs


def bench_tune(runner, batch, dim):
  if runner.over_budget(f"tune {batch}x{dim}"):
    return
  dtype = jnp.dtype(runner.args.dtype)
  print(f"tune: B={batch} D={dim} block-size variants of pallas_gpu", flush=True)
  arg_sets = make_inputs(batch, dim, dtype, runner.args.input_sets, seed=batch + dim)
  fwd, vgs = tune_variants(batch, dim, dtype)
  ref = {}
  for mode, variants, flops in (
    ("fwd", fwd, 2 * batch * batch * dim),
    ("vg", vgs, 6 * batch * batch * dim),
  ):
    for k, bs in enumerate(variants):
      if runner.over_budget(f"tune {mode} {bs}"):
        return
      fn = loss_fn("pallas_gpu", runner.args.interpret, block_sizes=bs)
      row = run_entry(
        runner,
        f"pallas_gpu[tune{k}]",
        mode,
        batch,
        dim,
        fn if mode == "fwd" else vg(fn),
        arg_sets,
        flops,
        dict(tune=True, block_sizes=dataclasses.asdict(bs)),
      )
      if row.get("loss") is not None:
        ref.setdefault(mode, row["loss"])
        row["loss_rel_diff_vs_tune0"] = abs(row["loss"] - ref[mode]) / abs(ref[mode])
  _derive(runner, batch, dim)
  runner.write()


def goals_at(runner, batch, dim):
  """The goals at one (B, D), from this run's rows: [dict(goal, ok, ratio, detail)]."""
  kernel = _kernel_for(runner.backend) or ("pallas_gpu" if runner.args.interpret else None)
  get = lambda impl, mode: next(
    (
      r
      for r in runner.rows
      if r["impl"] == impl
      and r["mode"] == mode
      and r["B"] == batch
      and r["D"] == dim
      and r.get("ms")
      and not r.get("tune")
    ),
    None,
  )
  k_f, k_v = get(kernel, "fwd"), get(kernel, "vg")
  x_v, mm = get("xla", "vg"), get("matmul", "mm")
  out = []

  def goal(name, ok, ratio, detail):
    out.append(
      dict(
        goal=name,
        ok=ok,
        ratio=None if ratio is None else round(ratio, 4),
        detail=detail,
        B=batch,
        D=dim,
      )
    )

  if k_v and mm:
    ratio = k_v["ms"] / (3 * mm["ms"])
    goal(
      f"vg <= {GOAL_VG_FLOOR}x the 6B^2D floor (3 matmuls, same run)",
      ratio <= GOAL_VG_FLOOR,
      ratio,
      f"{k_v['ms']:.3f} ms / (3 x {mm['ms']:.3f} ms) = {ratio:.2f}x",
    )
  if k_f and mm:
    ratio = k_f["ms"] / mm["ms"]
    goal(
      f"fwd <= {GOAL_FWD_MATMUL}x one bf16 matmul (same run)",
      ratio <= GOAL_FWD_MATMUL,
      ratio,
      f"{k_f['ms']:.3f} / {mm['ms']:.3f} ms = {ratio:.2f}x",
    )
  if k_v and x_v and k_v.get("temp_bytes") and x_v.get("temp_bytes"):
    ratio = x_v["temp_bytes"] / k_v["temp_bytes"]
    goal(
      f"vg temp >= {GOAL_TEMP}x below XLA dense",
      ratio >= GOAL_TEMP,
      ratio,
      f"{x_v['temp_bytes'] / 2**20:.1f} / {k_v['temp_bytes'] / 2**20:.1f} MiB = {ratio:.0f}x",
    )
  if k_v and x_v:
    ratio = x_v["ms"] / k_v["ms"]
    goal(
      "vg speed-up over XLA dense (informational)",
      None,
      ratio,
      f"{x_v['ms']:.3f} / {k_v['ms']:.3f} ms = {ratio:.2f}x",
    )
  return out


def summary(runner, quiet=False):
  """Goals per measured size; the headline at TARGET, else the largest size measured."""
  sizes = sorted(
    {(r["B"], r["D"]) for r in runner.rows if not r.get("big") and not r.get("tune")},
    key=lambda s: (s[0] * s[1], s),
  )
  per_size = {f"{b}x{d}": goals_at(runner, b, d) for b, d in sizes}
  with_goals = [s for s in sizes if per_size[f"{s[0]}x{s[1]}"]]
  head = TARGET if TARGET in with_goals else (with_goals[-1] if with_goals else None)
  checks = list(per_size[f"{head[0]}x{head[1]}"]) if head else []
  big = [r for r in runner.rows if r.get("big")]
  if big:
    r = big[0]
    checks.append(
      dict(
        goal=f"vg runs at B={r['B']}, D={r['D']}",
        ok=bool(r.get("ms")) and bool(r.get("finite")),
        ratio=None,
        B=r["B"],
        D=r["D"],
        detail=f"{r.get('ms') or 0:.0f} ms, finite={r.get('finite')}"
        + (f" [{r['error']}]" if r.get("error") else ""),
      )
    )
  tuned = [r for r in runner.rows if r.get("tune") and r.get("ms")]
  for m in ("fwd", "vg"):
    best = min((r for r in tuned if r["mode"] == m), key=lambda r: r["ms"], default=None)
    if best:
      checks.append(
        dict(
          goal=f"best tuned {m} (informational)",
          ok=None,
          ratio=None,
          B=best["B"],
          D=best["D"],
          detail=f"{best['impl']} vs_matmul "
          f"{best.get('vs_matmul', float('nan')):.2f}, {best['block_sizes']}",
        )
      )
  runner.meta["goals"] = checks
  runner.meta["goals_per_size"] = per_size
  runner.write()
  if quiet or not checks:
    return
  where = f"B={head[0]}, D={head[1]}" if head else "-"
  print(f"\nGoals at {where} ({runner.card}, jax {jax.__version__}):")
  if runner.backend != "gpu":
    print(
      f"  (backend {runner.backend!r}, interpret mode: these ratios check the plumbing; "
      "they are not performance figures)"
    )
  for c in checks:
    flag = {True: "PASS", False: "MISS", None: "info"}[c["ok"]]
    print(f"  [{flag}] {c['goal']}: {c['detail']}")
  for key, gs in per_size.items():
    if key != f"{head[0]}x{head[1]}" and gs:
      print(
        f"  {key}: "
        + "; ".join(
          f"{g['goal'].split(' (')[0].split(' <=')[0].split(' >=')[0]} {g['ratio']:.2f}"
          for g in gs
          if g["ratio"] is not None
        )
      )


def print_table(runner):
  """Compact: the device tool returns only the tail of the output."""
  widths = dict(impl=18, mode=4, B=8, D=5, ms=10, tflops=7, vs_mm=6, vs_xla=6, temp_MiB=9)
  print("\n" + " ".join(f"{c:>{w}}" for c, w in widths.items()))
  for r in runner.rows:
    vals = [r["impl"], r["mode"], r["B"], r["D"]]
    for k, fmt in (
      ("ms", "{:.3f}"),
      ("tflops", "{:.1f}"),
      ("vs_matmul", "{:.2f}"),
      ("speedup_vs_xla", "{:.2f}"),
      ("temp_bytes", "{:.1f}"),
    ):
      v = r.get(k)
      vals.append("-" if v is None else fmt.format(v / 2**20 if k == "temp_bytes" else v))
    print(" ".join(f"{str(v):>{w}}" for v, w in zip(vals, widths.values())))


def parse_size(text):
  try:
    b, d = text.lower().split("x")
    return int(b), int(d)
  except ValueError:
    raise argparse.ArgumentTypeError(f"size must look like 4096x768, got {text!r}") from None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--sizes", default=",".join(DEFAULT_SIZES), help="comma-separated BxD, run in this order"
  )
  p.add_argument(
    "--impls",
    default=None,
    help="comma-separated of: kernel (this backend's), pallas_gpu, pallas_tpu, "
    "xla, chunked, matmul (default: all that can run here)",
  )
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument(
    "--min-sample-ms",
    type=float,
    default=20.0,
    help="each sample runs calls back to back until about this long",
  )
  p.add_argument("--input-sets", type=int, default=3, help="input sets rotated between calls")
  p.add_argument(
    "--big",
    default=None,
    help="BxD of the kernel-only value-and-grad run (default 1048576x768 on GPU; 'none' to skip)",
  )
  p.add_argument("--big-repeats", type=int, default=1)
  p.add_argument(
    "--tune",
    default=None,
    help="BxD for the block-size sweep (GPU; default 32768x1152; 'none' to skip)",
  )
  p.add_argument(
    "--budget-s",
    type=float,
    default=0,
    help="start no new work after this many seconds (0: no limit)",
  )
  p.add_argument(
    "--interpret",
    action="store_true",
    help="run the Pallas kernel in interpret mode (CPU smoke tests only)",
  )
  p.add_argument(
    "--out-dir",
    default=None,
    help="write the JSON here (e.g. benchmarks/results/); nothing is written without it",
  )
  args = p.parse_args(argv)

  backend = jax.default_backend()
  kernel = _kernel_for(backend)
  if args.interpret and kernel is None:
    kernel = "pallas_gpu"
  if args.impls is None:
    impls = ["matmul"] + ([kernel] if kernel else []) + ["xla", "chunked"]
  else:
    impls = [kernel if i == "kernel" else i for i in args.impls.split(",") if i]
  for impl in impls:
    if impl not in ("pallas_gpu", "pallas_tpu", "xla", "chunked", "matmul", None):
      p.error(f"unknown implementation {impl!r}")
  runnable = []
  for impl in impls:
    if impl in ("pallas_gpu", "pallas_tpu"):
      try:
        api.block_ops(impl, interpret=args.interpret)
      except ValueError as e:
        print(f"skipping {impl}: {e}")
        continue
    if impl:
      runnable.append(impl)
  sizes = [parse_size(s) for s in args.sizes.split(",") if s]
  on_gpu = backend == "gpu" and "pallas_gpu" in runnable
  big = args.big if args.big is not None else ("1048576x768" if on_gpu else "none")
  tune = args.tune if args.tune is not None else ("32768x1152" if on_gpu else "none")

  runner = Runner(args)
  print(
    f"{runner.backend} {runner.card} jax {jax.__version__}: {runnable}; writing {runner.path}",
    flush=True,
  )
  # Sizes in the order given (smallest first by default), then the big batch, then the
  # sweep: a budget cut drops the least important work. The goals are rewritten into the
  # JSON after every size.
  for size in sizes:
    bench_size(runner, *size, runnable)
  if big != "none" and kernel in runnable:
    bench_big(runner, *parse_size(big), kernel)
    summary(runner, quiet=True)
  if tune != "none" and "pallas_gpu" in runnable:
    bench_tune(runner, *parse_size(tune))
  print_table(runner)
  summary(runner)
  runner.write()
  print(
    f"\n{f'wrote {runner.path}' if runner.path else 'no --out-dir: nothing written'} "
    f"({runner.elapsed():.0f} s)"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())

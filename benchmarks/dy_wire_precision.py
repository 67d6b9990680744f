"""What a bfloat16 dY on the ring's wire would cost in accuracy (CPU, NumPy; no TPU).

In the ring's value-and-grad a text chunk's dY is summed along the ring: each device adds its
block's partial and sends the running sum on; the chunk's home adds its own block's last.
Today that running sum travels in float32. Sent in bfloat16 it would be rounded once per
hop, halving the dY bytes on the wire (the shared driver on v5p is wire bound at b = 4096:
docs/PERFORMANCE.md section 5). This replays one chunk's sum in float64 (the oracle), with a
float32 wire and with a bfloat16 wire, from bf16 embeddings of matched pairs with hard
negatives, and reports each against the oracle as the caller gets it for bf16 inputs
(rounded to bfloat16 at the end, a rounding no wire avoids).

  python -m benchmarks.dy_wire_precision [--json OUT.json]
"""

from __future__ import annotations

import argparse
import datetime
import json

import jax.numpy as jnp
import numpy as np

# (t, bias): SigLIP's initialisation and two trained-like regimes (sharper, hard negatives).
REGIMES = ((10.0, -10.0), (30.0, -5.0), (100.0, -12.0))
DEVICES = (4, 8, 16, 32, 64)


def _round(a, dtype):
  return np.asarray(a, dtype).astype(np.float64)


def _bf16(a):
  return _round(a, jnp.bfloat16)


def chunk_dy(n, b, dim, t, bias, schedule, rng) -> dict:
  """Errors of chunk 0's dY (norm-relative and largest element over the largest |dY|)."""
  x = rng.normal(size=(n * b, dim))
  y = x + 0.3 * rng.normal(size=x.shape)  # each text near its image: hard negatives nearby
  x = _bf16(x / np.linalg.norm(x, axis=1, keepdims=True))
  y = _bf16(y / np.linalg.norm(y, axis=1, keepdims=True))
  logits = t * x @ y[:b].T + bias  # every image against chunk 0's texts
  z = -np.ones_like(logits)
  z[np.arange(b), np.arange(b)] = 1.0
  g = -z / (1.0 + np.exp(z * logits))  # d loss / d logit
  parts = [t * g[d * b : (d + 1) * b].T @ x[d * b : (d + 1) * b] for d in range(n)]
  # The devices a copy of the chunk visits before it comes home (device 0).
  if schedule == "unidirectional":
    trips = [list(range(1, n))]
  else:
    right = n // 2  # ceil((n - 1) / 2) hops on the right, the rest on the left
    trips = [list(range(1, 1 + right)), list(range(n - 1, right, -1))]
  oracle = sum(parts)
  out = {}
  for name, wire in (("f32_wire", np.float32), ("bf16_wire", jnp.bfloat16)):
    home = _round(parts[0], np.float32)
    for trip in trips:
      run = np.zeros((b, dim))
      for d in trip:
        run = _round(_round(run + parts[d], np.float32), wire)  # the sum, then the wire
      home = _round(home + run, np.float32)
    out[name] = home
  scale = np.abs(oracle).max()
  row = dict(devices=n, b=b, dim=dim, t=t, bias=bias, schedule=schedule)
  for name, got in out.items():  # as the caller gets it for bf16 inputs
    got = _bf16(got)
    row[f"{name}_rel"] = float(np.linalg.norm(got - oracle) / np.linalg.norm(oracle))
    row[f"{name}_max"] = float(np.abs(got - oracle).max() / scale)
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--b", type=int, default=128, help="rows per chunk")
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", help="write the rows here")
  args = p.parse_args(argv)
  rows = []
  print("dY in bf16 against a float64 oracle; the wire: float32 (today) or bfloat16")
  print(
    "schedule          t    bias  devices | norm-rel: f32      bf16     | max elem: f32    bf16"
  )
  for schedule in ("unidirectional", "bidirectional"):
    for t, bias in REGIMES:
      for n in DEVICES:
        r = chunk_dy(n, args.b, args.dim, t, bias, schedule, np.random.default_rng(args.seed))
        rows.append(r)
        print(
          f"{schedule:14} {t:5.0f} {bias:6.0f} {n:8d} |  {r['f32_wire_rel']:.2e}  "
          f"{r['bf16_wire_rel']:.2e} |  {r['f32_wire_max']:.2e}  {r['bf16_wire_max']:.2e}"
        )
  if args.json:
    meta = dict(
      date=datetime.date.today().isoformat(),
      command="python -m benchmarks.dy_wire_precision",
      **vars(args),
    )
    with open(args.json, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()

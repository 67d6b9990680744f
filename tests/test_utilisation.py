"""The utilisation report (benchmarks/utilisation.py) and the chip table it models with.

Runs the CPU paths CI can run: the compile-only TPU report at a tiny shape (real Mosaic and
XLA TPU compiles on a compile-only topology, numerics in interpret mode), the measured path on
CPU devices, and a profiler trace. Figures are checked against the analytic FLOP counts of
docs/DESIGN.md section 1 and the roofline formulas, never against recorded numbers.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import pytest

from benchmarks import chips, utilisation

# A tiny problem: the local batch of the 4-device ring (B / 4) and D are multiples of 128, so
# the Pallas TPU kernels tile it without padding (padded tiles would count as FLOPs), small
# enough that interpret-mode numerics run in seconds.
B, D = 512, 128
# Cost analysis counts the softplus / sigmoid elementwise work too, and a kernel may
# recompute the logits tile (value and grad: 6 B^2 D with the tile once, 8 or 10 with
# recomputes): every implementation must land in [analytic, 2 x analytic).
FLOP_FACTOR = 2.0


@pytest.fixture(scope="module")
def compile_only_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("report") / "report.json"
  rc = utilisation.main(
    [
      "--mode",
      "compile-only",
      "--shapes",
      f"{B},{D},float32",
      "--generations",
      "v5e",
      "--ring",
      "4",
      "--seed",
      "31337",
      "--json",
      str(out),
    ]
  )
  report = json.loads(out.read_text())
  return rc, report


def _rows(report, **match):
  """The rows that compiled (errors fail test_compile_only_report_compiles_every_call)."""
  return [
    r for r in report["rows"] if not r.get("error") and all(r[k] == v for k, v in match.items())
  ]


def _analytic(row):
  per_device = row["batch"] ** 2 * row["dim"] / row["devices"]
  return (2 if row["pass"] == "fwd" else 6) * per_device


def test_compile_only_report_compiles_every_call(compile_only_report):
  rc, report = compile_only_report
  assert report["mode"] == "compile-only"
  errors = [(r["impl"], r["kind"], r["pass"], r["error"]) for r in report["rows"] if r.get("error")]
  assert not errors, errors
  assert rc == 0
  impls = {r["impl"] for r in report["rows"]}
  assert "xla" in impls
  try:
    import siglip_fast.kernels.tpu  # noqa: F401
  except ModuleNotFoundError:
    pass
  else:
    assert "pallas_tpu" in impls
  kinds = {(r["kind"], r["pass"]) for r in report["rows"]}
  assert kinds == {("block", "fwd"), ("block", "vag"), ("ring", "fwd"), ("ring", "vag")}


def test_compile_only_flops_match_the_analytic_count(compile_only_report):
  _, report = compile_only_report
  for r in _rows(report):
    analytic = _analytic(r)
    assert r["model_flops"] == pytest.approx(analytic)
    if r.get("has_loop"):
      # The XLA blocks' value-and-grad ring keeps its rounds in a loop (4 devices: 2 of 3),
      # whose body cost analysis counts once: the row says so and models from the analytic.
      assert "loop body once" in r["note"] and 0 < r["flops"] < analytic, r
    else:
      assert analytic <= r["flops"] < FLOP_FACTOR * analytic, r
    assert r["bytes"] > 0 and r["transcendentals"] > 0


def test_compile_only_roofline_follows_the_chip_table(compile_only_report):
  _, report = compile_only_report
  chip = chips.CHIPS["v5e"]
  for r in _rows(report):
    assert r["target"] == "v5e (compile-only)"
    assert r["intensity"] == pytest.approx(r["flops"] / r["bytes"])
    # A loop's body counted once (the XLA blocks' value-and-grad ring): modelled from the
    # useful FLOPs instead.
    flops = max(r["flops"], r["model_flops"]) if r.get("has_loop") else r["flops"]
    compute, hbm = flops / chip.bf16_flops, r["bytes"] / chip.hbm_bw
    assert r["compute_s"] == pytest.approx(compute)
    assert r["hbm_s"] == pytest.approx(hbm)
    expected = max(compute, hbm, r.get("wire_s", 0.0))
    assert r["modelled_s"] == pytest.approx(expected)
    if r["kind"] == "block":
      assert r["bound"] == ("MXU" if compute >= hbm else "HBM")
      assert "wire_s" not in r
    else:
      assert r["bound"] in ("MXU", "HBM", "wire (ICI)")
      assert (r["bound"] == "wire (ICI)") == (r["wire_s"] > max(compute, hbm))
    assert "measured_s" not in r and "tflops" not in r  # nothing is measured here


def test_compile_only_ring_wire_model(compile_only_report):
  _, report = compile_only_report
  chip = chips.CHIPS["v5e"]
  rings = _rows(report, kind="ring")
  assert rings
  # The ring kernel's value-and-grad runs one trip at this size (its dX fits VMEM).
  plans = {(r["impl"], r["pass"]): r["ring_plan"] for r in rings}
  assert plans[("pallas_tpu_ring", "vag")] == "one trip"
  assert plans[("pallas_tpu_ring", "fwd")] is None and plans[("pallas_tpu", "vag")] is None
  for r in rings:
    n, b = r["devices"], r["batch"] // r["devices"]
    # The text chunk (f32 here) and its int32 ids, half round the ring each way.
    chunk, hops = b * r["dim"] * 4 + 4 * b, math.ceil((n - 1) / 2)
    if r["ring_plan"] == "one trip":  # half of every chunk and its f32 dY each way, n hops
      chunk, hops = (chunk + 4 * b * r["dim"]) // 2, n
    elif r["pass"] == "vag":  # the driver: half of each chunk each way all the way round,
      # its f32 dY from the 2nd hop, then home: n - 1 transfers of each
      chunk, hops = (chunk + 4 * b * r["dim"]) // 2, n - 1
    assert r["wire_bytes_per_hop"] == chunk
    assert r["wire_hops"] == hops
    per_hop = max(chunk / chip.link_bw, 2 * chunk / chip.egress_bw)
    assert r["wire_s"] == pytest.approx(hops * per_hop)


def test_compile_only_numerics_in_interpret_mode(compile_only_report):
  _, report = compile_only_report
  blocks = _rows(report, kind="block")
  assert blocks
  for r in blocks:
    # float32 inputs: interpret-mode matmuls on CPU are exact f32 (docs/DESIGN.md section 5).
    assert r["rel_err"] < 1e-5, r


def test_compile_only_kernels_report_their_vmem_limit(compile_only_report):
  _, report = compile_only_report
  for r in _rows(report):
    if r["impl"].startswith("pallas_tpu"):
      assert r["vmem_limit_bytes"] > 0, r
    else:
      assert r["vmem_limit_bytes"] is None, r


def test_measured_mode_on_cpu_devices(tmp_path):
  out = tmp_path / "measured.json"
  rc = utilisation.main(
    [
      "--mode",
      "measured",
      "--implementations",
      "xla",
      "--shapes",
      "128,64,float32",
      "--iters",
      "2",
      "--ring",
      "4",
      "--seed",
      "4242",
      "--json",
      str(out),
    ]
  )
  report = json.loads(out.read_text())
  assert rc == 0
  rows = report["rows"]
  assert {(r["kind"], r["pass"]) for r in rows} == {
    ("block", "fwd"),
    ("block", "vag"),
    ("ring", "fwd"),
    ("ring", "vag"),
  }
  for r in rows:
    assert not r.get("error"), r
    assert r["measured_s"] > 0
    assert r["tflops"] == pytest.approx(r["flops"] / r["measured_s"] / 1e12)
    # A CPU is not in the chip table: no peak, so no fraction of it and no modelled time.
    assert "frac_peak" not in r and "modelled_s" not in r
    assert r["rel_err"] < 1e-5, r


def _ring_vag_row(b, dim, n):
  """A costed bf16 ring value-and-grad row of n devices, b rows each, as model_row gets it."""
  return {
    "kind": "ring",
    "pass": "vag",
    "batch": n * b,
    "dim": dim,
    "dtype": "bfloat16",
    "devices": n,
    "model_flops": 6 * n * b * b * dim,
    "flops": 6 * n * b * b * dim,
    "bytes": 1.0,
  }


def test_model_row_reproduces_the_design_example():
  # docs/DESIGN.md section 2: TPU v4, b = 4096, D = 1152, bf16: a block's 6 b^2 D FLOPs take
  # ~0.42 ms of MXU time and a forward chunk (2 b D bytes) ~0.2 ms on one ICI link.
  chip, b, dim, n = chips.CHIPS["v4"], 4096, 1152, 4
  row = _ring_vag_row(b, dim, n)
  utilisation.model_row(row, chip, 1, "unidirectional")
  assert row["compute_s_per_block"] == pytest.approx(6 * b * b * dim / chip.bf16_flops)
  fwd_chunk = 2 * b * dim + 4 * b
  vag_chunk = fwd_chunk + 4 * b * dim
  assert row["wire_bytes_per_hop"] == vag_chunk
  assert row["wire_s_per_hop"] == pytest.approx(vag_chunk / chip.link_bw)
  # n - 1 chunk hops; the dY crosses n - 2 of them and then goes home: n - 1 dY transfers.
  assert row["wire_hops"] == n - 1
  assert row["bound"] == (
    "wire (ICI)" if (n - 1) * vag_chunk / chip.link_bw > row["compute_s"] else "MXU"
  )
  assert row["modelled_s"] == pytest.approx(max(row["compute_s"], row["wire_s"]))


def test_trace_captures_loss_and_training_step(tmp_path):
  trace_dir = utilisation.capture_trace(
    str(tmp_path / "trace"), utilisation.Shape(64, 32, "float32"), "xla", steps=1
  )
  files = [p.name for p in (tmp_path / "trace").rglob("*") if p.is_file()]
  assert any(f.endswith(".xplane.pb") for f in files), files
  assert trace_dir == str(tmp_path / "trace")


@pytest.mark.parametrize(
  "text,message",
  [
    ("", "empty"),
    ("128", "'B,D'"),
    ("a,4", "integers"),
    ("0,4", "positive"),
    ("8,4,float16", "dtype"),
  ],
)
def test_bad_shapes_are_rejected(text, message):
  with pytest.raises(ValueError, match=message):
    utilisation.parse_shapes(text)


def test_shapes_parse():
  assert utilisation.parse_shapes("8,4; 16,2,float32") == [
    utilisation.Shape(8, 4, "bfloat16"),
    utilisation.Shape(16, 2, "float32"),
  ]


def test_chip_table_is_complete_and_sourced():
  assert set(chips.TPU_GENERATIONS) <= set(chips.CHIPS) and "h100" in chips.CHIPS
  for chip in chips.CHIPS.values():
    for field in ("bf16_flops", "hbm_bw", "link_bw", "egress_bw"):
      assert getattr(chip, field) > 0, (chip.name, field)
    assert chip.egress_bw >= chip.link_bw
    assert chip.sources and all(chip.sources)
    assert chip.ridge == pytest.approx(chip.bf16_flops / chip.hbm_bw)
  assert chips.chip_for_device_kind("NVIDIA H100 80GB HBM3").name == "h100"
  assert chips.chip_for_device_kind("NVIDIA H100 PCIe") is None  # other peaks than SXM
  assert chips.chip_for_device_kind("cpu") is None


@pytest.mark.parametrize("generation", chips.TPU_GENERATIONS)
def test_chip_table_matches_jax_device_kinds(generation):
  from jax.experimental import topologies

  chip = chips.CHIPS[generation]
  topo = topologies.get_topology_desc(platform="tpu", topology_name=chip.topology)
  kinds = {d.device_kind for d in topo.devices}
  assert {chips.chip_for_device_kind(k).name for k in kinds} == {generation}
  _, per_chip = chips.one_device_per_chip(topo.devices)
  assert len(topo.devices) // per_chip == 4  # the topology is the 4-chip one the ring uses


def test_chip_dataclass_round_trips_to_json():
  chip = chips.CHIPS["v5p"]
  assert json.loads(json.dumps(dataclasses.asdict(chip)))["bf16_flops"] == chip.bf16_flops


def test_oracle_matches_the_reference():
  from siglip_fast.reference import sigmoid_loss_dense

  x, y, _, log_t, bias = utilisation._inputs(utilisation.Shape(16, 8, "float32"), seed=99)
  loss, grads = jax.value_and_grad(sigmoid_loss_dense, argnums=(0, 1, 2, 3))(x, y, log_t, bias)
  assert utilisation.max_rel_err((loss, grads), "vag", (x, y, None, log_t, bias)) < 1e-5
  assert jnp.dtype(x.dtype) == jnp.float32


def test_static_profile_figures_attach_only_to_exact_matches():
  rows = [
    {
      "target": "v5e (compile-only)",
      "mode": "compile-only",
      "impl": "pallas_tpu",
      "kind": "block",
      "pass": "vag",
      "batch": 4096,
      "dim": 1152,
      "devices": 1,
    },
    {
      "target": "v5e (compile-only)",
      "mode": "compile-only",
      "impl": "pallas_tpu",
      "kind": "block",
      "pass": "fwd",
      "batch": 16384,
      "dim": 1152,
      "devices": 1,
    },
    {
      "target": "v5e (compile-only)",
      "mode": "compile-only",
      "impl": "xla",
      "kind": "block",
      "pass": "fwd",
      "batch": 4096,
      "dim": 1152,
      "devices": 1,
    },
  ]
  profile = [
    {
      "generation": "v5e",
      "kernel": "value_and_grad",
      "op": "siglip_fwd_dx.1",
      "batch": 4096,
      "dim": 1152,
      "static_us": 400.0,
      "bound": "MXU",
    },
    {
      "generation": "v5e",
      "kernel": "value_and_grad",
      "op": "siglip_dy.1",
      "batch": 4096,
      "dim": 1152,
      "static_us": 300.0,
      "bound": "VALU",
    },
    {
      "generation": "v5e",
      "kernel": "fwd",
      "op": "siglip_fwd.1",
      "batch": 4096,
      "dim": 1152,
      "static_us": 190.0,
      "bound": "MXU",
    },
  ]
  utilisation.attach_static(rows, profile)
  assert rows[0]["static_s"] == pytest.approx(700e-6)  # both kernels of the call
  assert rows[0]["static_unit"] == "MXU"
  assert "static_s" not in rows[1] and "static_s" not in rows[2]  # other B; not a kernel
  table = utilisation.format_table(rows)
  assert "static ms" in table and "0.7" in table
  # A match that lacks a figure gives none, rather than a partial sum.
  rows = [dict(rows[0], static_s=None)]
  rows[0].pop("static_s")
  utilisation.attach_static(rows, [dict(profile[0]), dict(profile[1], static_us=None)])
  assert "static_s" not in rows[0]
  # A kernel dumped once for several calls (the ring driver's blocks) counts every call.
  ring = dict(rows[0], impl="pallas_tpu", kind="ring", pass_="vag", devices=4)
  ring["pass"] = ring.pop("pass_")
  blocks = dict(profile[0], kernel="ring_blocks", op="siglip_fwd_dx_dy.3", ring_devices=4)
  utilisation.attach_static([ring], [dict(blocks, calls_per_row=4.0)])
  assert ring["static_s"] == pytest.approx(1600e-6)


def test_static_profiles_load_with_the_last_file_winning(tmp_path):
  row = {
    "generation": "v5e",
    "kernel": "fwd",
    "op": "siglip_fwd.1",
    "batch": 4096,
    "dim": 1152,
    "static_us": 1.0,
    "bound": "MXU",
  }
  old, new = tmp_path / "tpu_profile_a.json", tmp_path / "tpu_profile_b.json"
  old.write_text(json.dumps({"rows": [row, dict(row, dim=768)]}))
  new.write_text(json.dumps({"rows": [dict(row, static_us=2.0)]}))
  rows = utilisation.load_static_profiles([old, new])
  assert sorted((r["dim"], r["static_us"]) for r in rows) == [(768, 1.0), (1152, 2.0)]
  # A case whose ops are numbered differently in the newer file (the fused value-and-grad
  # in two calls where it was one) keeps only the newer file's ops.
  vag = dict(row, kernel="value_and_grad", op="siglip_fwd_dx_dy.1")
  old.write_text(json.dumps({"rows": [vag]}))
  new.write_text(json.dumps({"rows": [dict(vag, op=f"siglip_fwd_dx_dy.{k}") for k in (2, 3)]}))
  rows = utilisation.load_static_profiles([old, new])
  assert sorted(r["op"] for r in rows) == ["siglip_fwd_dx_dy.2", "siglip_fwd_dx_dy.3"]


def test_model_row_follows_the_ring_kernel_plan():
  # The ring kernel's value-and-grad (kernels/tpu_ring.py): one trip sends half of each
  # chunk and its float32 dY each way, n hops (the last one home); two trips send bf16
  # chunks only, text then image, half round each way; the shared driver sends half of
  # each chunk each way too, all the way round, with its dY from the second hop on, then
  # the dY home: n - 1 transfers of each.
  chip, b, dim, n = chips.CHIPS["v5e"], 4096, 1152, 4
  base = _ring_vag_row(b, dim, n)
  chunk, dy = 2 * b * dim + 4 * b, 4 * b * dim
  rows = {
    plan: utilisation.model_row(dict(base, ring_plan=plan), chip, 1, "bidirectional")
    for plan in ("one trip", "two trips", None)
  }
  assert (rows["one trip"]["wire_bytes_per_hop"], rows["one trip"]["wire_hops"]) == (
    (chunk + dy) // 2,
    n,
  )
  assert (rows["two trips"]["wire_bytes_per_hop"], rows["two trips"]["wire_hops"]) == (chunk, 4)
  assert (rows[None]["wire_bytes_per_hop"], rows[None]["wire_hops"]) == ((chunk + dy) // 2, 3)
  # The plan is read from the compiled program's kernel names.
  hlo = '%siglip_ring_fwd_bwd_dx.1 = f32[] custom-call(...), custom_call_target="tpu_custom_call"'
  assert utilisation._ring_kernel_plan(hlo) == "two trips"
  assert utilisation._ring_kernel_plan(hlo.replace("_dx.1", ".3")) == "one trip"
  assert utilisation._ring_kernel_plan(hlo.replace("bwd_dx", "")) is None


def test_report_records_profile_paths_relative_to_the_repository(tmp_path):
  inside = utilisation.DEFAULT_RESULTS / "tpu_profile_x.json"
  assert utilisation._shown(inside) == "benchmarks/results/tpu_profile_x.json"
  assert utilisation._shown(tmp_path / "p.json") == str((tmp_path / "p.json").resolve())

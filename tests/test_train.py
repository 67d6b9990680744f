"""The trainer end to end on tiny models: CLIP and LiT runs, resume after a kill, the ring
over 4 simulated CPU devices, non-finite loss handling."""

from __future__ import annotations

import json
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_fast.train import checkpoint as ckpt
from siglip_fast.train import models
from siglip_fast.train import trainer as train
from siglip_fast.reference import dense
from siglip_fast.train.tokenizer import ByteTokenizer

from tests.helpers import persistent_compilation_cache, rel_err
from tests.train_helpers import tiny_config


tiny = functools.partial(tiny_config, num_devices=1)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  with persistent_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache"):
    yield


def _rows(workdir, kind="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def _assert_trees_equal(a, b):
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("clip"))
  result = train.train_and_evaluate(tiny(), workdir, profile=True, verbose=False)
  return workdir, result


def test_clip_run_writes_everything(clip_run):
  workdir, r = clip_run
  for name in (
    "metrics.jsonl",
    "eval.json",
    "loss.png",
    "similarity.png",
    "config.json",
    "tokenizer.json",
  ):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert ByteTokenizer.load(os.path.join(workdir, "tokenizer.json")) == ByteTokenizer(48)
  rows = _rows(workdir)
  assert [row["step"] for row in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(row["loss"]) and row["t"] > 0 for row in rows)
  # t and b start at the paper's initialisation.
  assert rows[0]["t"] == pytest.approx(10.0) and rows[0]["b"] == pytest.approx(-10.0)
  ev = r["eval"]
  for k in ("zero_shot_acc", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
    assert 0.0 <= ev[k] <= 1.0
  assert ev["n_eval"] == 32 and ev["n_classes"] == 24
  step, meta = ckpt.read_meta(workdir)
  assert step == 4 and meta["step"] == 4 and meta["tokenizer"]["kind"] == "bytes"
  assert meta["data"] == {"seed": 0, "batch_size": 16, "next_step": 4}
  # --profile left a trace.
  traces = [f for _, _, fs in os.walk(os.path.join(workdir, "profile")) for f in fs]
  assert traces


class _Killed(Exception):
  pass


def test_killed_run_resumes_identically(clip_run, tmp_path, monkeypatch, capsys):
  """Kill at step 3 (checkpoint every 2): the rerun resumes at 2, replays the same data,
  and ends with exactly the parameters of the uninterrupted run."""
  _, uninterrupted = clip_run
  workdir = str(tmp_path)
  real = train.Data.train_batch

  def dying(self, step, *a):
    if step == 3:
      raise _Killed()
    return real(self, step, *a)

  monkeypatch.setattr(train.Data, "train_batch", dying)
  with pytest.raises(_Killed):
    train.train_and_evaluate(tiny(), workdir, verbose=False)
  assert ckpt.read_meta(workdir)[0] == 2
  monkeypatch.setattr(train.Data, "train_batch", real)

  r = train.train_and_evaluate(tiny(), workdir, verbose=True)
  assert "resumed from step 2" in capsys.readouterr().out
  assert r["resumed_from"] == 2 and r["step"] == 4
  _assert_trees_equal(r["params"], uninterrupted["params"])
  _assert_trees_equal(r["opt"], uninterrupted["opt"])
  assert [row["step"] for row in _rows(workdir)] == [1, 2, 3, 4]  # no gaps, no repeats


def test_stop_at_step_then_resume(tmp_path, clip_run):
  cfg = tiny(stop_at_step=2)
  r = train.train_and_evaluate(cfg, str(tmp_path), verbose=False)
  assert r["step"] == 2 and "eval" not in r
  r = train.train_and_evaluate(tiny(), str(tmp_path), verbose=False)
  assert r["resumed_from"] == 2
  _assert_trees_equal(r["params"], clip_run[1]["params"])


def test_lit_locks_the_image_tower(clip_run, tmp_path):
  clip_dir, clip = clip_run
  cfg = tiny(lit=True, image_init=clip_dir, stop_at_step=2)
  cfg.model.text.update({"width": 24})  # a different, fresh text tower
  # The image tower's architecture is taken from the checkpoint, whatever this config says.
  cfg.model.image.update({"width": 32})
  r = train.train_and_evaluate(cfg, str(tmp_path), verbose=False)
  assert r["step"] == 2
  _assert_trees_equal(r["params"]["img"], clip["params"]["img"])
  # No optimiser state for the locked tower.
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(r["opt"])]
  assert paths and not any("'img'" in p for p in paths)
  assert any("'txt'" in p for p in paths)

  # Resuming needs nothing from image_init: the locked tower is in the run's own checkpoint.
  cfg = tiny(lit=True, image_init=str(tmp_path / "gone"))
  cfg.model.text.update({"width": 24})
  r = train.train_and_evaluate(cfg, str(tmp_path), verbose=False)
  assert r["resumed_from"] == 2 and r["step"] == 4
  _assert_trees_equal(r["params"]["img"], clip["params"]["img"])
  assert r["params"]["txt"]["embed"]["embedding"].shape[-1] == 24
  assert 0.0 <= r["eval"]["zero_shot_acc"] <= 1.0
  _, meta = ckpt.read_meta(str(tmp_path))
  assert meta["config"]["lock_image"] is True


def test_lit_needs_an_image_checkpoint(tmp_path):
  cfg = tiny(lit=True)
  with pytest.raises(ValueError, match="image_init"):
    train.train_and_evaluate(cfg, str(tmp_path), verbose=False)
  cfg.image_init = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="checkpoint"):
    train.train_and_evaluate(cfg, str(tmp_path / "w"), verbose=False)


def test_ring_over_4_devices_matches_dense():
  """The training loss and its gradient w.r.t. every parameter, with the batch split over a
  mesh of 4 and the loss run as the ring, equal the dense loss on one device."""
  assert jax.device_count() >= 4, "conftest provides 8 simulated CPU devices"
  cfg = tiny(num_devices=4)
  tok = ByteTokenizer(cfg.tokenizer.max_len)
  batch = train.Data(cfg, tok).train_batch(5, 0, 1)
  assert len(set(batch["ids"].tolist())) < len(batch["ids"])  # repeated ids: extra positives
  model = models.from_config(cfg.model, tok.vocab_size, tok.max_len)
  fast = train._fast_compile()
  params = jax.jit(model.init, compiler_options=fast)(
    jax.random.key(7), batch["image"][:1], batch["text"][:1]
  )["params"]

  mesh = train.make_mesh(cfg)
  assert mesh.size == 4
  P = jax.sharding.PartitionSpec
  rows = jax.sharding.NamedSharding(mesh, P(train.AXIS))
  b4 = {k: jax.device_put(batch[k], rows) for k in ("image", "text", "ids")}
  p4 = jax.device_put(params, jax.sharding.NamedSharding(mesh, P()))
  l4, g4 = jax.jit(jax.value_and_grad(train.make_loss_fn(model, mesh, cfg)), compiler_options=fast)(
    p4, {}, b4
  )

  def dense_loss(p):
    zi, zt, lt, b = model.apply({"params": p}, batch["image"], batch["text"])
    return dense.sigmoid_loss_dense(zi, zt, lt, b, pair_ids=jnp.asarray(batch["ids"]))

  ld, gd = jax.jit(jax.value_and_grad(dense_loss), compiler_options=fast)(params)
  # float32 throughout; only the summation order differs. Gradients are compared as one
  # vector: some leaves are zero up to rounding (~1e-10), where a per-leaf relative error
  # would only measure noise.
  flat = lambda g: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(g)])
  assert jax.tree.structure(g4) == jax.tree.structure(gd)
  assert rel_err(l4, ld) < 1e-5
  assert rel_err(flat(g4), flat(gd)) < 1e-5


def test_training_on_4_devices(clip_run, tmp_path):
  """A full run on a mesh of 4: same first-step loss and gradient norm as on 1 device."""
  r = train.train_and_evaluate(tiny(num_devices=4), str(tmp_path), verbose=False)
  assert r["step"] == 4 and "eval" in r
  one, four = _rows(clip_run[0])[0], _rows(str(tmp_path))[0]
  assert four["loss"] == pytest.approx(one["loss"], rel=1e-5)
  assert four["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(clip_run, tmp_path, monkeypatch):
  real = train.Data.train_batch

  def poisoned(self, step, *a):
    b = real(self, step, *a)
    if step == 2:  # the third step sees a NaN pixel, so its loss is NaN
      b["image"] = b["image"].copy()
      b["image"][0, 0, 0, 0] = np.nan
    return b

  monkeypatch.setattr(train.Data, "train_batch", poisoned)
  with pytest.raises(train.NonFiniteLossError, match="non-finite") as e:
    train.train_and_evaluate(tiny(), str(tmp_path), verbose=False)
  assert "checkpoint (step 2) is intact" in str(e.value)
  step, _ = ckpt.read_meta(str(tmp_path))
  assert step == 2  # nothing was saved after the bad step
  rows = _rows(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2, 3] and not np.isfinite(rows[-1]["loss"])


def test_config_errors(tmp_path):
  with pytest.raises(ValueError, match="divisible"):
    train.make_mesh(tiny(num_devices=3))
  with pytest.raises(ValueError, match="num_devices"):
    train.make_mesh(tiny(num_devices=10_000))
  cfg = tiny()
  cfg.positives = "everything"
  with pytest.raises(ValueError, match="positives"):
    train.make_loss_fn(None, None, cfg)
  cfg = tiny()
  cfg.data.kind = "manifest"
  with pytest.raises(ValueError, match="train_manifest"):
    train.train_and_evaluate(cfg, str(tmp_path), verbose=False)

"""The trainer end to end on tiny models: CLIP and LiT runs, resume after a kill, the ring
over 4 simulated CPU devices, non-finite loss handling."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from siglip_fast import checkpoint as ckpt
from siglip_fast import models, train
from siglip_fast.configs import clip_shapes, lit_shapes
from siglip_fast.reference import dense
from siglip_fast.tokenizer import ByteTokenizer

from tests.helpers import rel_err


def tiny(cfg=None, **top):
  """A config small enough to compile and run a few steps in seconds."""
  c = clip_shapes.get_config() if cfg is None else cfg
  c.total_steps = 4
  c.batch_size = 16
  c.num_devices = 1
  c.data.image_size = 16
  c.data.n_train = 64
  c.data.n_val = 16
  c.data.n_test = 32
  c.model.embed_dim = 16
  c.model.image.update({"patch": 4, "width": 16, "depth": 1, "heads": 2})
  c.model.text.update({"width": 16, "depth": 1, "heads": 2, "patch": 2})
  c.optim.warmup_steps = 1
  c.ckpt_every = 2
  c.log_every = 1
  c.eval_batch_size = 32
  c.plot_pairs = 4
  c.profile_steps = 1
  for k, v in top.items():
    c[k] = v
  return c


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
  for name in ("metrics.jsonl", "eval.json", "loss.png", "similarity.png", "config.json",
               "tokenizer.json"):
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
  cfg = tiny(lit_shapes.get_config())
  cfg.image_init = clip_dir
  cfg.model.text.update({"width": 24})  # a different, fresh text tower
  # The image tower's architecture is taken from the checkpoint, whatever this config says.
  cfg.model.image.update({"width": 32})
  r = train.train_and_evaluate(cfg, str(tmp_path), verbose=False)
  _assert_trees_equal(r["params"]["img"], clip["params"]["img"])
  assert r["params"]["txt"]["embed"]["embedding"].shape[-1] == 24
  # No optimiser state for the locked tower.
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(r["opt"])]
  assert paths and not any("'img'" in p for p in paths)
  assert any("'txt'" in p for p in paths)
  assert 0.0 <= r["eval"]["zero_shot_acc"] <= 1.0
  # Its checkpoint holds the whole model, locked tower included.
  _, meta = ckpt.read_meta(str(tmp_path))
  assert meta["config"]["lock_image"] is True


def test_lit_needs_an_image_checkpoint(tmp_path):
  cfg = tiny(lit_shapes.get_config())
  with pytest.raises(ValueError, match="image_init"):
    train.train_and_evaluate(cfg, str(tmp_path), verbose=False)
  cfg.image_init = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="checkpoint"):
    train.train_and_evaluate(cfg, str(tmp_path / "w"), verbose=False)


def _loss_and_grads(cfg, n_dev, params, batch):
  mesh = train.make_mesh(tiny(num_devices=n_dev, batch_size=cfg.batch_size))
  tok = ByteTokenizer(cfg.tokenizer.max_len)
  model = models.from_config(cfg.model, tok.vocab_size, tok.max_len)
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train.AXIS))
  loss_fn = train.make_loss_fn(model, mesh, cfg)
  p = jax.device_put(params, repl)
  b = {k: jax.device_put(batch[k], rows) for k in ("image", "text", "ids")}
  return jax.jit(jax.value_and_grad(loss_fn))(p, {}, b), model


def test_ring_over_4_devices_matches_one_device_and_dense():
  assert jax.device_count() >= 4, "conftest provides 8 simulated CPU devices"
  cfg = tiny()
  tok = ByteTokenizer(cfg.tokenizer.max_len)
  data = train.Data(cfg, tok)
  batch = data.train_batch(5, 0, 1)  # a batch with repeated attribute ids (positives)
  assert len(set(batch["ids"].tolist())) < len(batch["ids"])
  model = models.from_config(cfg.model, tok.vocab_size, tok.max_len)
  params = model.init(jax.random.key(7), batch["image"][:1], batch["text"][:1])["params"]
  (l1, g1), _ = _loss_and_grads(cfg, 1, params, batch)
  (l4, g4), _ = _loss_and_grads(cfg, 4, params, batch)

  def dense_loss(p):
    zi, zt, lt, b = model.apply({"params": p}, batch["image"], batch["text"])
    return dense.sigmoid_loss_dense(zi, zt, lt, b, pair_ids=jnp.asarray(batch["ids"]))

  ld, gd = jax.value_and_grad(dense_loss)(params)
  # float32 throughout; only the summation order differs between the three. Gradients are
  # compared as one vector: some leaves are zero up to rounding (~1e-10), where a per-leaf
  # relative error only measures noise.
  flat = lambda g: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(g)])
  assert jax.tree.structure(g4) == jax.tree.structure(gd)
  assert rel_err(l4, ld) < 1e-5 and rel_err(l1, ld) < 1e-5
  assert rel_err(flat(g4), flat(gd)) < 1e-5 and rel_err(flat(g1), flat(gd)) < 1e-5


def test_training_on_4_devices(clip_run, tmp_path):
  """A full run on a mesh of 4: same first-step loss and gradient norm as on 1 device."""
  r = train.train_and_evaluate(tiny(num_devices=4, total_steps=2), str(tmp_path),
                               verbose=False)
  assert r["step"] == 2 and "eval" in r
  one, four = _rows(clip_run[0])[0], _rows(str(tmp_path))[0]
  assert four["loss"] == pytest.approx(one["loss"], rel=1e-5)
  assert four["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
  cfg = tiny(ckpt_every=1)
  cfg.optim.lr = 1e30  # the first update sends the weights to ~1e30, the next loss is NaN
  cfg.optim.warmup_steps = 0
  with pytest.raises(train.NonFiniteLossError, match="non-finite") as e:
    train.train_and_evaluate(cfg, str(tmp_path), verbose=False)
  step, _ = ckpt.read_meta(str(tmp_path))
  assert f"checkpoint (step {step}) is intact" in str(e.value)
  failed = _rows(str(tmp_path))[-1]
  assert failed["step"] == step + 1 and not np.isfinite(failed["loss"])


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

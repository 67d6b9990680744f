r"""Train SigLIP two towers, CLIP-style from scratch or LiT with a locked image tower.

The main job (embedded coloured-shapes data, nothing downloaded):

  python -m siglip_fast.train --workdir /tmp/siglip_clip

LiT from that run's image tower:

  python -m siglip_fast.train --config siglip_fast/configs/lit_shapes.py \
      --config.image_init=/tmp/siglip_clip --workdir /tmp/siglip_lit

Any config field can be overridden (``--config.total_steps=20``). Running again with the same
workdir resumes from its latest checkpoint. Data parallel over every device of every process:
the batch is split over a 1-D mesh axis ``batch`` and the loss runs as the ring over it.
Several hosts: start one process per host with ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (``jax.distributed``), or ``--distributed_auto`` on
clusters JAX detects by itself (Cloud TPU, SLURM, ...).
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

import siglip_fast
from siglip_fast import checkpoint as ckpt
from siglip_fast import data as data_lib
from siglip_fast import evaluate
from siglip_fast import models
from siglip_fast import plots
from siglip_fast.tokenizer import ByteTokenizer

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "clip_shapes.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_bool("profile", False, "Capture a jax.profiler trace of a few steps into "
                  "WORKDIR/profile (config.profile_steps steps, after compilation).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", 1, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", 0, "This process's index (multi-host).")
flags.DEFINE_bool("distributed_auto", False,
                  "Call jax.distributed.initialize() with cluster auto-detection.")
flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for all processes.")

AXIS = "batch"


def _fast_compile(enabled=True):
  """XLA options for programs whose compile time matters more than their run time: on the
  CPU backend, no LLVM optimisation (compiles about twice as fast). None elsewhere."""
  return ({"xla_backend_optimization_level": 0}
          if enabled and jax.default_backend() == "cpu" else None)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss or gradient; the last checkpoint is left intact."""


def setup_distributed(coordinator_address=None, num_processes=1, process_id=0, auto=False,
                      timeout=300):
  """Join JAX's multi-controller runtime before any computation, if asked to."""
  if not auto and num_processes <= 1 and coordinator_address is None:
    return
  # CPU devices talk over gloo (the default in recent jax; explicit for clarity). Harmless
  # on GPU/TPU, where the backend's own collectives are used.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if auto:
    jax.distributed.initialize(initialization_timeout=timeout)
  else:
    if coordinator_address is None:
      raise ValueError("--num_processes > 1 needs --coordinator_address=HOST:PORT")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout)


# ---------------------------------------------------------------------------------------
# Pieces of a run.


def make_mesh(cfg):
  devices = jax.devices()
  if cfg.num_devices:
    if jax.process_count() > 1:
      raise ValueError("config.num_devices must be 0 (all devices) with several processes")
    if cfg.num_devices > len(devices):
      raise ValueError(f"config.num_devices={cfg.num_devices} but only {len(devices)} "
                       "devices are visible")
    devices = devices[: cfg.num_devices]
  if cfg.batch_size % len(devices):
    raise ValueError(f"config.batch_size={cfg.batch_size} must be divisible by the number "
                     f"of devices ({len(devices)})")
  return jax.sharding.Mesh(np.asarray(devices), (AXIS,))


class Data:
  """Training batches by step (this process's rows only) and the held-out evaluation set."""

  def __init__(self, cfg, tokenizer):
    self.cfg = cfg
    d = cfg.data
    if d.kind == "shapes":
      self.shapes = data_lib.Shapes(data_lib.ShapesSpec(
          image_size=d.image_size, seed=d.seed, n_train=d.n_train, n_val=d.n_val,
          n_test=d.n_test), tokenizer)
      self.n_train = d.n_train
      self.class_names = data_lib.class_names()
      self.templates = data_lib.zero_shot_templates()
    elif d.kind == "manifest":
      if not d.train_manifest or not d.eval_manifest:
        raise ValueError("data.kind='manifest' needs data.train_manifest and "
                         "data.eval_manifest (CSV/TSV files of image,caption)")
      self.train_set = data_lib.Manifest(d.train_manifest, d.image_size, tokenizer)
      self.eval_set = data_lib.Manifest(d.eval_manifest, d.image_size, tokenizer)
      self.n_train = len(self.train_set)
      self.class_names = self.eval_set.label_names
      self.templates = ("{}", "a photo of a {}")
    else:
      raise ValueError(f"data.kind must be 'shapes' or 'manifest', got {d.kind!r}")

  def train_batch(self, step: int, process_index: int, process_count: int) -> dict:
    idx = data_lib.train_indices(step, self.cfg.batch_size, self.n_train, self.cfg.data.seed)
    idx = data_lib.shard_for_process(idx, process_index, process_count)
    b = (self.shapes.batch("train", idx) if self.cfg.data.kind == "shapes"
         else self.train_set.batch(idx))
    return {k: b[k] for k in ("image", "text", "ids")}

  def eval_batch(self, split="test") -> dict:
    if self.cfg.data.kind == "shapes":
      return self.shapes.batch(split, range(self.shapes.size(split)))
    return self.eval_set.batch(range(len(self.eval_set)))


def make_optimizer(cfg):
  o = cfg.optim
  warmup = min(o.warmup_steps, max(cfg.total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.lr, warmup, max(cfg.total_steps, warmup + 1), end_value=o.lr * o.end_lr_frac)
  # Decay matrices only: not biases, LayerNorm scales, t' or b.
  decay = lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                           mask=decay))
  return optax.chain(*parts), schedule


def split_params(params: dict, lock_image: bool):
  """(trainable, frozen): LiT moves the image tower to ``frozen``, which gets no gradient
  and no optimiser state."""
  if not lock_image:
    return dict(params), {}
  return {k: v for k, v in params.items() if k != "img"}, {"img": params["img"]}


def make_loss_fn(model, mesh, cfg):
  """loss(trainable, frozen, batch) on global arrays: each device embeds its rows of the
  batch, and ``sigmoid_loss`` runs as the ring over the mesh axis, so the loss (and its
  gradient) is that of the whole global batch."""
  P = jax.sharding.PartitionSpec
  if cfg.positives not in ("attributes", "diagonal"):
    raise ValueError(f"config.positives must be 'attributes' or 'diagonal', got "
                     f"{cfg.positives!r}")
  use_ids = cfg.positives == "attributes"

  def local_loss(params, image, text, ids):
    zimg, ztxt, log_t, bias = model.apply({"params": params}, image, text)
    return siglip_fast.sigmoid_loss(
        zimg, ztxt, log_t, bias, pair_ids=ids if use_ids else None, axis_name=AXIS,
        implementation=cfg.loss_implementation, schedule=cfg.loss_schedule)

  def loss_fn(trainable, frozen, batch):
    params = {**frozen, **trainable}
    # check_vma (the default) tracks which values vary over the axis, so the gradient of
    # the replicated parameters is summed over devices by autodiff, not by hand.
    return jax.shard_map(local_loss, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
                         out_specs=P())(params, batch["image"], batch["text"], batch["ids"])

  return loss_fn


def make_train_step(model, tx, mesh, cfg):
  """jit(trainable, frozen, opt, batch) -> (trainable, opt, metrics); ``frozen`` gets no
  gradient and has no optimiser state."""
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  loss_fn = make_loss_fn(model, mesh, cfg)

  def step(trainable, frozen, opt, batch):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
    updates, opt = tx.update(grads, opt, trainable)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    metrics = {"loss": loss, "t": jnp.exp(trainable["log_t"]), "b": trainable["bias"],
               "grad_norm": grad_norm}
    return optax.apply_updates(trainable, updates), opt, metrics

  return jax.jit(step, donate_argnums=(0, 2), out_shardings=(repl, repl, repl),
                 compiler_options=_fast_compile(cfg.get("fast_compile", False)))


class Progress:
  """A one-line progress bar on a terminal; periodic plain lines otherwise (CI logs)."""

  def __init__(self, start, total, batch_size, enabled=True, stream=sys.stderr):
    self.start, self.total, self.batch, self.enabled = start, total, batch_size, enabled
    self.stream = stream
    self.tty = enabled and stream.isatty()
    self.every = max(1, (total - start) // 20)
    self.t0 = self.tw = None
    self.window_start = start
    self.rate = float("nan")

  def update(self, step, m):
    """``step`` steps are done; ``m`` are the metrics of the last one."""
    now = time.perf_counter()
    if self.t0 is None:  # the first step includes compilation: time from its end
      self.t0 = self.tw = now
      self.window_start = step
    elif now - self.tw > 1.0 or step == self.total:
      self.rate = (step - self.window_start) * self.batch / (now - self.tw)
      self.tw, self.window_start = now, step
    if not self.enabled:
      return
    frac = (step - self.start) / max(self.total - self.start, 1)
    eta = (self.total - step) * self.batch / self.rate if self.rate == self.rate else 0
    bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
    line = (f"[{bar}] {step}/{self.total} loss {m['loss']:.4f} t {m['t']:.2f} "
            f"b {m['b']:.2f} {self.rate:.0f} ex/s eta {int(eta) // 60}:{int(eta) % 60:02d}")
    if self.tty:
      self.stream.write("\r" + line + ("\n" if step == self.total else ""))
      self.stream.flush()
    elif step == self.total or (step - self.start) % self.every == 0:
      print(line, file=self.stream, flush=True)


class MetricWriter:
  """metrics.jsonl (always) and TensorBoard events (if tensorboardX is installed)."""

  def __init__(self, workdir, enabled, resume_step=None):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not enabled:
      return
    if resume_step is not None and os.path.exists(self.path):
      # Rows past the checkpoint are about to be redone; drop them so the log has no gaps
      # and no duplicates.
      with open(self.path) as f:
        rows = [json.loads(l) for l in f if l.strip()]
      with open(self.path, "w") as f:
        for r in rows:
          if r.get("step", 0) <= resume_step:
            f.write(json.dumps(r) + "\n")
    elif resume_step is None and os.path.exists(self.path):
      os.remove(self.path)
    try:
      from tensorboardX import SummaryWriter  # optional, not a dependency
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:
      pass

  def write(self, step, kind, values: dict):
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
    if self.tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self.tb.add_scalar(f"{kind}/{k}", v, step)

  def read(self, kind):
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [r for r in map(json.loads, filter(str.strip, f)) if r.get("kind") == kind]

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _prefetch(make, steps, depth=2):
  """Yield (step, make(step)) for each step, produced on a background thread (NumPy
  releases the GIL, so rendering the next batch overlaps the device step)."""
  q = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(item):
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def worker():
    try:
      for s in steps:
        if not put((s, make(s))):
          return
    except BaseException as e:  # surfaced in the consumer
      put((None, e))

  threading.Thread(target=worker, daemon=True).start()
  try:
    for _ in steps:
      s, item = q.get()
      if s is None:
        raise item
      yield s, item
  finally:
    stop.set()


def _host(x):
  """A replicated (possibly multi-process) array's value as NumPy."""
  return np.asarray(x.addressable_data(0))


# ---------------------------------------------------------------------------------------
# The run.


def _load_image_tower(cfg, mesh, log):
  """The ``img`` params of the latest checkpoint under cfg.image_init, and its model config
  (which this run adopts for the image tower)."""
  step, meta = ckpt.read_meta(cfg.image_init)
  src = meta["config"]
  src_tok = ByteTokenizer.from_dict(meta["tokenizer"])
  src_model = models.from_config(_cfgdict(src["model"]), src_tok.vocab_size, src_tok.max_len)
  s = src["data"]["image_size"]
  shapes = jax.eval_shape(lambda k: src_model.init(
      k, jnp.zeros((1, s, s, 3)), jnp.zeros((1, src_tok.max_len), "int32")),
                          jax.random.key(0))["params"]
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), shapes)
  mngr = ckpt.manager(ckpt.checkpoint_dir(cfg.image_init), keep=None, create=False)
  params, _, _ = ckpt.restore(mngr, step, like)
  mngr.close()
  log(f"image tower from {cfg.image_init} (step {step}), locked={cfg.lock_image}")
  return params["img"], src


def _cfgdict(d):
  return ml_collections.ConfigDict(d)


def train_and_evaluate(cfg, workdir: str, *, profile: bool = False, verbose: bool = True):
  """Train (or resume) in ``workdir``, then evaluate on the held-out split.

  Returns a dict: ``step``, ``resumed_from`` (None or a step), ``eval`` (held-out metrics;
  absent when stopped early), ``params`` (the full parameter tree), ``opt`` (the optimiser
  state, of the trainable parameters only), ``train_seconds``.
  """

  is_main = jax.process_index() == 0

  def log(msg):
    if verbose and is_main:
      print(msg, flush=True)

  if not workdir:
    raise ValueError("--workdir is required")
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(cfg)
  P = jax.sharding.PartitionSpec
  repl = jax.sharding.NamedSharding(mesh, P())
  data_sharding = jax.sharding.NamedSharding(mesh, P(AXIS))
  n_proc, proc = jax.process_count(), jax.process_index()

  # A workdir that holds a checkpoint resumes from it; a locked image tower then comes
  # from that checkpoint too, so a LiT run resumes even if image_init has gone.
  mngr = ckpt.manager(os.path.join(workdir, "checkpoints"), keep=cfg.keep_ckpts)
  resumed_from = mngr.latest_step()
  image_tower, src = None, None
  if cfg.lock_image and not cfg.image_init and resumed_from is None:
    raise ValueError("config.lock_image=True (LiT) needs config.image_init: the workdir or "
                     "checkpoint folder of a finished run whose image tower to lock")
  if resumed_from is not None and cfg.image_init:
    src = ckpt.read_meta(workdir, resumed_from)[1]["config"]
  elif cfg.image_init:
    image_tower, src = _load_image_tower(cfg, mesh, log)
  if src is not None:
    with cfg.unlocked():  # the image tower's shape is the checkpoint's, not ours
      cfg.model.image = _cfgdict(src["model"]["image"])
      cfg.model.embed_dim = src["model"]["embed_dim"]
      cfg.data.image_size = src["data"]["image_size"]

  tok = ByteTokenizer(cfg.tokenizer.max_len)
  data = Data(cfg, tok)
  model = models.from_config(cfg.model, tok.vocab_size, tok.max_len)
  tx, schedule = make_optimizer(cfg)
  s = cfg.data.image_size

  def init(key):
    p = model.init(key, jnp.zeros((1, s, s, 3)), jnp.zeros((1, tok.max_len), "int32"))["params"]
    return dict(p)

  # Initialisation runs once: compile it without LLVM optimisation (about half the time).
  params = jax.jit(init, out_shardings=repl, compiler_options=_fast_compile())(
      jax.random.key(cfg.seed))
  if image_tower is not None:
    params["img"] = image_tower
  trainable, frozen = split_params(params, cfg.lock_image)
  opt = jax.jit(tx.init, out_shardings=repl, compiler_options=_fast_compile())(trainable)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(trainable))
  n_frozen = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(frozen))

  start = 0
  if resumed_from is not None:
    params, opt, meta = ckpt.restore(mngr, resumed_from, {**frozen, **trainable}, opt)
    trainable, frozen = split_params(params, cfg.lock_image)
    start = int(meta["step"])
    old = meta.get("data", {})
    if old.get("seed") != cfg.data.seed or old.get("batch_size") != cfg.batch_size:
      log(f"warning: data seed/batch size changed since the checkpoint ({old}); the data "
          "order will differ from the interrupted run")
    log(f"resumed from step {start}")

  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
    tok.save(os.path.join(workdir, "tokenizer.json"))
  impl = cfg.loss_implementation or siglip_fast.default_implementation()
  log(f"{n_proc} process(es), {mesh.size} device(s) ({jax.default_backend()}), global batch "
      f"{cfg.batch_size}, loss '{impl}' ring over {mesh.size} device(s); "
      f"{n_params:,} trainable params" + (f", {n_frozen:,} locked" if n_frozen else ""))

  def meta_at(step):
    return {"step": step, "config": json.loads(cfg.to_json_best_effort()),
            "tokenizer": tok.to_dict(),
            "data": {"seed": cfg.data.seed, "batch_size": cfg.batch_size,
                     "next_step": step}}

  train_step = make_train_step(model, tx, mesh, cfg)
  writer = MetricWriter(workdir, is_main, resumed_from)
  end = cfg.total_steps if not cfg.stop_at_step else min(cfg.stop_at_step, cfg.total_steps)
  bar = Progress(start, cfg.total_steps, cfg.batch_size, enabled=verbose and is_main)
  last_ckpt = resumed_from
  profile_at = start + 2 if profile else None
  profile_dir = os.path.join(workdir, "profile")
  tracing = False

  def to_global(local):
    return {k: jax.make_array_from_process_local_data(data_sharding, v)
            for k, v in local.items()}

  make = lambda step: data.train_batch(step, proc, n_proc)
  t_start = time.perf_counter()
  try:
    for step, local in _prefetch(make, range(start, end)):
      if step == profile_at:
        jax.profiler.start_trace(profile_dir)
        tracing = True
      trainable, opt, m = train_step(trainable, frozen, opt, to_global(local))
      # Fetching the metrics every step bounds the queue of dispatched steps (long queues of
      # chained steps ran far slower on the CPU backend) and catches a NaN at once.
      m = {k: float(_host(v)) for k, v in m.items()}
      done = step + 1
      if tracing and done == profile_at + cfg.profile_steps:
        jax.profiler.stop_trace()
        tracing = False
        log(f"profile of steps {profile_at}..{done - 1} written to {profile_dir}")
      if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
        writer.write(done, "train", m)
        where = (f"the last checkpoint (step {last_ckpt}) is intact in {workdir}/checkpoints"
                 if last_ckpt is not None else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"non-finite training loss or gradient at step {done} (loss={m['loss']}, "
            f"grad_norm={m['grad_norm']}); stopped without saving. {where}. Try a lower "
            "config.optim.lr or config.optim.grad_clip.")
      m["lr"] = float(schedule(step))
      bar.update(done, m)
      if done % cfg.log_every == 0 or done == end:
        rate = bar.rate if math.isfinite(bar.rate) else None
        writer.write(done, "train", {**m, "examples_per_s": rate})
      if done % cfg.ckpt_every == 0 or done == end:
        ckpt.save(mngr, done, {**frozen, **trainable}, opt, meta_at(done), force=True)
        last_ckpt = done
      if cfg.eval_every and done % cfg.eval_every == 0 and done != end:
        ev, _, _ = _evaluate(model, {**frozen, **trainable}, tok, data, cfg, "val")
        writer.write(done, "val", ev)
  finally:
    if tracing:  # stopped mid-trace
      jax.profiler.stop_trace()
    mngr.wait_until_finished()
    mngr.close()
  train_time = time.perf_counter() - t_start
  params = {**frozen, **trainable}

  result = {"step": end, "resumed_from": resumed_from, "params": params, "opt": opt,
            "train_seconds": train_time}
  if end < cfg.total_steps:
    log(f"stopped at step {end} (config.stop_at_step); run again to resume")
    writer.close()
    return result

  ev, zi, zt = _evaluate(model, params, tok, data, cfg, "test")
  ev["train_seconds"] = train_time
  writer.write(end, "test", ev)
  writer.close()
  result["eval"] = ev
  if is_main:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(ev, f, indent=2)
    rows = writer.read("train")
    if rows:
      plots.loss_curve([r["step"] for r in rows], [r["loss"] for r in rows],
                       os.path.join(workdir, "loss.png"))
    eb = data.eval_batch("test")
    k = min(cfg.plot_pairs, len(zi))
    plots.similarity_matrix(zi[:k], zt[:k], eb["caption"][:k],
                            os.path.join(workdir, "similarity.png"), images=eb["image"][:k])
  log(f"held-out evaluation after {end} steps ({ev['n_eval']} pairs):\n"
      + evaluate.summary(ev))
  log(f"outputs in {workdir}: checkpoints/, metrics.jsonl, eval.json, loss.png, "
      "similarity.png")
  return result


def _evaluate(model, params, tok, data, cfg, split):
  embed_images, embed_texts = evaluate.make_embedders(model, params, tok,
                                                         cfg.eval_batch_size)
  return evaluate.evaluate_pairs(embed_images, embed_texts, data.eval_batch(split),
                                 data.class_names, data.templates)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  F = flags.FLAGS
  if not F["verbosity"].present:  # keep orbax's INFO chatter out of the progress output
    logging.set_verbosity(logging.WARNING)
  setup_distributed(F.coordinator_address, F.num_processes, F.process_id,
                    F.distributed_auto, F.distributed_timeout)
  try:
    train_and_evaluate(F.config, F.workdir, profile=F.profile)
  except NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)

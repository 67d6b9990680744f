r"""Train SigLIP two towers, CLIP-style from scratch or LiT with a locked image tower.

The command line is ``python -m siglip_fast.train`` (``__main__.py``); this module is the run:
``train_and_evaluate(cfg, workdir)`` = ``set_up`` (mesh, data, model, optimiser, fresh
parameters) -> ``restore`` (the newest intact checkpoint of the workdir, if any) ->
``train_loop`` -> ``finish`` (held-out evaluation, eval.json and plots).

Data parallel over every device of every process: the batch is split over a 1-D mesh axis
``batch`` and the loss runs as the ring over it. Running again with the same workdir resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import shutil
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import siglip_fast
from siglip_fast.train import checkpoint as ckpt
from siglip_fast.train import data as data_lib
from siglip_fast.train import evaluate
from siglip_fast.train import models
from siglip_fast.train import plots
from siglip_fast.train.tokenizer import ByteTokenizer

AXIS = "batch"


def _fast_compile(enabled=True):
  """XLA options for programs whose compile time matters more than their run time: on the
  CPU backend, no LLVM optimisation (compiles about twice as fast). None elsewhere."""
  return (
    {"xla_backend_optimization_level": 0} if enabled and jax.default_backend() == "cpu" else None
  )


class UserError(Exception):
  """A problem the user can fix (config, checkpoints, numerics); the command line prints it
  as one ``error:`` line, without a traceback."""


class ConfigError(UserError, ValueError):
  """An invalid config value: names the key and the valid range."""


class CheckpointError(UserError, RuntimeError):
  """No usable checkpoint in the workdir (unreadable, or written with another config)."""


class NonFiniteLossError(UserError, FloatingPointError):
  """Training produced a NaN/inf loss or gradient; the last checkpoint is left intact."""


def setup_distributed(
  coordinator_address=None, num_processes=1, process_id=0, auto=False, timeout=300
):
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
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=timeout,
    )


# ---------------------------------------------------------------------------------------
# Config validation: before anything is written or any device is touched.


def _check(cfg, key, ok, valid):
  node = cfg
  for part in key.split("."):
    node = node[part]
  if isinstance(node, bool) or not ok(node):
    raise ConfigError(f"config.{key}={node!r} is invalid: must be {valid}")


def validate_config(cfg, workdir: str | None = None) -> None:
  """Raise ``ConfigError`` naming the key and its valid range for any value the run would
  trip over later (often with a misleading message, after writing to the workdir)."""
  integer = lambda lo, hi=None: lambda v: isinstance(v, int) and v >= lo and (hi is None or v <= hi)
  number = lambda lo, hi, lo_open=False, hi_open=False: (
    lambda v: (
      isinstance(v, (int, float))
      and math.isfinite(v)
      and (v > lo if lo_open else v >= lo)
      and (v < hi if hi_open else v <= hi)
    )
  )
  if not workdir:
    raise ConfigError("--workdir is required: the directory for checkpoints, metrics and plots")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} exists and is not a directory")
  for key in (
    "total_steps",
    "batch_size",
    "log_every",
    "ckpt_every",
    "keep_ckpts",
    "eval_batch_size",
    "profile_steps",
    "model.embed_dim",
    "tokenizer.max_len",
    "data.n_train",
    "data.n_val",
    "data.n_test",
  ):
    _check(cfg, key, integer(1), "an integer >= 1")
  for key in (
    "stop_at_step",
    "num_devices",
    "eval_every",
    "plot_pairs",
    "seed",
    "data.seed",
    "optim.warmup_steps",
  ):
    _check(cfg, key, integer(0), "an integer >= 0")
  for tower in ("image", "text"):
    for k in ("width", "depth", "heads", "patch"):
      _check(cfg, f"model.{tower}.{k}", integer(1), "an integer >= 1")
    t = cfg.model[tower]
    if t.width % t.heads:
      raise ConfigError(
        f"config.model.{tower}.width={t.width} must be a multiple of "
        f"config.model.{tower}.heads={t.heads}"
      )
  if cfg.tokenizer.max_len % cfg.model.text.patch:
    raise ConfigError(
      f"config.tokenizer.max_len={cfg.tokenizer.max_len} must be a multiple "
      f"of config.model.text.patch={cfg.model.text.patch}"
    )
  _check(cfg, "data.image_size", integer(16), "a multiple of 4, >= 16")
  if cfg.data.image_size % 4 or cfg.data.image_size % cfg.model.image.patch:
    raise ConfigError(
      f"config.data.image_size={cfg.data.image_size} must be a multiple of 4 "
      f"and of config.model.image.patch={cfg.model.image.patch}"
    )
  if cfg.model.image.get("posemb") == "sincos2d" and cfg.model.image.width % 4:
    raise ConfigError(
      f"config.model.image.width={cfg.model.image.width} must be a multiple "
      "of 4 with posemb='sincos2d'"
    )
  _check(cfg, "optim.lr", number(0, math.inf, lo_open=True), "a number > 0")
  _check(cfg, "optim.end_lr_frac", number(0, 1), "a number in [0, 1]")
  _check(cfg, "optim.b1", number(0, 1, hi_open=True), "a number in [0, 1)")
  _check(cfg, "optim.b2", number(0, 1, hi_open=True), "a number in [0, 1)")
  _check(cfg, "optim.weight_decay", number(0, math.inf), "a number >= 0")
  _check(cfg, "optim.grad_clip", number(0, math.inf), "a number >= 0 (0 disables)")
  choices = {
    "positives": ("attributes", "diagonal"),
    "data.kind": ("shapes", "manifest"),
    "loss_schedule": ("bidirectional", "unidirectional"),
    "model.dtype": ("float32", "bfloat16"),
    "loss_implementation": (None, *siglip_fast.IMPLEMENTATIONS),
  }
  for key, allowed in choices.items():
    _check(cfg, key, lambda v, a=allowed: v in a, f"one of {allowed}")
  if not isinstance(cfg.get("loss_interpret", False), bool):
    raise ConfigError(f"config.loss_interpret={cfg.loss_interpret!r} must be True or False")
  if cfg.stop_at_step and cfg.stop_at_step > cfg.total_steps:
    raise ConfigError(
      f"config.stop_at_step={cfg.stop_at_step} must be 0 (off) or at most "
      f"config.total_steps={cfg.total_steps}"
    )
  if cfg.data.kind == "manifest":
    for key in ("train_manifest", "eval_manifest"):
      path = cfg.data[key]
      if not path:
        raise ConfigError(
          f"data.kind='manifest' needs data.train_manifest and "
          f"data.eval_manifest (CSV/TSV files of image,caption); "
          f"config.data.{key} is empty"
        )
      if not os.path.isfile(path):
        raise ConfigError(f"config.data.{key}={path!r}: no such file")
  if cfg.lock_image and not cfg.image_init and not _has_checkpoint(workdir):
    raise ConfigError(
      "config.lock_image=True (LiT) needs config.image_init: the workdir or "
      "checkpoint folder of a finished run whose image tower to lock"
    )


def _has_checkpoint(workdir):
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


# ---------------------------------------------------------------------------------------
# Pieces of a run.


def make_mesh(cfg):
  devices = jax.devices()
  if cfg.num_devices:
    if jax.process_count() > 1:
      raise ValueError("config.num_devices must be 0 (all devices) with several processes")
    if cfg.num_devices > len(devices):
      raise ValueError(
        f"config.num_devices={cfg.num_devices} but only {len(devices)} devices are visible"
      )
    devices = devices[: cfg.num_devices]
  if cfg.batch_size % len(devices):
    raise ValueError(
      f"config.batch_size={cfg.batch_size} must be divisible by the number "
      f"of devices ({len(devices)})"
    )
  return jax.sharding.Mesh(np.asarray(devices), (AXIS,))


class Data:
  """Training batches by step (this process's rows only) and the held-out evaluation set."""

  def __init__(self, cfg, tokenizer):
    self.cfg = cfg
    d = cfg.data
    if d.kind == "shapes":
      self.shapes = data_lib.Shapes(
        data_lib.ShapesSpec(
          image_size=d.image_size, seed=d.seed, n_train=d.n_train, n_val=d.n_val, n_test=d.n_test
        ),
        tokenizer,
      )
      self.n_train = d.n_train
      self.class_names = data_lib.class_names()
      self.templates = data_lib.zero_shot_templates()
    elif d.kind == "manifest":
      if not d.train_manifest or not d.eval_manifest:
        raise ValueError(
          "data.kind='manifest' needs data.train_manifest and "
          "data.eval_manifest (CSV/TSV files of image,caption)"
        )
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
    b = (
      self.shapes.batch("train", idx)
      if self.cfg.data.kind == "shapes"
      else self.train_set.batch(idx)
    )
    return {k: b[k] for k in ("image", "text", "ids")}

  def eval_batch(self, split="test") -> dict:
    if self.cfg.data.kind == "shapes":
      return self.shapes.batch(split, range(self.shapes.size(split)))
    return self.eval_set.batch(range(len(self.eval_set)))


def make_optimizer(cfg):
  o = cfg.optim
  warmup = min(o.warmup_steps, max(cfg.total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, o.lr, warmup, max(cfg.total_steps, warmup + 1), end_value=o.lr * o.end_lr_frac
  )
  # Decay matrices only: not biases, LayerNorm scales, t' or b.
  decay = lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay))
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
    raise ValueError(f"config.positives must be 'attributes' or 'diagonal', got {cfg.positives!r}")
  use_ids = cfg.positives == "attributes"

  def local_loss(params, image, text, ids):
    zimg, ztxt, log_t, bias = model.apply({"params": params}, image, text)
    return siglip_fast.sigmoid_loss(
      zimg,
      ztxt,
      log_t,
      bias,
      pair_ids=ids if use_ids else None,
      axis_name=AXIS,
      implementation=cfg.loss_implementation,
      schedule=cfg.loss_schedule,
      interpret=bool(cfg.get("loss_interpret", False)),
    )

  def loss_fn(trainable, frozen, batch):
    params = {**frozen, **trainable}
    # check_vma (the default) tracks which values vary over the axis, so the gradient of
    # the replicated parameters is summed over devices by autodiff, not by hand.
    return jax.shard_map(
      local_loss, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)), out_specs=P()
    )(params, batch["image"], batch["text"], batch["ids"])

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
    metrics = {
      "loss": loss,
      "t": jnp.exp(trainable["log_t"]),
      "b": trainable["bias"],
      "grad_norm": grad_norm,
    }
    return optax.apply_updates(trainable, updates), opt, metrics

  return jax.jit(
    step,
    donate_argnums=(0, 2),
    out_shardings=(repl, repl, repl),
    compiler_options=_fast_compile(cfg.get("fast_compile", False)),
  )


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
    # The bar and the count are of the whole run (a resumed run starts part-way along);
    # the rate and the ETA are of the steps this process has run.
    frac = step / max(self.total, 1)
    eta = (self.total - step) * self.batch / self.rate if self.rate == self.rate else 0
    bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
    line = (
      f"[{bar}] {step}/{self.total} loss {m['loss']:.4f} t {m['t']:.2f} "
      f"b {m['b']:.2f} {self.rate:.0f} ex/s eta {int(eta) // 60}:{int(eta) % 60:02d}"
    )
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
  shapes = jax.eval_shape(
    lambda k: src_model.init(k, jnp.zeros((1, s, s, 3)), jnp.zeros((1, src_tok.max_len), "int32")),
    jax.random.key(0),
  )["params"]
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), shapes)
  mngr = ckpt.manager(ckpt.checkpoint_dir(cfg.image_init), keep=None, create=False)
  params, _, _ = ckpt.restore(mngr, step, like)
  mngr.close()
  log(f"image tower from {cfg.image_init} (step {step}), locked={cfg.lock_image}")
  return params["img"], src


def _cfgdict(d):
  return ml_collections.ConfigDict(d)


@dataclasses.dataclass
class Run:
  """Everything ``set_up`` builds; ``restore`` and ``train_loop`` advance it."""

  cfg: Any
  workdir: str
  log: Callable[[str], None]
  is_main: bool
  verbose: bool
  mesh: Any
  mngr: Any
  tok: ByteTokenizer
  data: Any
  model: Any
  tx: Any
  schedule: Any
  trainable: dict
  frozen: dict
  opt: Any
  n_params: int
  n_frozen: int
  start: int = 0
  resumed_from: int | None = None
  seconds_before: float = 0.0  # training time of the earlier parts of a resumed run
  end: int = 0
  train_seconds: float = 0.0  # this part's training time
  writer: Any = None

  @property
  def params(self):
    return {**self.frozen, **self.trainable}

  @property
  def implementation(self):
    return self.cfg.loss_implementation or siglip_fast.default_implementation()

  def meta_at(self, step):
    return {
      "step": step,
      "config": json.loads(self.cfg.to_json_best_effort()),
      "tokenizer": self.tok.to_dict(),
      "data": {"seed": self.cfg.data.seed, "batch_size": self.cfg.batch_size, "next_step": step},
      "train_seconds": self.seconds_before + self.train_seconds,
    }


def set_up(cfg, workdir: str, *, verbose: bool = True) -> Run:
  """Validate, make the workdir, the mesh, data, model, optimiser and fresh parameters (or
  a locked image tower from ``cfg.image_init``). Nothing is read from the workdir's
  checkpoints but the config of a LiT run's locked tower."""
  validate_config(cfg, workdir)
  is_main = jax.process_index() == 0

  def log(msg):
    if verbose and is_main:
      print(msg, flush=True)

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(cfg)
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  mngr = ckpt.manager(os.path.join(workdir, "checkpoints"), keep=cfg.keep_ckpts)

  # A workdir that holds a checkpoint resumes from it; a locked image tower then comes
  # from that checkpoint too, so a LiT run resumes even if image_init has gone.
  image_tower, src = None, None
  if cfg.image_init and mngr.all_steps():
    src = _any_readable_meta(workdir, mngr.all_steps())
    src = src["config"] if src else None
  if src is None and cfg.image_init:
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
    jax.random.key(cfg.seed)
  )
  if image_tower is not None:
    params["img"] = image_tower
  trainable, frozen = split_params(params, cfg.lock_image)
  opt = jax.jit(tx.init, out_shardings=repl, compiler_options=_fast_compile())(trainable)
  count = lambda t: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(t))
  return Run(
    cfg=cfg,
    workdir=workdir,
    log=log,
    is_main=is_main,
    verbose=verbose,
    mesh=mesh,
    mngr=mngr,
    tok=tok,
    data=data,
    model=model,
    tx=tx,
    schedule=schedule,
    trainable=trainable,
    frozen=frozen,
    opt=opt,
    n_params=count(trainable),
    n_frozen=count(frozen),
  )


def _any_readable_meta(workdir, steps):
  for step in sorted(steps, reverse=True):
    try:
      return ckpt.read_meta(workdir, step)[1]
    except Exception:  # pylint: disable=broad-except  # restore() reports it
      continue
  return None


def restore(run: Run) -> Run:
  """Continue from the newest intact checkpoint of the workdir, if it has any.

  An unreadable checkpoint (a truncated array file, corrupt metadata) is moved to
  ``<workdir>/unreadable_checkpoints/`` (so the resumed run can write that step again) and
  reported in one line with the file and the step resumed from. A checkpoint written with a
  different model config raises ``CheckpointError`` naming the keys that differ; so does a
  workdir whose checkpoints are all unreadable (nothing is moved then)."""
  cfg = run.cfg
  steps = sorted(run.mngr.all_steps(), reverse=True)
  if not steps:
    return run
  directory = os.path.join(run.workdir, "checkpoints")
  like = run.params, run.opt
  bad = []  # (step, file, reason)
  for step in steps:
    try:
      _, meta = ckpt.read_meta(run.workdir, step)
    except Exception as e:  # pylint: disable=broad-except
      bad.append((step, *ckpt.describe_failure(e, directory, step, "meta")))
      continue
    diff = ckpt.config_diff(meta.get("config", {}), json.loads(cfg.to_json_best_effort()))
    if diff:
      raise CheckpointError(
        f"checkpoint at step {step} was written with a different config: "
        f"{'; '.join(diff)}. Use the checkpoint's values (its config is in "
        f"{run.workdir}/config.json), or a new --workdir to start afresh."
      )
    try:
      params, opt, meta = ckpt.restore(run.mngr, step, *like)
    except Exception as e:  # pylint: disable=broad-except
      bad.append((step, *ckpt.describe_failure(e, directory, step)))
      continue
    break
  else:
    what = "; ".join(f"step {s}: {f} ({why})" for s, f, why in bad)
    raise CheckpointError(
      f"no intact checkpoint in {directory}: {what}. Move or delete that folder to start "
      f"afresh (or use a new --workdir), or restore it from a backup."
    )

  run.trainable, run.frozen = split_params(params, cfg.lock_image)
  run.opt = opt
  run.start = run.resumed_from = int(meta["step"])
  run.seconds_before = float(meta.get("train_seconds", 0.0))
  if bad:
    moved = os.path.join(run.workdir, "unreadable_checkpoints")
    if run.is_main:
      os.makedirs(moved, exist_ok=True)
      for s, _, _ in bad:
        dest = os.path.join(moved, str(s))
        if os.path.exists(dest):
          dest += f".{int(time.time())}"
        shutil.move(os.path.join(directory, str(s)), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

      multihost_utils.sync_global_devices("siglip_fast.train: unreadable checkpoints moved")
    run.mngr.close()
    run.mngr = ckpt.manager(directory, keep=cfg.keep_ckpts)
    for s, f, why in bad:
      # Always said, even with verbose=False: files were moved.
      if run.is_main:
        print(
          f"warning: checkpoint at step {s} is unreadable ({f}: {why}); moved it to "
          f"{moved}/ and resumed from step {run.start}",
          file=sys.stderr,
          flush=True,
        )
  old = meta.get("data", {})
  if old.get("seed") != cfg.data.seed or old.get("batch_size") != cfg.batch_size:
    run.log(
      f"warning: data seed/batch size changed since the checkpoint ({old}); the data "
      "order will differ from the interrupted run"
    )
  run.log(
    f"resumed from step {run.start} ({run.seconds_before:.1f} s of training before); "
    f"{cfg.total_steps - run.start} steps to go"
  )
  return run


def train_loop(run: Run, *, profile: bool = False) -> Run:
  """Train from ``run.start`` to the end (``total_steps``, or ``stop_at_step``), saving
  checkpoints and metrics; raises ``NonFiniteLossError`` on a NaN/inf loss or gradient."""
  cfg, mesh, workdir, log = run.cfg, run.mesh, run.workdir, run.log
  if run.is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
    run.tok.save(os.path.join(workdir, "tokenizer.json"))
  interp = (
    " (Pallas interpret mode)" if cfg.get("loss_interpret") and run.implementation != "xla" else ""
  )
  log(
    f"{jax.process_count()} process(es), {mesh.size} device(s) ({jax.default_backend()}), "
    f"global batch {cfg.batch_size}, loss '{run.implementation}'{interp} ring over "
    f"{mesh.size} device(s); {run.n_params:,} trainable params"
    + (f", {run.n_frozen:,} locked" if run.n_frozen else "")
  )

  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  n_proc, proc = jax.process_count(), jax.process_index()
  train_step = make_train_step(run.model, run.tx, mesh, cfg)
  run.writer = writer = MetricWriter(workdir, run.is_main, run.resumed_from)
  run.end = end = (
    cfg.total_steps if not cfg.stop_at_step else min(cfg.stop_at_step, cfg.total_steps)
  )
  bar = Progress(run.start, cfg.total_steps, cfg.batch_size, enabled=run.verbose and run.is_main)
  last_ckpt = run.resumed_from
  profile_at = run.start + 2 if profile else None
  profile_dir = os.path.join(workdir, "profile")
  tracing = False
  trainable, frozen, opt = run.trainable, run.frozen, run.opt

  def to_global(local):
    return {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in local.items()}

  make = lambda step: run.data.train_batch(step, proc, n_proc)
  t_start = time.perf_counter()
  try:
    for step, local in _prefetch(make, range(run.start, end)):
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
        where = (
          f"the last checkpoint (step {last_ckpt}) is intact in {workdir}/checkpoints"
          if last_ckpt is not None
          else "no checkpoint had been written yet"
        )
        raise NonFiniteLossError(
          f"non-finite training loss or gradient at step {done} (loss={m['loss']}, "
          f"grad_norm={m['grad_norm']}); stopped without saving. {where}. Try a lower "
          "config.optim.lr or config.optim.grad_clip."
        )
      m["lr"] = float(run.schedule(step))
      bar.update(done, m)
      run.train_seconds = time.perf_counter() - t_start
      if done % cfg.log_every == 0 or done == end:
        rate = bar.rate if math.isfinite(bar.rate) else None
        writer.write(done, "train", {**m, "examples_per_s": rate})
      if done % cfg.ckpt_every == 0 or done == end:
        ckpt.save(run.mngr, done, {**frozen, **trainable}, opt, run.meta_at(done), force=True)
        last_ckpt = done
      if cfg.eval_every and done % cfg.eval_every == 0 and done != end:
        ev, _, _ = _evaluate(run.model, {**frozen, **trainable}, run.tok, run.data, cfg, "val")
        writer.write(done, "val", ev)
  except BaseException:
    writer.close()
    raise
  finally:
    if tracing:  # stopped mid-trace
      jax.profiler.stop_trace()
    run.mngr.wait_until_finished()
    run.mngr.close()
    run.trainable, run.opt = trainable, opt
  run.train_seconds = time.perf_counter() - t_start
  return run


def finish(run: Run) -> dict:
  """The held-out evaluation, eval.json and the plots (when the run reached total_steps);
  the result dict of ``train_and_evaluate``."""
  cfg, workdir, log = run.cfg, run.workdir, run.log
  total_seconds = run.seconds_before + run.train_seconds
  result = {
    "step": run.end,
    "resumed_from": run.resumed_from,
    "params": run.params,
    "opt": run.opt,
    "train_seconds": run.train_seconds,
    "train_seconds_total": total_seconds,
  }
  writer = run.writer
  if run.end < cfg.total_steps:
    log(f"stopped at step {run.end} (config.stop_at_step); run again to resume")
    writer.close()
    return result

  ev, zi, zt = _evaluate(run.model, run.params, run.tok, run.data, cfg, "test")
  # Training time over all parts of the run (a resumed run adds the time before the
  # interruption, from the checkpoint); this part's time alongside.
  ev["train_seconds"] = total_seconds
  ev["train_seconds_this_part"] = run.train_seconds
  writer.write(run.end, "test", ev)
  writer.close()
  result["eval"] = ev
  if run.is_main:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(ev, f, indent=2)
    rows = writer.read("train")
    if rows:
      plots.loss_curve(
        [r["step"] for r in rows], [r["loss"] for r in rows], os.path.join(workdir, "loss.png")
      )
    eb = run.data.eval_batch("test")
    k = min(cfg.plot_pairs, len(zi))
    plots.similarity_matrix(
      zi[:k],
      zt[:k],
      eb["caption"][:k],
      os.path.join(workdir, "similarity.png"),
      images=eb["image"][:k],
    )
  trained = (
    f"{run.train_seconds:.1f} s"
    if run.resumed_from is None
    else f"{run.train_seconds:.1f} s since resuming at step {run.resumed_from}, "
    f"{total_seconds:.1f} s in all"
  )
  log(
    f"held-out evaluation after {run.end} steps ({ev['n_eval']} pairs; trained {trained}):\n"
    + evaluate.summary(ev)
  )
  log(f"outputs in {workdir}: checkpoints/, metrics.jsonl, eval.json, loss.png, similarity.png")
  return result


def train_and_evaluate(cfg, workdir: str, *, profile: bool = False, verbose: bool = True):
  """Train (or resume) in ``workdir``, then evaluate on the held-out split.

  Returns a dict: ``step``, ``resumed_from`` (None or a step), ``eval`` (held-out metrics;
  absent when stopped early), ``params`` (the full parameter tree), ``opt`` (the optimiser
  state, of the trainable parameters only), ``train_seconds`` (this part's training time)
  and ``train_seconds_total`` (all parts of a resumed run).
  """
  run = set_up(cfg, workdir, verbose=verbose)
  try:
    restore(run)
  except BaseException:
    run.mngr.close()
    raise
  train_loop(run, profile=profile)
  return finish(run)


def _evaluate(model, params, tok, data, cfg, split):
  embed_images, embed_texts = evaluate.make_embedders(model, params, tok, cfg.eval_batch_size)
  return evaluate.evaluate_pairs(
    embed_images, embed_texts, data.eval_batch(split), data.class_names, data.templates
  )

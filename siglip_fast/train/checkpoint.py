"""Checkpoints with orbax: model parameters, optimiser state and a JSON record, per step.

Layout: ``<workdir>/checkpoints/<step>/{params,opt,meta}``. Orbax writes each step into a
temporary folder and renames it when complete, so a run killed mid-save leaves the previous
checkpoint intact and no half-written one that ``latest_step`` would pick up. ``params`` holds
the whole model (locked towers included), so any checkpoint can seed a LiT run or be
evaluated on its own; ``meta`` holds the step, the config, the tokenizer and the data state.
"""

from __future__ import annotations

import json
import os
import re

import jax
import orbax.checkpoint as ocp

ITEMS = ("params", "opt", "meta")


def checkpoint_dir(path: str) -> str:
  """``path`` itself if it holds step folders, else ``path/checkpoints`` (a run's workdir)."""
  path = os.path.abspath(os.fspath(path))
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def manager(directory: str, *, keep: int | None = 2, create: bool = True) -> ocp.CheckpointManager:
  """A synchronous manager; ``keep`` most recent steps are kept (None: all). Readers pass
  ``create=False, keep=None``: nothing is written or deleted unless ``save`` is called."""
  opts = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=create, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=opts, item_names=ITEMS)


def save(
  mngr: ocp.CheckpointManager, step: int, params, opt, meta: dict, *, force: bool = False
) -> bool:
  return mngr.save(
    step,
    force=force,
    args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt=ocp.args.StandardSave(opt),
      meta=ocp.args.JsonSave(meta),
    ),
  )


def _abstract(tree):
  # Restore into the shardings of the live arrays (replicated over the mesh).
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def restore(mngr: ocp.CheckpointManager, step: int, params_like, opt_like=None):
  """(params, opt or None, meta) at ``step``, with the shapes and shardings of the ``*_like``."""
  args = {
    "params": ocp.args.StandardRestore(_abstract(params_like)),
    "meta": ocp.args.JsonRestore(),
  }
  if opt_like is not None:
    args["opt"] = ocp.args.StandardRestore(_abstract(opt_like))
  out = mngr.restore(step, args=ocp.args.Composite(**args))
  return out["params"], (out["opt"] if opt_like is not None else None), out["meta"]


def read_meta(path: str, step: int | None = None) -> tuple[int, dict]:
  """(step, meta) of the latest (or given) checkpoint under ``path``; a clear error if none."""
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint directory at {path}")
  mngr = manager(directory, keep=None, create=False)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint under {directory}")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  mngr.close()
  return step, meta


# Config keys that decide the shapes and structure of the saved parameters and optimiser
# state: a checkpoint written with other values cannot be restored into this run's model.
# (t' and b's initial values do not matter once trained; grad_clip only by being on or off.)
STATE_KEYS = ("model", "tokenizer", "data.image_size", "lock_image", "optim.grad_clip")
_IGNORED = ("model.log_t_init", "model.bias_init")


def _flatten(d, prefix=""):
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def config_diff(saved: dict, current: dict) -> list[str]:
  """``["model.embed_dim: 16 in the checkpoint, 24 now", ...]`` over ``STATE_KEYS``."""
  a, b = _flatten(saved), _flatten(current)
  relevant = lambda k: (
    k not in _IGNORED and any(k == p or k.startswith(p + ".") for p in STATE_KEYS)
  )
  diffs = []
  for k in sorted(k for k in set(a) | set(b) if relevant(k)):
    x, y = a.get(k), b.get(k)
    if k == "optim.grad_clip":
      x, y = bool(x), bool(y)
    if x != y:
      diffs.append(f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now")
  return diffs


def _chain(e: BaseException):
  seen = []
  while e is not None and e not in seen:
    seen.append(e)
    e = e.__cause__ or e.__context__
  return seen


def _invalid_json(step_dir: str) -> str | None:
  """The first of the step's JSON metadata files that does not parse, if any."""
  for root, _, files in sorted(os.walk(step_dir)):
    for name in sorted(files):
      if name in ("_CHECKPOINT_METADATA", "_METADATA", "metadata"):
        path = os.path.join(root, name)
        try:
          with open(path) as f:
            json.load(f)
        except (ValueError, OSError):
          return path
  return None


def describe_failure(
  e: BaseException, directory: str, step: int, item: str | None = None
) -> tuple[str, str]:
  """(file, reason) for a failed restore of ``step``: the file under the step's folder that
  broke it (named by the error, found by the size the error reports for a truncated array
  file, or a metadata file that is not valid JSON), and a one-line reason. The file is
  relative to ``directory``'s parent (the workdir)."""
  directory = os.path.abspath(directory)
  step_dir = os.path.join(directory, str(step))
  text = "\n".join(str(x) for x in _chain(e))
  inner = _chain(e)[-1]
  reason = (str(inner).strip().splitlines() or [""])[0]
  reason = f"{type(inner).__name__}: {reason}" if reason else type(inner).__name__
  path = None
  m = re.search(re.escape(step_dir) + r"(/[^\s'\"\],:;)]*)?", text)
  if m and m.group(1) and m.group(1).strip("/"):
    path = os.path.join(step_dir, m.group(1).strip("/"))
  t = re.search(
    r'Error reading "([^"]+)".*?Requested byte range \[(\d+), (\d+)\) is not '
    r"valid for value of size (\d+)",
    text,
    re.S,
  )
  if t:
    key, _, hi, size = t.groups()
    reason = f"truncated: {size} bytes, array {key!r} needs bytes up to {hi}"
    if path and os.path.isdir(path):  # an OCDBT database: its data file of that size
      hits = [
        os.path.join(r, f)
        for r, _, fs in os.walk(path)
        for f in fs
        if os.path.getsize(os.path.join(r, f)) == int(size)
      ]
      if len(hits) == 1:
        path = hits[0]
  if path is None or os.path.isdir(path):
    bad_json = _invalid_json(step_dir)
    if bad_json:
      path, reason = bad_json, f"corrupt metadata, not valid JSON ({reason})"
  if path is None:
    path = os.path.join(step_dir, item) if item else step_dir
  where = os.path.relpath(path, os.path.dirname(directory))
  if len(reason) > 200:
    reason = reason[:197] + "..."
  return where, reason

"""Checkpoints with orbax: model parameters, optimiser state and a JSON record, per step.

Layout: ``<workdir>/checkpoints/<step>/{params,opt,meta}``. Orbax writes each step into a
temporary folder and renames it when complete, so a run killed mid-save leaves the previous
checkpoint intact and no half-written one that ``latest_step`` would pick up. ``params`` holds
the whole model (locked towers included), so any checkpoint can seed a LiT run or be
evaluated on its own; ``meta`` holds the step, the config, the tokenizer and the data state.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

ITEMS = ("params", "opt", "meta")


def checkpoint_dir(path: str) -> str:
  """``path`` itself if it holds step folders, else ``path/checkpoints`` (a run's workdir)."""
  path = os.path.abspath(os.fspath(path))
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def manager(directory: str, *, keep: int | None = 2,
            create: bool = True) -> ocp.CheckpointManager:
  """A synchronous manager; ``keep`` most recent steps are kept (None: all). Readers pass
  ``create=False, keep=None``: nothing is written or deleted unless ``save`` is called."""
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=opts, item_names=ITEMS)


def save(mngr: ocp.CheckpointManager, step: int, params, opt, meta: dict, *,
         force: bool = False) -> bool:
  return mngr.save(step, force=force, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt=ocp.args.StandardSave(opt),
      meta=ocp.args.JsonSave(meta)))


def _abstract(tree):
  # Restore into the shardings of the live arrays (replicated over the mesh).
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                      tree)


def restore(mngr: ocp.CheckpointManager, step: int, params_like, opt_like=None):
  """(params, opt or None, meta) at ``step``, with the shapes and shardings of the ``*_like``."""
  args = {"params": ocp.args.StandardRestore(_abstract(params_like)),
          "meta": ocp.args.JsonRestore()}
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

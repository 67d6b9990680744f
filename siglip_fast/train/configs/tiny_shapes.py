r"""A smoke run: tiny towers, tiny images, four steps; seconds, not minutes.

  python -m siglip_fast.train --config siglip_fast/train/configs/tiny_shapes.py --workdir /tmp/smoke

With ``:lit`` it is the LiT variant (set ``--config.image_init`` to a finished run's workdir,
e.g. the smoke run above). The tests use these configs.
"""

from siglip_fast.train.configs import clip_shapes, lit_shapes


def get_config(arg=None):
  c = lit_shapes.get_config() if arg == "lit" else clip_shapes.get_config()
  c.total_steps = 4
  c.batch_size = 16
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
  c.fast_compile = True  # compile time dominates runs this short
  return c

r"""LiT: a locked image tower from a finished CLIP run, a text tower trained from scratch.

First run the main job (siglip_fast/train/configs/clip_shapes.py), then:

  python -m siglip_fast.train --config siglip_fast/train/configs/lit_shapes.py \
      --config.image_init=/tmp/siglip_clip --workdir /tmp/siglip_lit

The image tower (architecture and weights) comes from the latest checkpoint under
``image_init``; it gets no gradients and no optimiser state.
"""

from siglip_fast.train.configs import clip_shapes


def get_config(arg=None):
  c = clip_shapes.get_config(arg)
  c.image_init = ""  # required: the CLIP run's workdir (or its checkpoints/ folder)
  c.lock_image = True
  c.total_steps = 300
  c.optim.lr = 3e-3
  return c

r"""CLIP-style SigLIP from scratch on the embedded coloured-shapes data (the main job).

Both towers train; no download, about 3 minutes on a 2-core CPU:

  python -m siglip_fast.train --workdir /tmp/siglip_clip

Shorter, or other settings, with overrides:

  python -m siglip_fast.train --workdir /tmp/siglip_try --config.total_steps=20 \
      --config.batch_size=64 --config.optim.lr=3e-3

Run it again with the same --workdir to resume from the last checkpoint.
"""

import math

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init
  c.total_steps = 700
  c.batch_size = 256  # global, split over all devices of all processes
  c.stop_at_step = 0  # > 0: stop there as if pre-empted (resume later with the same command)
  c.num_devices = 0  # 0: every device; n: the first n (single process only)

  # The loss: the paper's chunked ring over the mesh's batch axis (section 3.3).
  c.loss_implementation = config_dict.placeholder(str)  # None: best for the backend
  # True: run the Pallas kernel of loss_implementation ("pallas_tpu", "pallas_gpu") in
  # interpret mode, e.g. to train through the kernel on a CPU (slow; for checking).
  c.loss_interpret = False
  c.loss_schedule = "bidirectional"
  c.positives = "attributes"  # or "diagonal": which pairs in a batch count as matches

  c.data = ml_collections.ConfigDict()
  c.data.kind = "shapes"  # or "manifest" (CSV/TSV of image,caption[,label])
  c.data.seed = 0
  c.data.image_size = 32
  c.data.n_train = 50_000
  c.data.n_val = 512
  c.data.n_test = 1024
  c.data.train_manifest = ""
  c.data.eval_manifest = ""

  c.tokenizer = ml_collections.ConfigDict({"max_len": 48})

  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 64
  # Patches of 8 x 8 pixels (16 tokens) and of 4 bytes: per unit of CPU time these learned
  # faster than 4 x 4 pixels or 2 bytes in our trials. Fixed sin-cos positions and mean
  # pooling learned the quadrant sooner than learned positions or attention pooling.
  c.model.image = ml_collections.ConfigDict(
    {"patch": 8, "width": 64, "depth": 2, "heads": 4, "pool": "gap", "posemb": "sincos2d"}
  )
  c.model.text = ml_collections.ConfigDict({"width": 64, "depth": 2, "heads": 4, "patch": 4})
  c.model.log_t_init = math.log(10.0)  # the paper's t' = log 10
  c.model.bias_init = -10.0  # the paper's b = -10
  c.model.dtype = "float32"

  c.image_init = ""  # a workdir or checkpoint dir whose image tower seeds this run (LiT)
  c.lock_image = False  # LiT: no gradients and no optimiser state for the image tower

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 50
  c.optim.end_lr_frac = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95  # the paper's choice for stable large-batch training
  c.optim.weight_decay = 1e-4
  c.optim.grad_clip = 1.0  # global norm; 0 disables

  c.log_every = 10  # metrics.jsonl rows
  c.ckpt_every = 100
  c.keep_ckpts = 2
  c.eval_every = 0  # 0: only at the end
  c.eval_batch_size = 256
  c.plot_pairs = 12  # held-out pairs in similarity.png
  c.profile_steps = 5  # traced with --profile
  c.fast_compile = False  # True: XLA -O0, compiles about 2x faster, runs slower (smoke tests)
  return c

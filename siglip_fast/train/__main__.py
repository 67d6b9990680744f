r"""``python -m siglip_fast.train``: the command line of the trainer (absl flags).

The main job (embedded coloured-shapes data, nothing downloaded):

  python -m siglip_fast.train --workdir /tmp/siglip_clip

LiT from that run's image tower:

  python -m siglip_fast.train --config siglip_fast/train/configs/lit_shapes.py \
      --config.image_init=/tmp/siglip_clip --workdir /tmp/siglip_lit

Any config field can be overridden (``--config.total_steps=20``). Running again with the same
workdir resumes from its latest intact checkpoint. Several hosts: start one process per host
with ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (``jax.distributed``),
or ``--distributed_auto`` on clusters JAX detects by itself (Cloud TPU, SLURM, ...).
"""

from __future__ import annotations

# Before jax initialises a backend: no libtpu probing noise on machines without a TPU.
from siglip_fast import _quiet

_quiet.quiet_start()

import os  # noqa: E402
import sys  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from siglip_fast.train import data as data_lib  # noqa: E402
from siglip_fast.train import trainer  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "clip_shapes.py")
config_flags.DEFINE_config_file(
  "config", _DEFAULT_CONFIG, "Training configuration file.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_bool(
  "profile",
  False,
  "Capture a jax.profiler trace of a few steps into "
  "WORKDIR/profile (config.profile_steps steps, after compilation).",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", 1, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", 0, "This process's index (multi-host).")
flags.DEFINE_bool(
  "distributed_auto", False, "Call jax.distributed.initialize() with cluster auto-detection."
)
flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for all processes.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  F = flags.FLAGS
  if not F["verbosity"].present:  # keep orbax's INFO chatter out of the progress output
    logging.set_verbosity(logging.WARNING)
  try:
    # Before anything is written or any device is touched.
    trainer.validate_config(F.config, F.workdir)
    trainer.setup_distributed(
      F.coordinator_address,
      F.num_processes,
      F.process_id,
      F.distributed_auto,
      F.distributed_timeout,
    )
    trainer.train_and_evaluate(F.config, F.workdir, profile=F.profile)
  except (trainer.UserError, data_lib.DataError) as e:  # what the user can fix: one line
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)

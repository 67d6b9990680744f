"""siglip-fast: fused Pallas kernels for the SigLIP pairwise sigmoid loss.

    loss = siglip_fast.sigmoid_loss(img_emb, txt_emb, log_t, bias)

See ``siglip_fast.loss`` for the implementations and ``siglip_fast.reference`` for the oracle.
"""

from siglip_fast.loss import (IMPLEMENTATIONS, block_ops, default_implementation,
                              sigmoid_loss, sigmoid_loss_sharded)
from siglip_fast import mesh
from siglip_fast.module import SigmoidLoss

__all__ = [
    "IMPLEMENTATIONS", "SigmoidLoss", "mesh", "block_ops", "default_implementation", "sigmoid_loss",
    "sigmoid_loss_sharded",
]
__version__ = "0.1.0"

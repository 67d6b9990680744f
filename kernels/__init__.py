"""Pallas kernels for the SigLIP block loss: Mosaic TPU and Triton GPU.

Each kernel module exposes ``block_ops(*, interpret, block_sizes, target) -> siglip_fast.ring.BlockOps``; a whole-ring kernel module exposes ``ring_trip(...)`` (see ``siglip_fast.loss.REGISTRY``).
"""

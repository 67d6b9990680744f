"""Pallas kernels for the SigLIP block loss: Mosaic TPU and Triton GPU.

Each kernel module exposes ``block_ops(*, interpret, block_sizes) -> reference.BlockOps``.
"""

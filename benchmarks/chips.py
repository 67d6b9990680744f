"""Peak figures of the chips the utilisation report compares against, with their sources.

Per chip: dense bf16 matmul FLOP/s, HBM bandwidth, and the interconnect as the ring sees it:
``link_bw``, one-way bytes/s to one ring neighbour, and ``egress_bw``, one-way bytes/s out of
the chip in total (what a bidirectional ring, sending to both neighbours at once, shares).

- TPU: Google Cloud gives per-chip bidirectional ICI bandwidth and the port count; one port,
  one direction, is that divided by 2 * ports. A ring neighbour on the same torus axis is one
  port away, so ``link_bw`` is one port and ``egress_bw`` all ports. v4's page gives no ICI
  figure: its per-link number is the one in "How to Scale Your Model" (jax-ml), which agrees
  with the Cloud figures for the other generations.
- H100 / H200 SXM: NVLink 4 is 900 GB/s bidirectional over 18 links through NVSwitch, so any
  neighbour is reachable at the full 450 GB/s one way, shared by every destination.
  NVIDIA quotes bf16 Tensor Core throughput with 2:4 sparsity; dense is half.

These are datasheet peaks: a report's "fraction of peak" is against them, and its modelled
times (max of FLOPs / peak, bytes / HBM bandwidth, wire bytes / link bandwidth) are lower
bounds, not predictions.
"""

from __future__ import annotations

import dataclasses

_TPU_DOCS = "https://cloud.google.com/tpu/docs/"
_SCALING_BOOK = "https://jax-ml.github.io/scaling-book/tpus/ (jax-ml/scaling-book, tpus.md)"


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  description: str
  bf16_flops: float  # peak dense bf16 FLOP/s per chip
  hbm_bw: float  # HBM bytes/s per chip
  link_bw: float  # one-way bytes/s to one ring neighbour
  egress_bw: float  # one-way bytes/s out of the chip, all links together
  links: int  # ICI ports / NVLink links per chip
  matmul_unit: str  # what "compute bound" means on this chip
  wire: str  # the interconnect's name
  device_kinds: tuple[str, ...]  # jax Device.device_kind strings of this chip
  topology: str | None  # a 4-chip compile-only topology (jax.experimental.topologies)
  sources: tuple[str, ...]

  @property
  def ridge(self) -> float:
    """FLOP per HBM byte above which a kernel is compute bound, not HBM bound."""
    return self.bf16_flops / self.hbm_bw


CHIPS: dict[str, Chip] = {
  c.name: c
  for c in (
    Chip(
      "v4",
      "TPU v4 (2 TensorCores per chip)",
      275e12,
      1200e9,
      45e9,
      6 * 45e9,
      6,
      "MXU",
      "ICI",
      ("TPU v4",),
      "v4:2x2x1",
      (
        _TPU_DOCS + "v4: 275 TFLOP/s bf16, HBM2 32 GiB at 1200 GBps",
        _SCALING_BOOK + ": TPU v4p ICI 4.5e10 bytes/s per link one-way; 3D torus, 6 links",
      ),
    ),
    Chip(
      "v5e",
      "TPU v5e (1 TensorCore per chip)",
      197e12,
      819e9,
      50e9,
      4 * 50e9,
      4,
      "MXU",
      "ICI",
      ("TPU v5 lite", "TPU v5e"),
      "v5e:2x2",
      (
        _TPU_DOCS + "v5e: 197 TFLOP/s bf16, HBM2 16 GB at 819 GBps, 400 GBps "
        "bidirectional ICI per chip, 4 ICI ports",
        _SCALING_BOOK + ": TPU v5e ICI 5e10 bytes/s per link one-way",
      ),
    ),
    Chip(
      "v5p",
      "TPU v5p (2 TensorCores per chip)",
      459e12,
      2765e9,
      100e9,
      6 * 100e9,
      6,
      "MXU",
      "ICI",
      ("TPU v5", "TPU v5p"),
      "v5p:2x2x1",
      (
        _TPU_DOCS + "v5p: 459 TFLOP/s bf16, HBM2e 95 GB at 2765 GBps, 1200 GBps "
        "bidirectional ICI per chip, 3D torus (6 ports)",
        _SCALING_BOOK + ": TPU v5p ICI 1e11 bytes/s per link one-way",
      ),
    ),
    Chip(
      "v6e",
      "TPU v6e Trillium (1 TensorCore per chip)",
      918e12,
      1638e9,
      100e9,
      4 * 100e9,
      4,
      "MXU",
      "ICI",
      ("TPU v6 lite", "TPU v6e"),
      "v6e:2x2",
      (
        _TPU_DOCS + "v6e: 918 TFLOP/s bf16, 32 GB HBM at 1638 GBps, 800 GBps "
        "bidirectional ICI per chip, 4 ICI ports",
        _SCALING_BOOK + ": TPU v6e ICI 1e11 bytes/s per link one-way",
      ),
    ),
    Chip(
      "h100",
      "NVIDIA H100 SXM5 80GB",
      989e12,
      3.35e12,
      450e9,
      450e9,
      18,
      "tensor cores",
      "NVLink",
      ("NVIDIA H100 80GB HBM3",),
      None,
      (
        "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM datasheet): BF16 Tensor "
        "Core 1,979 TFLOPS with sparsity (989 dense), 3.35 TB/s HBM3, NVLink 900 GB/s",
        "NVLink 4: 18 links, 900 GB/s bidirectional = 450 GB/s one way",
      ),
    ),
    Chip(
      "h200",
      "NVIDIA H200 SXM 141GB",
      989e12,
      4.8e12,
      450e9,
      450e9,
      18,
      "tensor cores",
      "NVLink",
      ("NVIDIA H200",),
      None,
      (
        "https://www.nvidia.com/en-us/data-center/h200/ (H200 datasheet): same Hopper "
        "tensor cores as H100 (1,979 TFLOPS bf16 with sparsity), 4.8 TB/s HBM3e, "
        "NVLink 900 GB/s",
      ),
    ),
  )
}

TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")


def chip_for_device_kind(device_kind: str) -> Chip | None:
  """The chip of a jax ``Device.device_kind``, or None when the table has no such chip.

  GPUs match exactly (an "NVIDIA H100 PCIe" has other peaks than the SXM part); TPU kinds
  also match by prefix, the longest winning, so "TPU v5 lite" is never taken for "TPU v5".
  """
  for chip in CHIPS.values():
    if device_kind in chip.device_kinds:
      return chip
  best = None
  for chip in CHIPS.values():
    for kind in chip.device_kinds:
      if (
        kind.startswith("TPU")
        and device_kind.startswith(kind)
        and (best is None or len(kind) > len(best[0]))
      ):
        best = (kind, chip)
  return best[1] if best else None


def one_device_per_chip(devices):
  """One device per chip, and the TensorCores per chip: compile-only v4/v5p topologies list
  each TensorCore as a device, while a ring runs over chips."""
  seen, out = set(), []
  for d in devices:
    key = tuple(getattr(d, "coords", ()) or (d.id,))
    if key not in seen:
      seen.add(key)
      out.append(d)
  return out, max(1, len(devices) // len(out))

"""A mesh whose ring axis is a physical ring of chips.

The ring passes each text chunk to the next device on the axis, and the last device's to the
first. ``jax.devices()`` lists TPU chips in coordinate order, which is not a ring on a 2-D or
3-D slice: on a 2x2 slice, raw order makes two of the four ring edges diagonal, and every
diagonal hop is routed over two links, sharing them with other hops. ``ring_mesh`` orders the
devices so that consecutive devices, and the last and the first, are neighbours on the
interconnect wherever the slice shape allows such a cycle (every slice with an even number of
chips along some axis).
"""

from __future__ import annotations


import jax
import numpy as np


def _position(d):
  coords = getattr(d, "coords", None)
  if coords is None:
    return None
  return tuple(coords) + (getattr(d, "core_on_chip", 0),)


def _neighbours(a, b) -> bool:
  # One link apart (no torus wrap assumed: a grid edge is a link on every slice), or two
  # cores of one chip.
  *ca, ka = a
  *cb, kb = b
  dist = sum(abs(i - j) for i, j in zip(ca, cb))
  return dist == 1 and ka == kb or dist == 0 and ka != kb


def _hamiltonian_cycle(points):
  """A cycle through all points with neighbouring consecutive points, or None."""
  n = len(points)
  if n <= 2:
    return list(range(n))
  adj = [[j for j in range(n) if j != i and _neighbours(points[i], points[j])] for i in range(n)]
  path, seen = [0], [False] * n
  seen[0] = True
  budget = [200_000]  # slices have at most a few hundred chips; bound the search anyway

  def extend():
    budget[0] -= 1
    if budget[0] < 0:
      return False
    if len(path) == n:
      return 0 in adj[path[-1]]
    # Warnsdorff: try the neighbour with the fewest free neighbours first.
    nxt = sorted(
      (j for j in adj[path[-1]] if not seen[j]), key=lambda j: sum(not seen[k] for k in adj[j])
    )
    for j in nxt:
      seen[j] = True
      path.append(j)
      if extend():
        return True
      path.pop()
      seen[j] = False
    return False

  return list(path) if extend() else None


def ring_order(devices):
  """``devices`` reordered as a physical ring where one exists; otherwise (devices without
  coordinates, such as CPUs and GPUs, or slice shapes with no such cycle) as given."""
  devices = list(devices)
  points = [_position(d) for d in devices]
  if any(p is None for p in points) or len(set(points)) != len(points):
    return devices
  order = sorted(range(len(devices)), key=lambda i: points[i])
  cycle = _hamiltonian_cycle([points[i] for i in order])
  if cycle is None:
    return devices
  return [devices[order[i]] for i in cycle]


def is_ring(devices) -> bool | None:
  """Whether consecutive devices (and the last and first) are interconnect neighbours; None
  when the devices have no coordinates."""
  points = [_position(d) for d in devices]
  if any(p is None for p in points):
    return None
  return (
    all(_neighbours(a, b) for a, b in zip(points, points[1:] + points[:1]))
    if len(points) > 2
    else True
  )


def ring_mesh(axis_name: str = "batch", devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over ``devices`` (default: all) on ``axis_name``, in physical ring order."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(ring_order(devices), dtype=object), (axis_name,))


__all__ = ["is_ring", "ring_mesh", "ring_order"]

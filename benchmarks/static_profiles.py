"""The rows of ``python -m benchmarks.tpu_profile`` JSON files, as both reports read them
(``tpu_profile --compare`` and the utilisation report's static column)."""

from __future__ import annotations

import json
import pathlib


def load_static_profiles(paths) -> list[dict]:
  """The rows of tpu_profile JSONs; a case profiled in several files (same generation,
  kernel, B, D, ring devices) keeps the rows of the last file, all of its ops (their
  numbering, and the number of calls, may differ from file to file)."""
  cases: dict[tuple, list[dict]] = {}
  for path in paths:
    fresh: dict[tuple, list[dict]] = {}
    for r in json.loads(pathlib.Path(path).read_text())["rows"]:
      key = (
        r.get("generation"),
        r.get("kernel"),
        r.get("batch"),
        r.get("dim"),
        r.get("ring_devices"),
      )
      fresh.setdefault(key, []).append(r)
    cases.update(fresh)
  return [r for rows in cases.values() for r in rows]

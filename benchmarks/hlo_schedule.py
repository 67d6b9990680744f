"""Reading a compiled program's schedule from its HLO text (``compiled.as_text()``): the
computations in schedule order, and what XLA placed while each collective permute is in
flight. Shared by ``benchmarks.ring_compare`` and ``benchmarks.driver_schedule``."""

from __future__ import annotations

import dataclasses
import re

ENTRY = "ENTRY:"


def computations(hlo: str) -> dict[str, list[str]]:
  """{computation name: its instruction lines, in schedule order}; the entry's name starts
  with ``ENTRY:``."""
  comps: dict[str, list[str]] = {}
  current = None
  for line in hlo.splitlines():
    if not line.startswith(" "):
      m = re.match(r"(ENTRY )?%?([\w.\-]+)", line)
      current = None
      if m and line.rstrip().endswith("{"):
        current = comps.setdefault((ENTRY if m.group(1) else "") + m.group(2), [])
      continue
    if current is not None:
      current.append(line)
  return comps


def name(line: str) -> str:
  """The instruction an HLO line defines."""
  return line.split("=", 1)[0].strip().removeprefix("ROOT ").strip().lstrip("%")


def is_op(line: str, opcode: str) -> bool:
  return f" {opcode}(" in line


def started_by(line: str) -> str:
  """The start instruction a ``collective-permute-done`` line waits for."""
  return line.split("collective-permute-done(", 1)[1].split(")", 1)[0].lstrip("%")


def result_type(line: str) -> str:
  """The (first) result type of an HLO line, e.g. ``bf16[4096,1152]{1,0:T(8,128)(2,1)}``."""
  return line.split("=", 1)[1].split()[0].strip("(,")


@dataclasses.dataclass(frozen=True)
class Window:
  """One collective permute: its start and done instructions (done None if it is not in
  the same computation), the start's result type, and the lines scheduled between them."""

  computation: str
  start: str
  done: str | None
  result_type: str
  between: tuple[str, ...]


def permute_windows(hlo: str) -> list[Window]:
  """Every collective permute of every computation, in order of its start. A while loop's
  body is a computation of its own: its permutes are listed once, and what runs in it
  does not count for a permute outside it."""
  windows = []
  for comp, lines in computations(hlo).items():
    for i, line in enumerate(lines):
      if not is_op(line, "collective-permute-start"):
        continue
      start = name(line)
      done = next(
        (
          j
          for j in range(i + 1, len(lines))
          if is_op(lines[j], "collective-permute-done") and started_by(lines[j]) == start
        ),
        None,
      )
      end = len(lines) if done is None else done
      windows.append(
        Window(
          computation=comp,
          start=start,
          done=None if done is None else name(lines[done]),
          result_type=result_type(line),
          between=tuple(lines[i + 1 : end]),
        )
      )
  return windows

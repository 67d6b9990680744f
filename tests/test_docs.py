"""Every Python code block in README.md and docs/*.md runs, as written, in a fresh process.

A reader copies these blocks first; each must be complete (its imports, its mesh, its data)
and must work on a CPU-only machine with the project installed. Blocks run from the
repository root with the test suite's 8 simulated CPU devices. Shell blocks are not run here
(the commands they show are exercised by the tests of the scripts they call).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
  for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
    text = path.read_text(encoding="utf-8")
    for m in _BLOCK.finditer(text):
      line = text[: m.start()].count("\n") + 1
      yield pytest.param(m.group(1), id=f"{path.relative_to(ROOT)}:{line}")


BLOCKS = list(_blocks())


def test_there_are_blocks_to_run():
  assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS)
def test_block_runs(code):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    TPU_SKIP_MDS_QUERY="1",
    ALLOW_MULTIPLE_LIBTPU_LOAD="1",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, f"block failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"

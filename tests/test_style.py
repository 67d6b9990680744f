"""Formatting and lint, as configured in pyproject.toml ([tool.ruff]): ruff format and ruff
check over the whole tree. ruff comes with the dev extra; without it the test skips, unless
the CI environment variable is set: then it fails."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ruff():
  if importlib.util.find_spec("ruff") is None:
    if os.environ.get("CI"):
      pytest.fail("ruff is not installed (pip install -e '.[dev]')")
    pytest.skip("ruff is not installed (pip install -e '.[dev]')")
  return [sys.executable, "-m", "ruff"]


def test_formatted(ruff):
  proc = subprocess.run(
    ruff + ["format", "--check", "--diff", "."],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 0, f"run `ruff format .`:\n{proc.stdout[-4000:]}{proc.stderr}"


def test_lint_clean(ruff):
  proc = subprocess.run(
    ruff + ["check", "--output-format", "concise", "."],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 0, f"ruff check:\n{proc.stdout[-4000:]}{proc.stderr}"

"""The main of every Bazel ``py_test`` in BUILD: runs pytest on the file named in ``args``.

Bazel runs a py_test as a script, and the tests are pytest modules, so each py_test passes its
test file as an argument and this runs pytest on it. Bazel's test environment maps onto
pytest's options: JUnit XML where Bazel collects it, temporary files under TEST_TMPDIR,
``--test_filter`` as ``-k``, and no cache (the runfiles tree is read-only). Extra arguments
(``bazel test //:test_api --test_arg=--runslow``) pass straight to pytest.
"""

import os
import sys

import pytest


def pytest_args(argv, env) -> list[str]:
  args = list(argv) + ["-p", "no:cacheprovider"]
  if env.get("XML_OUTPUT_FILE"):
    args.append(f"--junitxml={env['XML_OUTPUT_FILE']}")
  if env.get("TEST_TMPDIR"):
    args.append(f"--basetemp={os.path.join(env['TEST_TMPDIR'], 'pytest')}")
  if env.get("TESTBRIDGE_TEST_ONLY"):
    args += ["-k", env["TESTBRIDGE_TEST_ONLY"]]
  return args


if __name__ == "__main__":
  sys.exit(pytest.main(pytest_args(sys.argv[1:], os.environ)))

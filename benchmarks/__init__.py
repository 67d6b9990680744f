"""Benchmarks and device checks: ``python -m benchmarks.<name>`` from the repo root."""

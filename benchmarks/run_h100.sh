#!/usr/bin/env bash
# Kept for old notes: the GPU run is benchmarks/run_gpu.sh (H100 or H200; same arguments,
# same environment variables, same exit codes).
exec bash "$(dirname "$0")/run_gpu.sh" "$@"

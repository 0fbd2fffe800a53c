#!/usr/bin/env bash
# Regenerate api_pb2.py, api_pb2.pyi and api_pb2_grpc.py from api.proto (needs grpcio-tools).
# protoc runs from sidecar/ so the descriptor is registered under its package path
# (faastube_sidecar/deviceplugin/api.proto, not a bare "api.proto" that could collide) and the
# grpc module imports api_pb2 by its full package name.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
python="${PYTHON:-python3}"
cd "$root"
"$python" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
    faastube_sidecar/deviceplugin/api.proto
echo "regenerated in $root/faastube_sidecar/deviceplugin"

#!/usr/bin/env sh
# Copy the CRDs (single source of truth: crds/) into the chart's crds/ folder.
# Helm installs charts/faastube/crds/ as-is and never templates or upgrades it;
# tests/test_operator/test_chart_render.py fails when the two copies differ.
set -eu
root="$(cd "$(dirname "$0")/.." && pwd)"
rm -f "$root"/charts/faastube/crds/*.yaml
cp "$root"/crds/*.yaml "$root"/charts/faastube/crds/
echo "synced $(ls "$root"/crds/*.yaml | wc -l) CRDs into charts/faastube/crds/"

#!/usr/bin/env bash
# Every GPU test and benchmark of the project, for one call on the lent GPU machine.
#   bash bench/gpu_all.sh [tests] [dataplane] [dataplane-spin] [transfers] [e2e] [topology] [memory]   (default: all)
#   network, tests-network (not in the default list; need nixl-cu13 in .whl: make gpu-wheels)
#   memory: the memory policies (issue 12), ~7 min on 2x H200; MEMORY_ARGS="--levels 0.05" etc. to shorten
# Writes logs and JSON under $OUT (or /tmp/faastube-gpu) and prints a short summary last.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/sidecar:$PWD/operator${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
OUT="${OUT:-/tmp/faastube-gpu}"
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(topology tests dataplane dataplane-spin transfers e2e memory)
summary="$OUT/summary.txt"
: > "$summary"
ft() { python3 -m faastube.cli "$@"; }

for step in "${steps[@]}"; do
  start=$(date +%s)
  case "$step" in
    topology)
      nvidia-smi --query-gpu=index,name,memory.total,pci.bus_id --format=csv > "$OUT/nvidia-smi.csv" 2>&1
      nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
      ft topology --format yaml > "$OUT/topology.yaml" 2> "$OUT/topology.err"
      echo "topology: rc=$? ($(grep -c 'index:' "$OUT/topology.yaml") GPUs)" >> "$summary" ;;
    tests)
      timeout 420 python3 -m pytest -q -p no:cacheprovider -o addopts= \
        tests/test_sidecar/test_dataplane_gpu.py tests/test_sidecar/test_cuda_executor_copies.py \
        tests/test_sidecar/test_deviceplugin_nvml_health.py tests/test_sidecar/test_topology_discovery.py \
        tests/test_sidecar/test_sidecar_kube_nvml.py tests/test_sidecar/test_scheduler_cuda_ordering.py \
        tests/test_sidecar/test_eviction_gpu.py \
        $(ls tests/test_runtime/test_*gpu*.py 2>/dev/null) > "$OUT/pytest-gpu.log" 2>&1
      echo "tests: rc=$? $(tail -1 "$OUT/pytest-gpu.log")" >> "$summary" ;;
    tests-dataplane)
      # The data plane's GPU tests alone (tenancy, fences, peer copies, reads), plus the SDK's.
      timeout 300 python3 -m pytest -q -p no:cacheprovider -o addopts= -ra \
        tests/test_sidecar/test_dataplane_gpu.py tests/test_runtime/test_sdk_gpu_passing.py \
        > "$OUT/pytest-gpu-dataplane.log" 2>&1
      echo "tests-dataplane: rc=$? $(tail -1 "$OUT/pytest-gpu-dataplane.log")" >> "$summary"
      grep -E "^(FAILED|ERROR)" "$OUT/pytest-gpu-dataplane.log" | head -20 >> "$summary"
      # Sidecars that crashed in native code left a Python stack (faulthandler) in their logs.
      for f in $(grep -l "Fatal Python" /tmp/ft-*/sidecar-*.log 2>/dev/null | head -2); do
        echo "--- $f" >> "$summary"; grep -A25 "Fatal Python" "$f" >> "$summary"; done ;;
    breakdown)
      # Where each microsecond of a put and a get goes (same GPU), without and with spinning.
      timeout 120 python3 bench/breakdown_dataplane.py --out "$OUT" > "$OUT/breakdown.log" 2>&1
      echo "breakdown: rc=$?" >> "$summary"
      cat "$OUT/breakdown.log" | tail -40 >> "$summary"
      timeout 120 python3 bench/breakdown_dataplane.py --out "$OUT" --spin-us 200 --sidecar-spin-us 200 \
        > "$OUT/breakdown-spin.log" 2>&1
      echo "breakdown, spinning 200 us: rc=$?" >> "$summary"
      grep -E "card|total|wait for" "$OUT/breakdown-spin.log" >> "$summary" ;;
    concurrency-host)
      # The same 1/4/8 pairs with CPU functions passing host memory: the sidecar's own rate, no GPU contexts.
      timeout 120 python3 -m faastube.cli --log-level WARNING bench dataplane --quick --patterns host \
        --methods floor --sizes 1Mi --concurrency-pattern host --tag concurrency-host --no-plot --out "$OUT" \
        > "$OUT/dataplane-concurrency-host.log" 2>&1
      echo "concurrency, host pattern: rc=$?" >> "$summary"
      grep -E "^concurrency" "$OUT/dataplane-concurrency-host.log" >> "$summary" ;;
    gpu-sharing)
      # Replicas sharing one GPU: CUDA MPS vs time-slicing (issue 11, item 4).
      timeout 400 python3 bench/gpu_sharing.py --out "$OUT" > "$OUT/gpu-sharing.log" 2>&1
      echo "gpu-sharing: rc=$?" >> "$summary"
      sed -n '/^== GPU sharing/,$p' "$OUT/gpu-sharing.log" >> "$summary"
      tail -5 "$OUT/gpu-sharing.log" | grep -i error >> "$summary" ;;
    dataplane-quick)
      timeout 240 python3 -m faastube.cli --log-level WARNING bench dataplane --quick --out "$OUT" --tag quick \
        > "$OUT/dataplane-quick.log" 2>&1
      rc=$?
      echo "dataplane --quick: rc=$rc" >> "$summary"
      grep -E "^\[(MET|MISS|N/A)\]" "$OUT/dataplane-quick.log" >> "$summary"
      sed -n '/^== dataplane:/,$p' "$OUT/dataplane-quick.log" >> "$summary"
      [ $rc -ne 0 ] && tail -25 "$OUT/dataplane-quick.log" >> "$summary" ;;
    dataplane)
      # Default run (~3-4 min on 2x H200): every pattern, method and size, 1/4/8 pairs; JSON + PNGs in $OUT.
      timeout 330 python3 -m faastube.cli --log-level WARNING bench dataplane --out "$OUT" > "$OUT/dataplane.log" 2>&1
      rc=$?
      echo "dataplane: rc=$rc $(grep -m1 -E '^\([0-9]+ s\)$' "$OUT/dataplane.log")" >> "$summary"
      grep -E "^\[(MET|MISS|N/A)\]" "$OUT/dataplane.log" >> "$summary"
      sed -n '/^== dataplane:/,$p' "$OUT/dataplane.log" >> "$summary"
      [ $rc -ne 0 ] && tail -15 "$OUT/dataplane.log" >> "$summary" ;;
    dataplane-spin)
      # Where round-trip time goes: clients and sidecar busy-polling 200 us (the tube alone, quick).
      timeout 180 python3 -m faastube.cli --log-level WARNING bench dataplane --quick --patterns same-gpu gpu-gpu \
        --methods tube-put tube-seal floor ping --pairs 8 --spin-us 200 --sidecar-spin-us 200 --tag spin200 \
        --no-plot --out "$OUT" > "$OUT/dataplane-spin.log" 2>&1
      rc=$?
      echo "dataplane, client and sidecar spinning 200 us: rc=$rc" >> "$summary"
      grep -E "^\[(MET|MISS)\]" "$OUT/dataplane-spin.log" >> "$summary"
      [ $rc -ne 0 ] && tail -15 "$OUT/dataplane-spin.log" >> "$summary" ;;
    transfers)
      # Engine vs one link vs all links at once (h2d, d2h, 1 MiB..4 GiB); goals as [MET ]/[MISS] lines.
      timeout 420 python3 -m faastube.cli bench transfers --out "$OUT" > "$OUT/transfers.log" 2>&1
      echo "transfers: rc=$?" >> "$summary"
      if grep -q '^card: ' "$OUT/transfers.log"; then
        sed -n '/^card: /,$p' "$OUT/transfers.log" >> "$summary"
      else
        tail -25 "$OUT/transfers.log" >> "$summary"
      fi ;;
    e2e)
      # Today's runtime vs batching + autoscaling, tube and host-centric (issue 11). Narrow it with
      # E2E_WORKFLOWS, E2E_ARRIVALS, E2E_SKIP (e.g. today/host-centric) and E2E_BUDGET_S.
      timeout "${E2E_TIMEOUT_S:-540}" python3 -m faastube.cli --log-level WARNING bench e2e --quick \
        --workflows "${E2E_WORKFLOWS:-traffic,driving,image,video}" --arrivals "${E2E_ARRIVALS:-sporadic,periodic,bursty}" \
        --skip "${E2E_SKIP:-}" --budget-s "${E2E_BUDGET_S:-240}" --out "$OUT" > "$OUT/e2e.log" 2>&1
      echo "e2e: rc=$?" >> "$summary"
      grep -E "^\[" "$OUT/e2e.log" | tail -40 >> "$summary"
      sed -n '/^workflow /,$p' "$OUT/e2e.log" >> "$summary" ;;
    tests-runtime)
      # Batching and warm-up on the GPU (CuPy, torch), the SDK's GPU passing, faastube run on CUDA.
      timeout 300 python3 -m pytest -q -p no:cacheprovider -o addopts= -ra \
        tests/test_runtime/test_batching_gpu.py tests/test_runtime/test_sdk_gpu_passing.py tests/test_runtime/test_examples_gpu.py \
        > "$OUT/pytest-gpu-runtime.log" 2>&1
      echo "tests-runtime: rc=$? $(tail -1 "$OUT/pytest-gpu-runtime.log")" >> "$summary"
      grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/pytest-gpu-runtime.log" | head -20 >> "$summary" ;;
    tests-memory)
      # The GPU tests of eviction and restore alone (issue 12).
      timeout 300 python3 -m pytest -q -p no:cacheprovider -o addopts= -ra tests/test_sidecar/test_eviction_gpu.py \
        > "$OUT/pytest-gpu-memory.log" 2>&1
      echo "tests-memory: rc=$? $(tail -1 "$OUT/pytest-gpu-memory.log")" >> "$summary"
      grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/pytest-gpu-memory.log" | head -20 >> "$summary" ;;
    memory)
      # Pools reserved vs live per policy, and P99/failures with 1/5/10% of each GPU free (issue 12).
      timeout 560 python3 -m faastube.cli --log-level WARNING bench memory --out "$OUT" ${MEMORY_ARGS:-} \
        > "$OUT/memory.log" 2>&1
      rc=$?
      echo "memory: rc=$rc" >> "$summary"
      grep -E "^\[(MET |MISS|N/A )\]" "$OUT/memory.log" >> "$summary"
      sed -n '/^== memory:/,$p' "$OUT/memory.log" >> "$summary"
      [ $rc -ne 0 ] && tail -25 "$OUT/memory.log" >> "$summary" ;;
    tests-network)
      # Cross-node passing (issue 13): VRAM between two CUDA sidecars, and the CPU rules there too.
      # Needs nixl-cu13 (cp312) in .whl: make gpu-wheels.
      timeout 400 python3 -m pytest -q -p no:cacheprovider -o addopts= -ra tests/test_sidecar/test_network_gpu.py \
        tests/test_sidecar/test_network_process.py > "$OUT/pytest-gpu-network.log" 2>&1
      echo "tests-network: rc=$? $(tail -1 "$OUT/pytest-gpu-network.log")" >> "$summary"
      grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/pytest-gpu-network.log" | head -20 >> "$summary" ;;
    network)
      # Two sidecars as two nodes, a GPU each: get across nodes vs raw NIXL vs host-centric (issue 13).
      # Not in the default list: needs nixl-cu13 on the machine. NETWORK_ARGS="--sizes 1Mi..256Mi" etc.
      timeout 560 python3 -m faastube.cli --log-level WARNING bench network --backend cuda --out "$OUT" \
        ${NETWORK_ARGS:-} > "$OUT/network.log" 2>&1
      rc=$?
      echo "network: rc=$rc" >> "$summary"
      grep -E "^\[(MET |MISS|N/A )\]" "$OUT/network.log" >> "$summary"
      sed -n '/^card:/,$p' "$OUT/network.log" >> "$summary"
      [ $rc -ne 0 ] && tail -25 "$OUT/network.log" >> "$summary" ;;
    *) echo "unknown step $step" >> "$summary" ;;
  esac
  echo "  ($step took $(( $(date +%s) - start )) s)" >> "$summary"
done
# At most 8 files come back from the GPU machine: pack everything into one.
tar -czf "$OUT/../faastube-gpu.tar.gz" -C "$OUT" . 2>/dev/null && mv "$OUT/../faastube-gpu.tar.gz" "$OUT/"
echo "================ summary ================"
cat "$summary"

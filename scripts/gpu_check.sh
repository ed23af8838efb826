#!/usr/bin/env bash
# One prepared check of the CUDA path (nothing has run on a GPU yet; see docs/server.md).
# On a CUDA machine, from the repository root, in under 10 minutes:
#   1. install: a venv with the default (CUDA 13) torch wheel and .[server,dev]
#      (skipped when PYTHON names an interpreter that already has them, e.g. no network),
#   2. run tests/gpu (Triton kernels vs torch twins in fp32/fp16/bf16, quantized backends),
#   3. serve a Llama-shaped model (MODEL_DIR, default SmolLM2-135M) with --quantize bnb-nf4,
#      --device cuda, 16 slots, and upload 16 rank-16 adapters,
#   4. run the multi-adapter benchmark (loraplex bench: 16 adapters, then no adapters),
#   5. write ONE results file: OUT/gpu_check.json (OUT defaults to ./gpu-check).
# Every step has its own time limit; a failed step is recorded and the later ones still run.
#   usage: scripts/gpu_check.sh [OUT]      env: PYTHON, MODEL_DIR, PORT (default 50071)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
PARTS="$OUT/parts"
PORT=${PORT:-50071}
ADDR="127.0.0.1:$PORT"
mkdir -p "$PARTS"
export OUT PARTS ADDR
step() {   # step NAME SECONDS CMD...: run with a limit, record ok/failed(rc)
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local started=$SECONDS
  # bash -c so that the exported shell functions below run under `timeout` too
  if timeout "$limit" bash -c '"$@"' _ "$@"; then echo "ok $((SECONDS - started))s" > "$PARTS/step-$name"
  else echo "failed rc=$? after $((SECONDS - started))s" > "$PARTS/step-$name"; fi
  cat "$PARTS/step-$name"
}

if [ -z "${PYTHON:-}" ]; then
  PYTHON=.venv-gpu/bin/python
  install() {
    [ -x "$PYTHON" ] || python3 -m venv .venv-gpu || return 1
    "$PYTHON" -m pip install -q "torch==2.13.0" && "$PYTHON" -m pip install -q "torch==2.13.0" -e ".[server,dev]"
  }
  export -f install
  step install 140 install
fi
BIN=$(dirname "$PYTHON")
export PYTHON BIN
"$PYTHON" - > "$PARTS/env.json" <<'PY'
import json, subprocess, torch
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError as exc:
    smi = f"nvidia-smi: {exc}"
print(json.dumps({"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "nvidia_smi": smi}))
PY

step tests-gpu 100 "$PYTHON" -m pytest tests/gpu -q -p no:cacheprovider --junitxml="$PARTS/tests-gpu.xml"
step prepare 120 "$PYTHON" scripts/gpu_check.py prepare "$OUT"

MODEL=$(cat "$OUT/model_dir" 2>/dev/null || echo default)
rm -rf "$OUT/store"
"$BIN/loraplex" serve --model "$MODEL" --quantize bnb-nf4 --device cuda --max-loras 16 \
  --max-lora-rank 16 --store "$OUT/store" --port "$PORT" --metrics-port 0 > "$PARTS/serve.log" 2>&1 &
SERVER=$!
export SERVER
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
wait_serving() { until "$BIN/loraplex" health --address "$ADDR" --timeout 2 >/dev/null 2>&1; do
  kill -0 $SERVER 2>/dev/null || return 1; sleep 2; done; }
export -f wait_serving
step serve 90 wait_serving
upload() { for dir in "$OUT"/adapters/bench-*; do
  "$BIN/loraplex" adapters upload "$dir" --id "$(basename "$dir")" --no-progress --address "$ADDR" > /dev/null || return 1
  done; }
export -f upload
step upload 40 upload
BENCH=(--address "$ADDR" --num-prompts 256 --concurrency 32 --input-len 128 --output-len 64 --warmup 16 --no-progress)
step bench-adapters 60 "$BIN/loraplex" bench "${BENCH[@]}" --num-adapters 16 --json "$PARTS/bench-adapters.json"
step bench-base 45 "$BIN/loraplex" bench "${BENCH[@]}" --json "$PARTS/bench-base.json"
kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; trap - EXIT
"$PYTHON" scripts/gpu_check.py report "$OUT"

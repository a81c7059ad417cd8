#!/usr/bin/env bash
# Second stage of the 2026-11-30 session (detached like gpu_pipeline.sh; poll it with
# RES=/tmp/res2 bash benchmarks/gpu_pipeline.sh poll N): waits for the quality stage, then
# sweeps the prefill kernel's launch, and runs W1 (fp8 vs kvcomp k4v4 with the best launch,
# whole H200) and W2 at an H100's KV memory (54.3 GiB) for kvcomp k4v4 / bf16 / kvcomp k2v2.
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
RES=${RES:-/tmp/res2}
mkdir -p "$RES"
log() { echo "[$(date -u +%T)] $*" | tee -a "$RES/pipeline.log"; }
while [ ! -f /tmp/res/ALL_DONE ]; do sleep 3; done
log "stage 2 starts"
python3 benchmarks/bench_prefill_kernel.py --quick --out "$RES/prefill_kernel.json" > "$RES/prefill_kernel.log" 2>&1
best=$(grep '^BEST_LAUNCH=' "$RES/prefill_kernel.log" | tail -n 1 | cut -d= -f2-)
export KVCOMP_PREFILL_LAUNCH="$best"
log "prefill sweep done; KVCOMP_PREFILL_LAUNCH=$best"
CAP=1,2,4,8,16,32,64,128,192,256,320,384,448,512
E2E="python3 benchmarks/bench_e2e.py --model /tmp/l32 --fast-start --max-num-seqs 512 --capture-sizes $CAP"
$E2E --workload W1 --settings kvcomp_k4v4,fp8 --timeout 400 --out "$RES/e2e_w1.json" > "$RES/e2e_w1.md" 2>&1
log "W1 done"
$E2E --workload W2 --kv-gib 54.3 --settings kvcomp_k4v4,bf16,kvcomp_k2v2 --timeout 400 \
    --out "$RES/e2e_w2_h100kv.json" > "$RES/e2e_w2_h100kv.md" 2>&1
log "W2 done"
touch "$RES/ALL_DONE"

#!/usr/bin/env bash
# GPU session stages, run on the device machine from the repo root after the
# vLLM kit is in /tmp/site (see ../shared/gpu/make-kit.sh). Results go to $OUT.
#   bash benchmarks/gpu_session.sh kernels   # install, kernel tests, baseline check, 16-bit check, decode bench
#   bash benchmarks/gpu_session.sh train     # (re)train the quality model on the GPU instead of the CPU one
#   bash benchmarks/gpu_session.sh e2e SETTINGS TAG [WORKLOADS] [ARGS]  # side by side for SETTINGS
#   bash benchmarks/gpu_session.sh check16   # kvcomp vs FLASH_ATTN on the trained model (QMODEL=dir)
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/session.log"; date -u | tee -a "$OUT/session.log"
case "$1" in
kernels)
  # install, kernel tests, baseline check, the 16-bit check, then the decode table (its JSON
  # is rewritten after every row, so a run cut at BENCH_S seconds keeps what it measured)
  bash scripts/install_gpu_device.sh 2>&1 | tail -3 | tee -a "$OUT/session.log" || exit 1
  python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_triton_store.py tests/test_triton_prefill.py \
      tests/test_triton_decode.py 2>&1 | tail -15 | tee -a "$OUT/session.log"
  # upstream decode baselines called correctly? (fp32 reference on their dequantized caches)
  python3 benchmarks/bench_decode_kernel.py --check --out "$OUT/baseline_check.json" 2>&1 \
      | tail -8 | tee -a "$OUT/session.log"
  python3 benchmarks/gpu_check_16bit.py --model ${QMODEL:-quality/models/sotu-llama-6m} \
      --out "$OUT/check16.json" > "$OUT/check16.log" 2>&1; tail -8 "$OUT/check16.log"
  timeout ${BENCH_S:-300} python3 benchmarks/bench_decode_kernel.py --batches ${BENCH_B:-1,8,32,64} \
      --contexts ${BENCH_CTX:-1024,8192,32768,131072} --configs k4v4,k2v2,k16v16 \
      --out "$OUT/decode_kernel.json" > "$OUT/decode_kernel.md" 2>&1
  tail -30 "$OUT/decode_kernel.md"
  ;;
train)
  python3 -m quality.train_tiny --out /tmp/tiny_trained --max-seconds 270 \
      --export-parts "$OUT/model_parts" > "$OUT/train.log" 2>&1
  tail -25 "$OUT/train.log"
  ;;
e2e)
  # e2e SETTINGS TAG [WORKLOADS] [more bench_e2e.py args, e.g. --kv-gib 12]
  python3 benchmarks/bench_e2e.py --model /tmp/l32 --workload "${4:-W1,W2q}" --fast-start \
      --capture-sizes ${CAPTURE:-1,2,4,8,16,32,64,128,192,256} --settings "$2" --timeout "${E2E_TIMEOUT:-400}" --out "$OUT/e2e_$3.json" "${@:5}" 2>&1 \
      | tee "$OUT/e2e_$3.md"  # streamed: a call killed at its limit still returns the rows so far
  ;;
verify2)
  # the FlashAttention prefill split and the key folds: GPU tests, then decode at 32 x 32K
  # and 64 x 32K for each key fold (the W1 A/B is the e2e stage with kvcomp_k4v4_triton_prefill)
  bash scripts/install_gpu_device.sh 2>&1 | tail -3 | tee -a "$OUT/session.log" || exit 1
  python3 -m pytest -q -n 12 -p no:cacheprovider tests/test_triton_decode.py tests/test_triton_prefill.py \
      2>&1 | tail -15 | tee -a "$OUT/session.log"
  for f in split fp16 bf16; do
    python3 benchmarks/bench_decode_kernel.py --batches 32,64 --contexts 32768 --configs k4v4,k2v2 \
        --no-baselines --key-fold $f --out "$OUT/decode_fold_$f.json" > "$OUT/decode_fold_$f.md" 2>&1
    grep -E "^\| k" "$OUT/decode_fold_$f.md" | sed "s/^/$f /"
  done
  ;;
train2)
  # The retrieval model of issue #4 in two phases (docs/quality.md): induction drills in short
  # rows until copying works, then the long mixture from those weights. Writes $TRAIN_DIR/done
  # at the end, so it can run detached (setsid) beside the kernel tests of the same call.
  D=${TRAIN_DIR:-/tmp/train}; mkdir -p "$D"; rm -f "$D/done"
  S=${TRAIN_SHAPE:-'{"hidden_size":256,"num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":128,"intermediate_size":768}'}
  python3 -m quality.train_tiny --out "$D/phase0" --shape "$S" --seq-len ${P0_SEQ:-256} --batch 128 \
      --steps ${P0_STEPS:-4000} --lr 2e-3 --warmup 50 --text-passes 0.05 --copy-share 1.0 --copy-max-seg 32 \
      --max-seconds ${P0_S:-110} --eval-every ${P0_EVAL:-100} --patience 100 --stop-copy-below 0.3 \
      --eval-contexts ${P0_SEQ:-256} --procs ${TRAIN_PROCS:-8} > "$D/phase0.log" 2>&1
  # (1,200 steps reached passkey 0.42 on the H200; 5,000 steps, ~200 s, 0.98: docs/quality.md)
  python3 -m quality.train_tiny --init "$D/phase0" --out "$D/model" --seq-len ${P1_SEQ:-4096} --batch 16 \
      --steps ${P1_STEPS:-5000} --lr 1.5e-3 --warmup 50 --text-passes 3 --copy-share 0.3 --copy-max-seg 256 \
      --max-seconds ${P1_S:-330} --eval-every ${P1_EVAL:-250} --patience 4 --eval-contexts ${P1_CTX:-1024,2048,4096} \
      --procs ${TRAIN_PROCS:-14} --export-parts "$D/parts" > "$D/phase1.log" 2>&1
  touch "$D/done"
  ;;
check16)
  python3 benchmarks/gpu_check_16bit.py --model ${QMODEL:-quality/models/sotu-llama-6m} --out "$OUT/check16.json" 2>&1 \
      | tail -8 | tee "$OUT/check16.log"
  ;;
esac

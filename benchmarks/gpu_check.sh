#!/usr/bin/env bash
# The GPU check of a change to the kernels or the backend, as one detached job on a GPU host
# where vLLM (CUDA) is installed into /tmp/site (an offline host: ../shared/gpu/make-kit.sh):
#   1. the kernel tests against their PyTorch references, on the GPU (Quest's and the
#      eviction policies' Triton steps after them);
#   2. benchmarks/engine_matrix.py: every supported setting starts an engine and serves, with
#      vLLM's default engine settings and with the benchmarks' fast start (beside step 1);
#   3. W1 + W2 (bench_e2e.py) for kvcomp k4v4 and bf16 with vLLM's default engine settings
#      (torch.compile, default CUDA graphs), the same KV memory for both (KV_GIB);
#      E2E_GPUS=N on a multi-GPU host runs N settings side by side, one GPU each; step "e2e2"
#      runs E2E2_WORKLOADS x E2E2_SETTINGS the same way into e2e2.json; E2E_CUT_AFTER=S
#      (E2E2_CUT_AFTER) stops each workload S seconds in (bench_e2e.py --cut-after: a cut run);
#   4. (step "decode", not by default) bench_decode_kernel.py at DECODE_BATCHES x DECODE_CONTEXTS
#      (default 32 x 32768) for DECODE_CONFIGS, Quest at DECODE_QUEST budgets, a head map's split
#      layer at DECODE_SPLIT shares of streaming KV heads (sinks 64 + window 256), FA3 bf16 beside;
#      DECODE_QUEST_SPLITS (e.g. 1,2,5,10) adds Quest rows at those split counts;
#      DECODE_QUEST_LAUNCHES=1 times Quest's scoring and top-k at each launch choice;
#      H2O / A2SF layers for DECODE_EVICTION methods (default h2o,a2sf; '' for none) at
#      DECODE_EVICTION_BUDGET tokens (default 2048): the decode step's scoring overhead, the
#      eviction step, and both per decode step of 32 layers, the host work on the step's
#      eviction rows as the engine does it (DECODE_EVICTION_ROWS=0: every request walked, as
#      KVCOMP_EVICTION_ROWS=0 has it); DECODE_SCORE_KERNEL=0: the scores accumulated by
#      torch ops, KVCOMP_SCORE_KERNEL=0; DECODE_EVICTION_BATCH=0: the batch's eviction steps
#      request by request, KVCOMP_EVICTION_BATCH=0);
#   4b. (step "sweep", not by default) bench_decode_kernel.py --sweep for SWEEP_CONFIGS
#      (default k4v4) at the first of DECODE_BATCHES x DECODE_CONTEXTS; SWEEP_ARGS adds flags;
#   4c. (step "profile", not by default) PROFILE_SETTINGS (a comma list, default
#      kvcomp_k4v4_h2o2048,kvcomp_k4v4) profiled for PROFILE_ITERS (20) engine steps from step
#      PROFILE_DELAY (2500) of a run of PROFILE_WORKLOAD (W4) cut PROFILE_CUT_AFTER (150) s in,
#      vLLM's default engine settings: GPU time per step by kernel family, eviction's kernels
#      apart (trace_summary.py; the traces are not kept);
#   5. (step "capacity", not by default) the KV capacity vLLM logs at CAP_WORKLOAD's length
#      (default C32K: max_model_len 32768) for CAP_SETTINGS, engines in fast start: the
#      capacity is fixed when the KV cache is allocated, before torch.compile or graphs;
#   6. (step "calibrate", not by default) calibrate-heads razor and duo on /tmp/l32 with random
#      weights (the host has no checkpoint, so the maps say nothing about any model): wall time
#      and peak GPU memory of each at 8B shapes; CAL_RAZOR_ARGS / CAL_DUO_ARGS replace their
#      settings (duo: 2048-token samples, CAL_DUO_STEPS Adam steps, default 200 of the CLI's 300).
# STEPS picks the steps and their order (default "tests matrix e2e"); TEST_FILES (test paths)
# has the tests step run those alone.
#   start:  setsid nohup bash benchmarks/gpu_check.sh > /tmp/gpu_check.out 2>&1 < /dev/null &
#   poll:   bash benchmarks/gpu_check.sh poll 570     # waits, then packs /tmp/res into $OUT
# The job runs a copy of the tree taken at its start, so files may change while it runs; start
# it from the repository root (a folder carried in one call only is gone by the next call).
# Poll without gaps where an idle host is reclaimed: the job ends with the host.
# After a pass: `python tests/gpu_compile_child.py --record benchmarks/results/<folder>` records
# the default GPU path as verified (tests/test_gpu_compile.py checks it against the kernels).
set -uo pipefail
# PYTHONSAFEPATH: no process of the job (vLLM's own subprocesses too) imports the
# checkout's vllm_kvcomp/ folder in place of the installed package
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
RES=${RES:-/tmp/res}
mkdir -p "$RES"
if [ "${1:-}" = poll ]; then
  end=$((SECONDS + ${2:-570}))
  while [ $SECONDS -lt $end ] && [ ! -f "$RES/ALL_DONE" ]; do sleep 5; done
  tar czf "$OUT/res.tgz" -C "$RES" .
  tail -n 25 "$RES/check.log"; ls "$RES"
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
  exit 0
fi
log() { echo "[$(date -u +%T)] $*" | tee -a "$RES/check.log"; }
rm -rf /tmp/job && mkdir /tmp/job && cp -r . /tmp/job && cd /tmp/job
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$RES/check.log"
bash scripts/install_gpu_device.sh >> "$RES/check.log" 2>&1 || { log "install failed"; exit 1; }
log "steps: ${STEPS:=tests matrix e2e}"
# every end-to-end engine of the job: the same model, sequence cap and KV memory (the
# all-format table takes runs of this cap and KV size only)
bench_e2e=(python3 benchmarks/bench_e2e.py --model /tmp/l32 --max-num-seqs 512
           --kv-gib "${KV_GIB:-54.3}")
# steps run in the order given (the kernel tests beside the next step): a run that may be cut
# short names the step it needs most first
for step in $STEPS; do
  case $step in
    tests)
      # -v: each failure is named in the log as it happens, so a job cut short still says which
      if [ -n "${TEST_FILES:-}" ]; then  # those files alone, beside the next step
        (python3 -P -m pytest -v -rf -n 8 -p no:cacheprovider $TEST_FILES \
            > "$RES/kernel_tests.log" 2>&1
         log "tests ($TEST_FILES): $(tail -n 1 "$RES/kernel_tests.log")") &
        continue
      fi
      (python3 -P -m pytest -v -rf -n 8 -p no:cacheprovider tests/test_triton_store.py \
          tests/test_triton_prefill.py tests/test_triton_decode.py tests/test_triton_stream.py \
          tests/test_triton_compaction.py tests/test_triton_scores.py tests/test_triton_select.py \
          > "$RES/kernel_tests.log" 2>&1
       log "kernel tests: $(tail -n 1 "$RES/kernel_tests.log")"
       # Quest's and eviction's Triton steps against their references (engines and
       # start-up checks left out: the matrix serves them)
       python3 -P -m pytest -v -rf -n 8 -p no:cacheprovider tests/test_quest.py \
          tests/test_eviction_gpu.py tests/test_eviction_batch.py tests/test_eviction_graphs.py \
          tests/test_combinations.py \
          -k "not engine and not serves and not refused and not gate" \
          > "$RES/policy_tests.log" 2>&1
       log "policy kernel tests: $(tail -n 1 "$RES/policy_tests.log")") & ;;
    matrix)
      python3 benchmarks/engine_matrix.py --out "$RES" --modes "${MATRIX_MODES:-default,fast}" \
          --parallel "${MATRIX_PARALLEL:-4}" ${MATRIX_ROWS:+--rows "$MATRIX_ROWS"} \
          > "$RES/engine_matrix.log" 2>&1
      log "engine matrix: $(grep -c '| yes |' "$RES/engine_matrix.md") rows serve, $(grep -c 'no\*\*' "$RES/engine_matrix.md") fail" ;;
    e2e|e2e2)
      wait  # the kernel tests and the e2e engines would share the GPU
      # e2e2: a second group of workloads x settings (E2E2_WORKLOADS, E2E2_SETTINGS), e.g. one
      # eviction setting on W4 after every format on W1
      if [ $step = e2e ]; then
        w=${E2E_WORKLOADS:-W1,W2} s=${E2E_SETTINGS:-kvcomp_k4v4,bf16} c=${E2E_CUT_AFTER:-}
      else w=${E2E2_WORKLOADS:-W4} s=${E2E2_SETTINGS:-kvcomp_k4v4} c=${E2E2_CUT_AFTER:-}; fi
      "${bench_e2e[@]}" \
          --workload "$w" --settings "$s" \
          --timeout "${E2E_TIMEOUT:-900}" --gpus "${E2E_GPUS:-1}" \
          ${c:+--cut-after "$c"} \
          --out "$RES/$step.json" > "$RES/$step.md" 2>&1
      log "$step: $(grep -c '"output_tok_s"' "$RES/$step.json") runs" ;;
    profile)
      wait
      # W4 from step 2500: contexts ~3K, every H2O request past its budget (an eviction step
      # each engine step, a page moved every 128), so the window shows H2O's steady cost
      pw=${PROFILE_WORKLOAD:-W4} pd=${PROFILE_DELAY:-2500} pi=${PROFILE_ITERS:-20}
      ps=${PROFILE_SETTINGS:-kvcomp_k4v4_h2o2048,kvcomp_k4v4}
      for s in ${ps//,/ }; do
        rm -rf "$RES/profile/$s"
        VLLM_CUSTOM_SCOPES_FOR_PROFILING=1 \
        "${bench_e2e[@]}" \
            --workload "$pw" --settings "$s" --profile "$RES/profile" \
            --profile-delay "$pd" --profile-iters "$pi" \
            --cut-after "${PROFILE_CUT_AFTER:-150}" --timeout 600 \
            --out "$RES/profile_$s.json" > "$RES/profile_$s.md" 2>&1
        t=$(ls "$RES/profile/$s"/*.pt.trace.json* 2>/dev/null | head -n 1)
        if [ -z "$t" ]; then log "profile $s: no trace (the run ended before step $pd?)"; continue; fi
        python3 benchmarks/trace_summary.py "$t" --steps "$pi" --title "$s, $pw from step $pd" \
            --json "$RES/profile/$s/summary.json" >> "$RES/profile.md" 2>&1
        rm -f "$RES/profile/$s"/*.pt.trace.json*  # too big to bring back
        log "profile $s: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print({k: round(v, 2) for k, v in d.items() if k.endswith("per_step") and not isinstance(v, dict)})' "$RES/profile/$s/summary.json" 2>&1 | tail -n 1 | cut -c1-200)"
      done ;;
    capacity)
      wait
      "${bench_e2e[@]}" \
          --workload "${CAP_WORKLOAD:-C32K}" --fast-start \
          --settings "${CAP_SETTINGS:-kvcomp_k4v4,kvcomp_k4v4_split50}" --timeout 600 \
          --out "$RES/capacity.json" > "$RES/capacity.md" 2>&1
      log "capacity: $(grep -c '"kv_cache_tokens"' "$RES/capacity.json") engines" ;;
    decode)
      wait
      env ${DECODE_SCORE_KERNEL:+KVCOMP_SCORE_KERNEL=$DECODE_SCORE_KERNEL} \
          ${DECODE_EVICTION_BATCH:+KVCOMP_EVICTION_BATCH=$DECODE_EVICTION_BATCH} \
      python3 benchmarks/bench_decode_kernel.py --batches "${DECODE_BATCHES:-32}" \
          --contexts "${DECODE_CONTEXTS:-32768}" --configs "${DECODE_CONFIGS:-k4v4,k2v2}" \
          --quest-budgets "${DECODE_QUEST:-2048}" ${DECODE_QUEST_SPLITS:+--quest-splits "$DECODE_QUEST_SPLITS"} \
          ${DECODE_QUEST_LAUNCHES:+--quest-launches} \
          --eviction "${DECODE_EVICTION-h2o,a2sf}" --eviction-budget "${DECODE_EVICTION_BUDGET:-2048}" \
          $([ "${DECODE_EVICTION_ROWS:-1}" = 0 ] || echo --eviction-rows) \
          --head-split "${DECODE_SPLIT:-0.5}" \
          --baselines "${DECODE_BASELINES:-fa3_bf16}" \
          --out "$RES/decode.json" > "$RES/decode.md" 2>&1
      log "decode: $(grep -c '"config":' "$RES/decode.json") rows" ;;
    sweep)
      wait
      # the decode kernel's tuning grid at one shape (tile, warps, stages, splits): what a card
      # needs beyond the launch heuristic (KVCOMP_DECODE_LAUNCH carries a better launch)
      python3 benchmarks/bench_decode_kernel.py --batches "${DECODE_BATCHES:-32}" \
          --contexts "${DECODE_CONTEXTS:-32768}" --configs "${SWEEP_CONFIGS:-k4v4}" --sweep \
          ${SWEEP_ARGS:-} --out "$RES/sweep.json" > "$RES/sweep.md" 2>&1
      log "sweep: $(grep -c '"us":' "$RES/sweep.json") launches" ;;
    calibrate)
      wait
      # the e2e step's model directory (config.json only), made here too when it runs alone
      python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_e2e; bench_e2e.make_model_dir('/tmp/l32')"
      for m in razor duo; do
        [ $m = razor ] && a=${CAL_RAZOR_ARGS:-} || a=${CAL_DUO_ARGS:---steps ${CAL_DUO_STEPS:-200}}
        # $a unquoted: its settings are words of their own
        python3 -m vllm_kvcomp.calibrate_heads /tmp/l32 --random-weights --method $m $a \
            --out "$RES/calibrate_$m.json" --stats "$RES/calibrate_${m}_stats.json" \
            > "$RES/calibrate_$m.log" 2>&1
        log "calibrate $m: $(grep '^wrote' "$RES/calibrate_$m.log" | sed 's/^wrote .* in /in /' \
            || tail -n 1 "$RES/calibrate_$m.log")"
      done ;;
    *) log "unknown step $step" ;;
  esac
done
wait
touch "$RES/ALL_DONE"

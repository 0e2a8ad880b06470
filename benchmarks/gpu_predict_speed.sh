#!/bin/bash
# Issue 21's prediction-speed acceptance in one device call: LLaMA-Factory 0.9.5's `do_predict` with
# `predict_with_generate` (benchmarks/peer/lf_predict/) and then `mmtune predict` (benchmarks/predict_speed.py) on
# the same model folder (/tmp/lfbench/model: Qwen2-VL-2B sizes, random weights, built by the peer harness's prep)
# and the same data (/tmp/lfbench/data/bench.json: one 448x448 image and a question a sample; the last answer is
# the label), 512 samples, exactly 64 new tokens each (min_new_tokens = max_new_tokens on both sides), greedy,
# bf16, sdpa, one batch size on both sides. From the repo root, with mmtune's wheels (.whl) and the peer carried
# (.peer: llamafactory/, lfwhl/ and lfwhl_pred/, the last from benchmarks/peer/lf_predict/fetch_wheels.sh):
#     bash benchmarks/gpu_predict_speed.sh
# Writes $OUT/log (every line stamped with seconds since start), $OUT/lf_predict.json (the peer's loop time,
# samples/s, peak memory), $OUT/mmtune_predict.json (predict_speed.py's row) and $OUT/predict_ratio.json (mmtune
# over the peer). A step that needs more than the time left before DEADLINE_S is skipped.
# Env: DEADLINE_S (570), OUT (/tmp/pdout), SAMPLES (512), NEW_TOKENS (64), BATCH (64), CACHE (dynamic: mmtune's KV
# cache), TINY=1: a CPU smoke test of the whole script (a 2-layer model, 8 samples, 4 new tokens, batch 4, fp32;
# LLaMA-Factory already installed in LF_SITE, default /tmp/site-lf, plus LF_PATH_EXTRA on its path if set;
# nothing installed, no nvidia-smi).
set -u
OUT=${OUT:-/tmp/pdout}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-570}
TINY=${TINY:-0}
PEER=benchmarks/peer/lf_predict
LF_SITE=${LF_SITE:-/tmp/site-lf}
if [ "$TINY" = 1 ]; then
  W=${W:-/tmp/lfbench_tiny}; SAMPLES=${SAMPLES:-8}; NEW_TOKENS=${NEW_TOKENS:-4}; BATCH=${BATCH:-4}
  LF_EXTRA=(bf16=false preprocessing_num_workers=1 dataloader_num_workers=0)
  MM_EXTRA=(--cpu)
else
  W=/tmp/lfbench; SAMPLES=${SAMPLES:-512}; NEW_TOKENS=${NEW_TOKENS:-64}; BATCH=${BATCH:-64}
  LF_EXTRA=(); MM_EXTRA=()
fi
CACHE=${CACHE:-dynamic}

STEP_DIR=$OUT
# shellcheck source=gpu_steps.sh
source "$ROOT/benchmarks/gpu_steps.sh"

setup() {  # mmtune's wheels into /tmp/site2; the peer's into LF_SITE; the model folder and data into $W
  if [ "$TINY" = 1 ]; then
    PYTHONPATH="$LF_SITE${LF_PATH_EXTRA:+:$LF_PATH_EXTRA}" python3 -c "import llamafactory" || return 1
    [ -f $W/data/bench.json ] || python3 .peer/llamafactory/prepare.py --out $W --tiny --n "$SAMPLES" --device cpu \
      || return 1
    return 0
  fi
  nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl || return 1
  OUT=$OUT/lf_setup WHL=.peer/lfwhl SITE=$LF_SITE DEADLINE_S=200 timeout 240 bash .peer/llamafactory/gpu_run.sh env prep \
    > "$OUT/lf_setup.txt" 2>&1
  [ -f $W/data/bench.json ] || { echo "no data: see $OUT/lf_setup.txt"; return 1; }
  # predict_with_generate makes LLaMA-Factory demand jieba, nltk and rouge_chinese (mandatory version check)
  ls .peer/lfwhl_pred/*.whl >/dev/null 2>&1 || { echo "no .peer/lfwhl_pred: run $PEER/fetch_wheels.sh"; return 1; }
  timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$LF_SITE" \
    .peer/lfwhl_pred/*.whl || return 1
}

ratio() {  # mmtune's row over the peer's, into $OUT/predict_ratio.json
  python3 - "$OUT/lf_predict.json" "$OUT/mmtune_predict.json" "$OUT/predict_ratio.json" <<'PY'
import json, sys
lf, mm = (json.load(open(p)) for p in sys.argv[1:3])
row = {
    "samples": [lf["samples"], mm["samples"]], "new_tokens": [lf["new_tokens"], mm["new_tokens"]],
    "batch_size": [lf["batch_size"], mm["batch_size"]],
    "lf_samples_per_second": lf["samples_per_second"], "mmtune_samples_per_second": mm["samples_per_second"],
    "samples_per_second_ratio": mm["samples_per_second"] / lf["samples_per_second"],
    "lf_own_predict_samples_per_second": lf["lf_metrics"].get("predict_samples_per_second"),
    "lf_wall_s_with_load": lf["wall_s_with_load"], "mmtune_wall_s_with_load": mm["wall_seconds_with_load"],
    "lf_peak_allocated_gib": lf.get("peak_allocated_gib"), "mmtune_peak_memory_gib": mm.get("peak_memory_gib"),
    "device": [lf.get("device", "cpu"), mm["device"]],
}
json.dump(row, open(sys.argv[3], "w"), indent=1)
print("[ratio] " + json.dumps(row))
PY
}

main() {
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  echo "== predict: $SAMPLES samples, $NEW_TOKENS new tokens, batch $BATCH, tiny=$TINY; deadline ${DEADLINE_S}s"
  setup || { echo "setup failed"; return 1; }
  # the peer first: its wrapper writes the forced-length generation config and times the prediction loop
  step lf_predict 120 260 env PYTHONPATH="$LF_SITE${LF_PATH_EXTRA:+:$LF_PATH_EXTRA}" DISABLE_VERSION_CHECK=1 \
    NEW_TOKENS="$NEW_TOKENS" GEN_DIR=$W/gen_forced BENCH_JSON="$OUT/lf_predict.json" \
    python3 $PEER/lf_predict.py $PEER/predict.yaml model_name_or_path=$W/model dataset_dir=$W/data \
    output_dir=$W/out_predict max_samples="$SAMPLES" per_device_eval_batch_size="$BATCH" "${LF_EXTRA[@]}"
  step mmtune_predict 90 240 env PYTHONPATH=/tmp/site2:src python3 benchmarks/predict_speed.py "${MM_EXTRA[@]}" \
    --model-dir $W/model --model-as-is --data $W/data/bench.json --samples "$SAMPLES" --new-tokens "$NEW_TOKENS" \
    --batch-size "$BATCH" --cache "$CACHE" --work-dir $W/mm_predict --json "$OUT/mmtune_predict.json"
  [ -f "$OUT/lf_predict.json" ] && [ -f "$OUT/mmtune_predict.json" ] && ratio
  echo "== done after $(( $(date +%s) - START ))s"
}

main 2>&1 | while IFS= read -r line; do printf '[+%s] %s\n' "$(( $(date +%s) - START ))" "$line"; done | tee "$OUT/log"

#!/bin/bash
# Issue 20's preference-training acceptance in one device call: LLaMA-Factory 0.9.5's `stage: dpo`
# (benchmarks/peer/lf_dpo/dpo.yaml through the harness's timing wrapper .peer/llamafactory/lf_train.py) and then
# mmtune's DPO (benchmarks/train_speed.py --stage dpo) on the same model folder (/tmp/lfbench/model: Qwen2-VL-2B
# sizes, random weights, built by the peer harness's prep) and the same pairs (/tmp/lfbench/data/bench_pairs.json:
# bench.json's prompt and image, its answer chosen, the next row's answer rejected, about 563 tokens a side, from
# benchmarks/peer/lf_dpo/make_pairs.py), LoRA r8 on all LM linears, sigmoid loss, beta 0.1, the disabled adapter
# as the reference, batch 8 pairs, bf16, sdpa, 40 steps. From the repo root, with mmtune's wheels (.whl) and the
# peer (.peer: llamafactory/ and lfwhl/) carried:
#     bash benchmarks/gpu_pref_speed.sh
# train_speed.py's --stage flag comes from the `preference` branch (mmtune's stage dpo); on a tree without it the
# mmtune step fails at argument parsing and only the peer's figures are written; MM_STAGE (default "--stage dpo")
# replaces those arguments, e.g. MM_STAGE="--set stage=dpo" on a preference tree whose train_speed.py lacks the flag.
# Writes $OUT/log (every line stamped with seconds since start), $OUT/lf_dpo.json (the peer's step times, steady
# pairs/s over steps 11-40, peak memory), $OUT/dpo.json (train_speed.py's row: samples_per_s are pairs/s, steady
# after its 5 warm-up steps) and $OUT/pref_ratio.json (mmtune over the peer). A step that needs more than the time
# left before DEADLINE_S is skipped.
# Env: DEADLINE_S (570), OUT (/tmp/prout), STEPS (40), BATCH (8), TINY=1: a CPU smoke test of the whole script (a
# 2-layer model, 8 pairs, 3 steps, batch 2, fp32, gradient checkpointing off: LLaMA-Factory 0.9.5's checkpointing
# wrapper breaks on transformers > 5.17's layer calls; LLaMA-Factory already installed in LF_SITE, default
# /tmp/site-lf, plus LF_PATH_EXTRA on its path if set; nothing installed, no nvidia-smi).
set -u
OUT=${OUT:-/tmp/prout}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-570}
TINY=${TINY:-0}
PEER=benchmarks/peer/lf_dpo
LF_SITE=${LF_SITE:-/tmp/site-lf}
if [ "$TINY" = 1 ]; then
  W=${W:-/tmp/lfbench_tiny}; STEPS=${STEPS:-3}; BATCH=${BATCH:-2}
  LF_EXTRA=(bf16=false preprocessing_num_workers=1 dataloader_num_workers=0 disable_gradient_checkpointing=true)
  MM_EXTRA=(--cpu)
else
  W=/tmp/lfbench; STEPS=${STEPS:-40}; BATCH=${BATCH:-8}
  LF_EXTRA=(); MM_EXTRA=()
fi

MM_STAGE=${MM_STAGE:---stage dpo}

STEP_DIR=$OUT
# shellcheck source=gpu_steps.sh
source "$ROOT/benchmarks/gpu_steps.sh"

setup() {  # mmtune's wheels into /tmp/site2; the peer's into LF_SITE; the model folder and data into $W; the pairs
  if [ "$TINY" = 1 ]; then
    PYTHONPATH="$LF_SITE${LF_PATH_EXTRA:+:$LF_PATH_EXTRA}" python3 -c "import llamafactory" || return 1
    [ -f $W/data/bench.json ] || python3 .peer/llamafactory/prepare.py --out $W --tiny --n 8 --device cpu || return 1
  else
    nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl || return 1
    OUT=$OUT/lf_setup WHL=.peer/lfwhl SITE=$LF_SITE DEADLINE_S=200 timeout 240 bash .peer/llamafactory/gpu_run.sh env \
      prep > "$OUT/lf_setup.txt" 2>&1
    [ -f $W/data/bench.json ] || { echo "no data: see $OUT/lf_setup.txt"; return 1; }
  fi
  python3 $PEER/make_pairs.py $W/data
}

ratio() {  # mmtune's row over the peer's, into $OUT/pref_ratio.json
  python3 - "$OUT/lf_dpo.json" "$OUT/dpo.json" "$OUT/pref_ratio.json" <<'PY'
import json, sys
lf, mm = (json.load(open(p)) for p in sys.argv[1:3])
row = {
    "unit": "preference pairs per second, steady steps",
    "lf_pairs_per_s": lf["steady_samples_per_s"], "mmtune_pairs_per_s": mm["samples_per_s"],
    "speed_ratio": mm["samples_per_s"] / lf["steady_samples_per_s"],
    "lf_peak_allocated_gib": lf.get("peak_allocated_gib"), "mmtune_peak_allocated_gib": mm.get("peak_allocated_gib"),
    "batch": [lf["batch_size"], mm["batch"]], "steps": [lf["steps"], mm["steps"]], "device": mm["device"],
}
if row["lf_peak_allocated_gib"] and row["mmtune_peak_allocated_gib"]:
    row["memory_ratio"] = row["mmtune_peak_allocated_gib"] / row["lf_peak_allocated_gib"]
json.dump(row, open(sys.argv[3], "w"), indent=1)
print("[ratio] " + json.dumps(row))
PY
}

main() {
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  echo "== dpo: batch $BATCH pairs, $STEPS steps, tiny=$TINY; deadline ${DEADLINE_S}s"
  setup || { echo "setup failed"; return 1; }
  # the peer first, so each run has the GPU to itself
  step lf_dpo 120 260 env PYTHONPATH="$LF_SITE${LF_PATH_EXTRA:+:$LF_PATH_EXTRA}" DISABLE_VERSION_CHECK=1 \
    BENCH_JSON="$OUT/lf_dpo.json" BENCH_SKIP_SAVE=1 RECORD_VRAM=1 \
    python3 .peer/llamafactory/lf_train.py $PEER/dpo.yaml model_name_or_path=$W/model dataset_dir=$W/data \
    output_dir=$W/out_dpo max_steps="$STEPS" per_device_train_batch_size="$BATCH" "${LF_EXTRA[@]}"
  # --stage dpo: the preference branch's train_speed.py
  step mmtune_dpo 120 280 env PYTHONPATH=/tmp/site2:src python3 benchmarks/train_speed.py "${MM_EXTRA[@]}" \
    --model $W/model --data $W/data/bench_pairs.json --method lora --batch "$BATCH" --steps "$STEPS" $MM_STAGE \
    --output-dir /tmp/ts_dpo --json "$OUT/dpo.json"
  [ -f "$OUT/lf_dpo.json" ] && [ -f "$OUT/dpo.json" ] && ratio
  echo "== done after $(( $(date +%s) - START ))s"
}

main 2>&1 | while IFS= read -r line; do printf '[+%s] %s\n' "$(( $(date +%s) - START ))" "$line"; done | tee "$OUT/log"

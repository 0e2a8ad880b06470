#!/bin/bash
# Issue 7's training-speed acceptance in one device call: LLaMA-Factory 0.9.5 and mmtune on the same model folder
# and data (Qwen2-VL-2B sizes, 563 tokens a sample), full fine-tuning at batch 4 and LoRA at batch 8, each mmtune
# run right after the peer's. From the repo root, with mmtune's wheels (.whl) and the peer (.peer: llamafactory/
# and lfwhl/) carried:
#     bash benchmarks/gpu_train_speed.sh [full] [lora] [qlora] [full_all] [graphs] [check_graphs] [syncs] [anatomy]
#     [old_lora] [old_full]
#     (default: full lora; "full graphs" is the same-call A/B of frozen_block_cuda_graphs; old_lora / old_full
#     run the same measurement on another commit's tree, OLD_TREE, for a same-call A/B of two commits:
#     mkdir -p .old && git archive COMMIT src benchmarks | tar -x -C .old, and carry .old too)
# Writes $OUT/log (every line stamped with seconds since start) and one JSON row per part under $OUT, with the
# peer's figures and the ratios (train_speed.py --peer llamafactory runs the peer's lf_train.py first). A step
# that needs more than the time left before DEADLINE_S is skipped. The first mmtune run of a fresh machine
# compiles (~60 s more with the C++ wrapper): the limits below allow for it.
# Env: DEADLINE_S (570), OUT (/tmp/tsout), STEPS (40), OLD_TREE (.old).
set -u
OUT=${OUT:-/tmp/tsout}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
DEADLINE_S=${DEADLINE_S:-570}; STEPS=${STEPS:-40}
PARTS=${*:-full lora}
START=$(date +%s)
MM=(env PYTHONPATH=/tmp/site2:src python3)
OLD_TREE=${OLD_TREE:-.old}
OLD=(env PYTHONPATH=/tmp/site2:$OLD_TREE/src python3 "$OLD_TREE/benchmarks/train_speed.py")
DATA=(--model /tmp/lfbench/model --data /tmp/lfbench/data/bench.json)

STEP_DIR=$OUT
# shellcheck source=gpu_steps.sh
source "$ROOT/benchmarks/gpu_steps.sh"

main() {
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl || return 1
  # the peer into /tmp/site-lf, the model folder and data into /tmp/lfbench
  OUT=$OUT/lf_setup WHL=.peer/lfwhl SITE=/tmp/site-lf DEADLINE_S=200 timeout 240 bash .peer/llamafactory/gpu_run.sh env prep \
    > "$OUT/lf_setup.txt" 2>&1
  [ -f /tmp/lfbench/data/bench.json ] || { echo "no data: see $OUT/lf_setup.txt"; return 1; }
  for part in $PARTS; do
    case $part in
      full)  # the peer first, then mmtune, then the ratios (train_speed.py --peer)
        step full 150 300 "${MM[@]}" benchmarks/train_speed.py "${DATA[@]}" --method full --batch 4 --steps "$STEPS" \
          --peer llamafactory --output-dir /tmp/ts_full --json "$OUT/full.json"
        ;;
      lora)
        step lora 180 320 "${MM[@]}" benchmarks/train_speed.py "${DATA[@]}" --method lora --batch 8 --steps "$STEPS" \
          --peer llamafactory --output-dir /tmp/ts_lora --json "$OUT/lora.json"
        ;;
      qlora)  # QLoRA (4-bit bitsandbytes base; the wheel carried in .whl), the peer's QLoRA first
        step qlora 180 320 "${MM[@]}" benchmarks/train_speed.py "${DATA[@]}" --method lora --batch 8 --steps "$STEPS" \
          --set quantization_bit=4 --peer llamafactory --peer-set quantization_bit=4 --output-dir /tmp/ts_qlora \
          --json "$OUT/qlora.json"
        ;;
      full_all)  # full fine-tuning with the C++ wrapper on the vision blocks too (compile_cpp_wrapper: all)
        step full_all 90 200 "${MM[@]}" benchmarks/train_speed.py "${DATA[@]}" --method full --batch 4 --steps "$STEPS" \
          --set compile_cpp_wrapper=all --output-dir /tmp/ts_full_all --json "$OUT/full_all.json"
        ;;
      graphs)  # full fine-tuning without the frozen tower's CUDA graphs (on by default): the A/B with "full"
        step graphs 90 200 "${MM[@]}" benchmarks/train_speed.py "${DATA[@]}" --method full --batch 4 --steps "$STEPS" \
          --set frozen_block_cuda_graphs=false --output-dir /tmp/ts_graphs --json "$OUT/graphs.json"
        ;;
      check_graphs)  # the tower's outputs with and without the block graphs, bit for bit, and its forward time
        step check_graphs 90 200 "${MM[@]}" benchmarks/step_anatomy.py "${DATA[@]}" --method full --batch 4 --steps 10 \
          --check-graphs --json "$OUT/check_graphs.json"
        ;;
      syncs)  # the plain LoRA loop: its host syncs a step by call site, and its steps with and without a sync each
        step syncs 90 200 "${MM[@]}" benchmarks/step_anatomy.py "${DATA[@]}" --method lora --batch 8 --steps 15 \
          --syncs --json "$OUT/syncs.json"
        ;;
      anatomy)  # the plain loop, then the same loop fed by the Trainer's data-path variants
        step anatomy 90 200 "${MM[@]}" benchmarks/step_anatomy.py "${DATA[@]}" --method full --batch 4 --steps 15 \
          --loaders --json "$OUT/anatomy.json"
        ;;
      old_lora)  # the LoRA run on OLD_TREE's code (no peer: pair it with "lora" in the same call)
        step old_lora 150 300 "${OLD[@]}" "${DATA[@]}" --method lora --batch 8 --steps "$STEPS" \
          --output-dir /tmp/ts_old_lora --json "$OUT/old_lora.json"
        ;;
      old_full)  # the full fine-tuning run on OLD_TREE's code (pair it with "full")
        step old_full 150 300 "${OLD[@]}" "${DATA[@]}" --method full --batch 4 --steps "$STEPS" \
          --output-dir /tmp/ts_old_full --json "$OUT/old_full.json"
        ;;
      *) echo "unknown part $part" ;;
    esac
  done
}

main 2>&1 | while IFS= read -r line; do printf '[+%s] %s\n' "$(( $(date +%s) - START ))" "$line"; done | tee "$OUT/log"

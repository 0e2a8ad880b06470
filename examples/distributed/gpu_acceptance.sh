#!/bin/bash
# Issue 8's GPU acceptance on one host with two GPUs (the device tool's nvidia-h200-x2), from the repo root:
#
#   bash examples/distributed/gpu_acceptance.sh env prep speed        # one device call each if time is short
#   bash examples/distributed/gpu_acceptance.sh halftext
#   bash examples/distributed/gpu_acceptance.sh prep7b 7b
#
# Needs, carried in the working tree (see benchmarks/README.md): .whl/ with the wheels the GPU image lacks
# (datasets, dill, multiprocess, xxhash, soundfile, cffi, pycparser; for ZeRO: deepspeed and its deps
# hjson, py-cpuinfo, ninja, msgpack, nvidia-ml-py, einops) and .peer/llamafactory/prepare.py (the model
# and data builder: random weights with Qwen2-VL-2B / -7B sizes, 448x448 JPEG + 256 text tokens a sample).
# Figures land in $OUT (one JSON per run, rank 1's row overwrites rank 0's: both ranks time the same
# steps) and in $OUT/log; `summary` prints the 2-GPU / 1-GPU ratios.
set -u
OUT=${OUT:-/tmp/mm8}
W=${W:-/tmp/lfbench}           # 2B-sized model + data
W7=${W7:-/tmp/lfbench7b}       # 7B-sized model + data
WHL=${WHL:-.whl}
SITE=${SITE:-/tmp/site2}
PEER=${PEER:-.peer/llamafactory}
STEPS=${STEPS:-50}
BATCH_LORA=${BATCH_LORA:-8}
BATCH_FULL=${BATCH_FULL:-4}
EXAMPLES=examples/distributed
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --target "$SITE" "$WHL"/*.whl 2>/dev/null || true
export PYTHONPATH=$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH
LAUNCH="python3 -m accelerate.commands.launch"
SPEED=benchmarks/train_speed.py

have_deepspeed() { python3 -c "import deepspeed" 2>/dev/null; }

phase() {
  case $1 in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__, 'gpus', torch.cuda.device_count())"
      have_deepspeed && python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" || echo "deepspeed MISSING: zero3 runs will be skipped"
      ;;
    prep)   # 2B sizes, 512 samples (~1-2 min)
      [ -f $W/model/config.json ] || python3 $PEER/prepare.py --out $W --device cuda
      python3 $EXAMPLES/interleave_text_only.py $W/data/bench.json $W/data/half_text.json --batch $BATCH_LORA --ranks 2
      ;;
    speed)  # 1 GPU vs 2 GPUs at the same per-GPU batch: LoRA and full (LM) fine-tuning, FSDP2 and ZeRO-3
      for m in lora full; do
        b=$([ $m = lora ] && echo $BATCH_LORA || echo $BATCH_FULL)
        CUDA_VISIBLE_DEVICES=0 python3 $SPEED --model $W/model --data $W/data/bench.json --method $m --batch $b \
          --steps $STEPS --json $OUT/1gpu_$m.json
        $LAUNCH --config_file $EXAMPLES/fsdp2_$([ $m = lora ] && echo lora || echo full).yaml $SPEED \
          --model $W/model --data $W/data/bench.json --method $m --batch $b --steps $STEPS --json $OUT/fsdp2_$m.json
        if have_deepspeed; then
          $LAUNCH --config_file $EXAMPLES/deepspeed_zero3.yaml $SPEED --model $W/model --data $W/data/bench.json \
            --method $m --batch $b --steps $STEPS --json $OUT/zero3_$m.json
        fi
      done
      phase summary
      ;;
    halftext)  # rank 0: image batches only, rank 1: text-only batches only (sequential sampler), LoRA
      for cfg in fsdp2_lora deepspeed_zero3; do
        [ $cfg = deepspeed_zero3 ] && ! have_deepspeed && { echo "skip $cfg: no deepspeed"; continue; }
        $LAUNCH --config_file $EXAMPLES/$cfg.yaml -m mmtune.cli train examples/qwen2_vl_lora.yaml \
          model_name_or_path=$W/model dataset=$W/data/half_text.json output_dir=$OUT/halftext_$cfg \
          per_device_train_batch_size=$BATCH_LORA train_sampling_strategy=sequential packing=false \
          max_steps=40 save_strategy="'no'" logging_steps=5 dataloader_num_workers=4
        echo "== halftext $cfg exit $?"; tail -n 3 $OUT/halftext_$cfg/trainer_log.jsonl 2>/dev/null
      done
      ;;
    prep7b)  # 7B sizes (~3-5 min: random init on the GPU, 16 GB written)
      [ -f $W7/model/config.json ] || python3 $PEER/prepare.py --out $W7 --size 7b --device cuda --n 256
      ;;
    7b)  # full fine-tuning (LM; tower + projector frozen) of the 7B sizes with FSDP2: fits? peak memory per GPU
      $LAUNCH --config_file $EXAMPLES/fsdp2_full.yaml $SPEED --model $W7/model --data $W7/data/bench.json \
        --method full --batch $BATCH_FULL --steps 20 --warmup 3 --json $OUT/fsdp2_full_7b.json
      ;;
    summary)
      python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def row(name):
    p = os.path.join(out, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None
for m in ("lora", "full"):
    one = row(f"1gpu_{m}")
    for eng in ("fsdp2", "zero3"):
        two = row(f"{eng}_{m}")
        if one and two:  # samples_per_s is per rank; two ranks at the same per-GPU batch
            print(f"{m:5s} {eng:6s} 1 GPU {one['samples_per_s']:7.2f}/s  2 GPUs {2 * two['samples_per_s']:7.2f}/s  "
                  f"x{2 * two['samples_per_s'] / one['samples_per_s']:.2f}  peak/GPU {two.get('peak_allocated_gib')} GiB "
                  f"(1 GPU {one.get('peak_allocated_gib')} GiB)")
r = row("fsdp2_full_7b")
if r:
    print(f"7B full FSDP2: {2 * r['samples_per_s']:.2f} samples/s on 2 GPUs, peak allocated "
          f"{r.get('peak_allocated_gib')} GiB, reserved {r.get('peak_reserved_gib')} GiB per GPU")
PY
      ;;
    *) echo "unknown phase $1"; return 1 ;;
  esac
}

for ph in ${*:-env prep speed halftext prep7b 7b}; do
  echo "== phase $ph ($(date +%T))"
  phase $ph
done 2>&1 | tee -a "$OUT/log"

#!/bin/bash
# Issue 7's preprocessing acceptance on the GPU machine (16 cores): 20,000 variable-size samples (images
# 200-1200 px a side, 50-1500 text tokens), LLaMA-Factory 0.9.5's preprocessing against mmtune's, same call.
# From the repo root, with mmtune's wheels (.whl) and the peer (.peer: llamafactory/ and lfwhl/) carried:
#     bash benchmarks/gpu_varsize_preproc.sh
# Writes $OUT/log (every line stamped with seconds since start), $OUT/lfsetup/log (the peer's set-up) and
# $OUT/results.json (every figure and the ratios). Each step runs under a timeout; a step that needs more than
# the time left before DEADLINE_S is skipped, the most important first: data, mmtune, the peer at 16
# processes, the per-sample token check, then the rest.
# Env: N (20000), GEN_WORKERS (16), WORKERS (16), DEADLINE_S (570), OUT (/tmp/vpout).
set -u
OUT=${OUT:-/tmp/vpout}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
N=${N:-20000}; GEN_WORKERS=${GEN_WORKERS:-16}; WORKERS=${WORKERS:-16}; DEADLINE_S=${DEADLINE_S:-570}
W=/tmp/lfvar       # LLaMA-Factory work folder: model -> /tmp/lfbench/model, data/{varsize.json,images,dataset_info.json}
R=/tmp/vpres       # raw results, merged into $OUT/results.json at the end
START=$(date +%s)
# each tool its own datasets cache: its first pass pays the JSON -> Arrow conversion, later ones find it
MM=(env PYTHONPATH=/tmp/site2:src OMP_NUM_THREADS=1 HF_DATASETS_CACHE=/tmp/hfds-mm python3)
LF=(env PYTHONPATH=/tmp/site-lf OMP_NUM_THREADS=1 HF_DATASETS_CACHE=/tmp/hfds-lf python3)
MMARGS=(benchmarks/preprocess_dataset.py --model "$W/model" --data "$W/data/varsize.json" --workers "$WORKERS"
        --image-max-pixels 200704 --cutoff-len 1024 --no-repeat)

STEP_DIR=$R
# shellcheck source=gpu_steps.sh
source "$ROOT/benchmarks/gpu_steps.sh"

main() {
  set -x
  export PYTHONUNBUFFERED=1 DISABLE_VERSION_CHECK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  export TOKENIZERS_PARALLELISM=false
  rm -rf "$R" /tmp/hfds-mm /tmp/hfds-lf; mkdir -p "$R"
  nproc; python3 --version; free -g | head -2; df -h /tmp | tail -1
  lscpu | grep -E 'Model name|^CPU\(s\)' || true

  # the peer into /tmp/site-lf, and the model folder (tokenizer + Qwen2-VL processor; preprocessing needs no weights)
  OUT=$OUT/lfsetup WHL=.peer/lfwhl SITE=/tmp/site-lf DEADLINE_S=200 PREP_ARGS=--no-weights \
    timeout 240 bash .peer/llamafactory/gpu_run.sh env prep
  [ -f /tmp/lfbench/model/tokenizer_config.json ] || { echo "no model folder"; return 1; }
  [ -d /tmp/site-lf/llamafactory ] || { echo "no llamafactory"; return 1; }
  # mmtune's wheels (datasets 5.2 and the rest the machine lacks)
  timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl || return 1
  "${MM[@]}" -c "import datasets, transformers, mmtune; print('mmtune side: datasets', datasets.__version__, 'transformers', transformers.__version__)"
  "${LF[@]}" -c "import datasets, llamafactory; print('peer side: datasets', datasets.__version__, 'llamafactory', llamafactory.__version__)"

  # the data: N distinct samples, every draw made in the parent, JPEGs and texts in GEN_WORKERS processes
  step gen 150 240 "${MM[@]}" benchmarks/varsize_data.py --model /tmp/lfbench/model --n "$N" --workers "$GEN_WORKERS" \
    --lf-workdir "$W" || return 1
  du -sh "$W/data/images"; ls -la "$W" "$W/data" | head -20

  # mmtune: cold (JSON not yet converted), warm, and warm with mmtune's own max-pixels rule
  step mm_cold 40 120 "${MM[@]}" "${MMARGS[@]}" --cap-rule peer --json "$R/mm_cold.json"
  step mm_warm 40 120 "${MM[@]}" "${MMARGS[@]}" --cap-rule peer --json "$R/mm_warm.json" --lengths "$R/mm_lengths.json"
  # the peer at 16 processes: cold, then warm (its own JSON cache)
  step lf16_cold 100 200 "${LF[@]}" .peer/llamafactory/preproc_bench.py "$W" 16
  step lf16_warm 100 200 "${LF[@]}" .peer/llamafactory/preproc_bench.py "$W" 16
  # same work: every sample's token count, the peer's against mmtune's (first 2000 rows; cutoff 1024 as timed)
  step lf_lengths 60 150 "${LF[@]}" benchmarks/peer_lengths.py "$W" --max-samples 2000 --num-proc 16 --cutoff-len 1024 \
    --out "$R/lf_lengths.json" && python3 benchmarks/peer_lengths.py --compare "$R/lf_lengths.json" "$R/mm_lengths.json" \
    | tee "$R/compare_1024.txt"
  step mm_mmrule 40 120 "${MM[@]}" "${MMARGS[@]}" --cap-rule mmtune --json "$R/mm_mmrule.json"
  step lf8 120 300 "${LF[@]}" .peer/llamafactory/preproc_bench.py "$W" 8
  # untruncated counts (the image tokens themselves, which truncation at 1024 can hide), first 2000 rows
  step mm_len_full 30 90 "${MM[@]}" "${MMARGS[@]}" --n 2000 --cutoff-len 8192 --cap-rule peer --lengths "$R/mm_len_full.json"
  step lf_len_full 40 150 "${LF[@]}" benchmarks/peer_lengths.py "$W" --max-samples 2000 --num-proc 16 --cutoff-len 8192 \
    --out "$R/lf_len_full.json" && python3 benchmarks/peer_lengths.py --compare "$R/lf_len_full.json" "$R/mm_len_full.json" \
    | tee "$R/compare_full.txt"
  set +x
  python3 - "$R" "$OUT/results.json" <<'PY'
import glob, json, os, re, sys
res, out = sys.argv[1], sys.argv[2]
rows = {}
for path in sorted(glob.glob(os.path.join(res, "mm_*.json"))):
    name = os.path.basename(path)[:-5]
    if "len" not in name:
        rows[name] = json.load(open(path))
for path in sorted(glob.glob(os.path.join(res, "lf*.txt"))):
    m = re.search(r"num_proc=(\d+).*?: ([\d.]+)s for (\d+) samples \(([\d.]+) samples/s\)", open(path).read())
    if m:
        rows[os.path.basename(path)[:-4]] = {"num_proc": int(m[1]), "seconds": float(m[2]), "samples": int(m[3]),
                                             "samples_per_s": float(m[4])}
for name in ("compare_1024", "compare_full"):
    path = os.path.join(res, name + ".txt")
    if os.path.exists(path) and open(path).read().strip():
        rows[name] = json.loads(open(path).read().strip().splitlines()[-1])
mm, lf = rows.get("mm_warm", {}).get("samples_per_s"), rows.get("lf16_warm", rows.get("lf16_cold", {})).get("samples_per_s")
if mm and lf:
    rows["ratio_mm_warm_over_lf16"] = round(mm / lf, 2)
if rows.get("mm_cold", {}).get("samples_per_s") and rows.get("lf16_cold", {}).get("samples_per_s"):
    rows["ratio_cold_over_cold"] = round(rows["mm_cold"]["samples_per_s"] / rows["lf16_cold"]["samples_per_s"], 2)
json.dump(rows, open(out, "w"), indent=1)
print(json.dumps(rows, indent=1))
PY
  echo "== done after $(( $(date +%s) - START ))s"
}

set -o pipefail
main 2>&1 | python3 .peer/llamafactory/tsfilter.py | tee "$OUT/log"

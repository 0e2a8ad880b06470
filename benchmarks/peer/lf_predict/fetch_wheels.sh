#!/bin/bash
# The packages LLaMA-Factory's predict_with_generate demands (its argument check makes jieba, nltk and
# rouge_chinese mandatory; its ComputeSimilarity scores the answers with them) and the GPU machine lacks, as
# wheels in .peer/lfwhl_pred/ (about 21 MB; jieba has only an sdist: built here into a pure-Python wheel).
# Run once, from the project root, where pip reaches PyPI:  bash benchmarks/peer/lf_predict/fetch_wheels.sh
set -eu
DEST=${DEST:-.peer/lfwhl_pred}
PY=${PY:-python3}
mkdir -p "$DEST"
TMP=$(mktemp -d)
"$PY" -m pip download -q --no-deps -d "$TMP" jieba==0.42.1 nltk==3.10.4 rouge-chinese==1.0.3 joblib==1.6.0 six==1.17.0
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$TMP"/jieba-0.42.1.tar.gz
cp "$TMP"/*.whl "$DEST"/
rm -rf "$TMP"
ls -la "$DEST"

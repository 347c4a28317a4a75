#!/usr/bin/env bash
# Embeds the sample images shipped in samples/ with mobilenet_v2_130_224 on DirectRunner.
# Usage: ./run_local.sh [OUT_DIR] [extra pipeline or Beam options]
# OUT_DIR (default out/local) is replaced on every run (--overwrite): it is a demo folder.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
OUT="${1:-out/local}"
shift || true
MODEL=mobilenet_v2_130_224

if handle=$(python -m pipeline.models available "$MODEL"); then
  handle_args=()
else
  cat >&2 <<MSG

##########################################################################################
The TF Hub model for $MODEL cannot be reached from this machine (tfhub.dev / Kaggle did
not answer within 5 seconds and it is not in TFHUB_CACHE_DIR). To show the pipeline
working anyway, this run falls back to a STAND-IN: the same MobileNetV2-1.3 architecture
with RANDOM weights. Its embeddings are NOT MEANINGFUL - do not use them for search.
The output's Parquet metadata records this. It is built by
  python -m pipeline.standin_models --model $MODEL --output .cache/standins
which prints the --model_handle to pass. For real vectors, run where tfhub.dev is
reachable, or put the model on disk or gs:// once (README: "Models without a route to
the hub") and pass it: python -m pipeline.run --model_handle DIR.
##########################################################################################

MSG
  handle=$(python -m pipeline.standin_models --model "$MODEL" --output .cache/standins)
  handle_args=(--model_handle "$handle")
fi

python -m pipeline.run --input 'samples/*' --output "$OUT" --model "$MODEL" "${handle_args[@]}" --overwrite "$@"

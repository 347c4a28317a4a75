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
  echo "tfhub.dev cannot be reached: using a random-weight stand-in (python -m pipeline.standin_models; built once," \
    "about 30 s the first time); for real weights see \"Models without a route to the hub\" in docs/running.md." >&2
  log=$(mktemp)
  if ! handle=$(python -m pipeline.standin_models --model "$MODEL" --output .cache/standins 2>"$log"); then
    cat "$log" >&2
    exit 1
  fi
  rm -f "$log"
  handle="$(cd "$handle" && pwd)"  # absolute: the command printed below works from any folder
  handle_args=(--model_handle "$handle")
fi

status=0
python -m pipeline.run --input samples --output "$OUT" --model "$MODEL" "${handle_args[@]}" --overwrite "$@" || status=$?
if [ "$status" = 0 ] || [ "$status" = 3 ]; then
  echo
  echo "The vectors are in $OUT/embeddings-*.parquet (id, uri, sha256, embedding); read them with:"
  echo "  $PWD/.venv/bin/python -c \"import glob, pandas as pd; print(pd.concat(map(pd.read_parquet, sorted(glob.glob('$OUT/embeddings-*.parquet')))))\""
  if [ "${#handle_args[@]}" -gt 0 ]; then
    echo "Embed your own folder with the same stand-in:"
    echo "  $PWD/.venv/bin/image-embeddings run --input /path/to/photos --output out/photos ${handle_args[*]}"
  fi
fi
exit "$status"

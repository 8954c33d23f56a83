#!/usr/bin/env bash
# The tiny model's life cycle up to the assistant, on CPU: pretrain (the main job), then fine-tune on
# conversations, then print the fine-tuning report (validation loss per source before/after, chat figures).
#   bash scripts/sft_tiny.sh [RUNS_DIR]      (default runs; needs ../shared/data for the conversations)
set -euo pipefail
RUNS=${1:-runs}
python -m launch.train --config configs/tiny.py --workdir "$RUNS/tiny"
python -m launch.sft --config configs/sft_tiny.py --workdir "$RUNS/sft" --config.init_from="$RUNS/tiny/release"
cat "$RUNS/sft/report.md"

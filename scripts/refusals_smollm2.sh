#!/usr/bin/env bash
# Knowledge-based refusals on the real SmolLM2-135M-Instruct (GGUF), CPU (Llama 3 §4.3.6; llm/tasks/refusals.py):
#   1. evaluate the model before fine-tuning on held-out TriviaQA questions (the first $HELD_OUT) and fictional people;
#   2. interrogate it on the next $QUESTIONS questions ($SAMPLES samples each at temperature $TEMPERATURE);
#   3. fine-tune it on the written conversations (configs/refusals_smollm2.py);
#   4. evaluate the fine-tuned release on the same held-out questions, with the before/after table.
#   bash scripts/refusals_smollm2.sh [RUNS_DIR]      (default runs/refusals; needs ../shared)
set -euo pipefail
RUNS=${1:-runs/refusals}
MODEL=${MODEL:-../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}
DATA=${DATA:-../shared/data/evals/triviaqa_validation.jsonl}
HELD_OUT=${HELD_OUT:-300} QUESTIONS=${QUESTIONS:-800} SAMPLES=${SAMPLES:-4} TEMPERATURE=${TEMPERATURE:-0.3}
mkdir -p "$RUNS"
start=$(date +%s)
python -m launch.interrogate --evaluate --checkpoint "$MODEL" --questions "$DATA" --limit "$HELD_OUT" \
    --batch-size 32 --out "$RUNS/before.json"
python -m launch.interrogate --checkpoint "$MODEL" --questions "$DATA" --skip "$HELD_OUT" --limit "$QUESTIONS" \
    --samples "$SAMPLES" --temperature "$TEMPERATURE" --batch-size 32 --out "$RUNS/conversations.jsonl"
rm -rf "$RUNS/sft"  # a fresh fine-tuning run on this interrogation's conversations
python -m launch.sft --config configs/refusals_smollm2.py --workdir "$RUNS/sft" --config.init_from="$MODEL" \
    --config.data.sources.known.path="$RUNS/conversations.known.jsonl" \
    --config.data.sources.unsure.path="$RUNS/conversations.unsure.jsonl" \
    --config.data.sources.unknown.path="$RUNS/conversations.unknown.jsonl"
python -m launch.interrogate --evaluate --checkpoint "$RUNS/sft/release" --questions "$DATA" --limit "$HELD_OUT" \
    --batch-size 32 --baseline "$RUNS/before.json" --out "$RUNS/after.json"
echo "wall time: $(( $(date +%s) - start )) s"

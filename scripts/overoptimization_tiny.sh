#!/usr/bin/env bash
# Reward over-optimisation on CPU (Gao et al. 2022; configs/overoptimization_tiny.py explains it):
#   1. label pairs of the SFT policy's letter-counting replies with the hidden gold preference (right, then short);
#   2. train a proxy reward model on them (configs/overoptimization_proxy_tiny.py);
#   3. RLHF against the proxy, the monitor tracking the gold score on held-out prompts; rlhf.png in the report.
#   bash scripts/overoptimization_tiny.sh [RUNS_DIR] [POLICY]   (defaults runs/overopt, runs/sft/release)
set -euo pipefail
RUNS=${1:-runs/overopt}
POLICY=${2:-runs/sft/release}
PROMPTS=${PROMPTS:-300} SAMPLES=${SAMPLES:-4}
mkdir -p "$RUNS"
start=$(date +%s)
python -m launch.label_pairs --config configs/overoptimization_tiny.py --config.init_from="$POLICY" \
    --out "$RUNS/pairs.jsonl" --prompts "$PROMPTS" --samples "$SAMPLES"
rm -rf "$RUNS/proxy" "$RUNS/rlhf"  # fresh runs on this labelling
python -m launch.reward --config configs/overoptimization_proxy_tiny.py --workdir "$RUNS/proxy" \
    --config.init_from="$POLICY" --config.data.sources.gold.path="$RUNS/pairs.jsonl"
python -m launch.rlhf --config configs/overoptimization_tiny.py --workdir "$RUNS/rlhf" \
    --config.init_from="$POLICY" --config.rlhf.reward_model="$RUNS/proxy/release"
tail -n 4 "$RUNS/rlhf/report.md"
echo "wall time: $(( $(date +%s) - start )) s"

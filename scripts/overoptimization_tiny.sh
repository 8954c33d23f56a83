#!/usr/bin/env bash
# Reward over-optimisation on CPU (Gao et al. 2022; configs/overoptimization_tiny.py explains it):
#   1. label pairs of the SFT policy's replies to HH-RLHF prompts with the gold reward model (runs/reward/release);
#   2. train a proxy reward model on them, a linear probe of the SFT backbone (configs/overoptimization_proxy_tiny.py);
#   3. RLHF against the proxy, the monitor judging by the gold; the gold on prompts it never sees; rlhf.png.
#   bash scripts/overoptimization_tiny.sh [RUNS_DIR] [POLICY] [GOLD] [--config.X=... overrides for steps 1 and 3]
#   (defaults runs/overopt, runs/sft/release, runs/reward/release: `python -m launch.reward --config
#   configs/reward_tiny.py --workdir runs/reward` makes the gold)
set -euo pipefail
RUNS=${1:-runs/overopt}
POLICY=${2:-runs/sft/release}
GOLD=${3:-runs/reward/release}
shift $(( $# < 3 ? $# : 3 ))  # the rest: config overrides of the experiment (e.g. the task), for steps 1 and 3
PROMPTS=${PROMPTS:-150} SAMPLES=${SAMPLES:-4}
mkdir -p "$RUNS"
start=$(date +%s)
python -m launch.label_pairs --config configs/overoptimization_tiny.py --config.init_from="$POLICY" \
    --config.rlhf.gold="$GOLD" "$@" --out "$RUNS/pairs.jsonl" --prompts "$PROMPTS" --samples "$SAMPLES"
rm -rf "$RUNS/proxy" "$RUNS/rlhf"  # fresh runs on this labelling
python -m launch.reward --config configs/overoptimization_proxy_tiny.py --workdir "$RUNS/proxy" \
    --config.init_from="$POLICY" --config.data.sources.gold.path="$RUNS/pairs.jsonl"
python -m launch.rlhf --config configs/overoptimization_tiny.py --workdir "$RUNS/rlhf" \
    --config.init_from="$POLICY" --config.rlhf.gold="$GOLD" --config.rlhf.reward_model="$RUNS/proxy/release" "$@"
tail -n 6 "$RUNS/rlhf/report.md"
echo "wall time: $(( $(date +%s) - start )) s"

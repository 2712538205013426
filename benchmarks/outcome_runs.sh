#!/usr/bin/env bash
# The training runs behind docs/results.md's "Training outcomes" section (HM4SR vs SASRec).
# Every run has a fixed name: re-running the same command resumes it where it stopped (a step
# checkpoint at most 200 steps back), a finished run returns its results at once.
# Usage: bash benchmarks/outcome_runs.sh beauty-screen|beauty|ml100k [seeds...]   (logs in outputs/logs/)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${HM4SR_DATA:-../shared/data}
mkdir -p outputs/logs outputs/outcomes
beauty() {  # beauty NAME VARIANT [overrides...]
  local name=$1 variant=$2; shift 2
  echo "== beauty $name ($(date +%H:%M))"
  python jobs/train.py --dataset beauty --raw-dir "$DATA/amazon-beauty" --prepared-dir outputs/prepared/beauty \
      --variant="$variant" --output "outputs/outcomes/$name" "train.run_name=$name" "$@" \
      > "outputs/logs/$name.log" 2>&1 || { echo "   FAILED: see outputs/logs/$name.log"; return 0; }
  grep -h "^test " "outputs/logs/$name.log" | tail -1
}
ml100k() {
  local name=$1 variant=$2; shift 2
  echo "== ml-100k $name ($(date +%H:%M))"
  python jobs/train.py --dataset movielens --raw-dir "$DATA/ml-100k" --prepared-dir outputs/prepared/ml-100k \
      --variant="$variant" --output "outputs/outcomes/$name" "train.run_name=$name" "$@" \
      > "outputs/logs/$name.log" 2>&1 || { echo "   FAILED: see outputs/logs/$name.log"; return 0; }
  grep -h "^test " "outputs/logs/$name.log" | tail -1
}
what=${1:-}; shift || true
seeds=${*:-2020 2021 2022}
case "$what" in
  beauty-screen)
    # One seed, a 10-epoch budget: which Temporal-MoE setting learns best? Chosen on VALIDATION
    # NDCG@5 only (test metrics of these runs are not looked at for the choice).
    beauty screen-hm4sr hm4sr optim.epochs=10
    beauty screen-tinit03 hm4sr optim.epochs=10 model.temporal_expert_init_std=0.3
    beauty screen-tspan hm4sr optim.epochs=10 model.absolute_time_span_unit=true
    beauty screen-interval hm4sr optim.epochs=10 model.time_embedding=interval
    beauty screen-notmoe -TMoE optim.epochs=10
    beauty screen-sasrec sasrec optim.epochs=10 ;;
  beauty)
    # To early stopping (patience 10 on valid NDCG@5, cap 300 epochs), every seed.
    # HM4SR_EXTRA: the setting chosen by the screen, e.g. "model.temporal_expert_init_std=0.3".
    for seed in $seeds; do
      beauty "beauty-sasrec-s$seed" sasrec "optim.seed=$seed"
      beauty "beauty-hm4sr-s$seed" hm4sr "optim.seed=$seed" ${HM4SR_EXTRA:-}
      beauty "beauty-notmoe-s$seed" -TMoE "optim.seed=$seed" ${HM4SR_EXTRA:-}
      beauty "beauty-noidcl-s$seed" -IDCL "optim.seed=$seed" ${HM4SR_EXTRA:-}
    done ;;
  beauty-iid)
    for seed in $seeds; do
      beauty "beauty-hm4sr-iid-s$seed" hm4sr "optim.seed=$seed" data.bucket_pool_batches=0 ${HM4SR_EXTRA:-}
    done ;;
  ml100k)
    # Equal budget for both models: EPOCHS (default 20) with early stopping inside it.
    for seed in $seeds; do
      ml100k "ml100k-sasrec-s$seed" sasrec "optim.seed=$seed" "optim.epochs=${EPOCHS:-20}"
      ml100k "ml100k-hm4sr-s$seed" hm4sr "optim.seed=$seed" "optim.epochs=${EPOCHS:-20}" ${HM4SR_EXTRA:-}
    done ;;
  *) echo "usage: $0 beauty-screen|beauty|beauty-iid|ml100k [seeds...]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# The real runs quoted in docs/results.md: 2 CPU workers, epoch caps stated per run.
# Usage: bash benchmarks/real_runs.sh ml100k|beauty|scaling   (logs in outputs/logs/)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${HM4SR_DATA:-../shared/data}
run() { local log=outputs/logs/$1.log; shift; echo "== $* (log $log)"; python "$@" > "$log" 2>&1; tail -2 "$log"; }
case "${1:-}" in
  ml100k)
    run ml100k-sasrec jobs/train.py --dataset movielens --raw-dir "$DATA/ml-100k" --prepared-dir outputs/prepared/ml-100k \
        --variant sasrec optim.epochs=${SASREC_EPOCHS:-10} train.run_name=ml100k-sasrec
    run ml100k-hm4sr jobs/train.py --dataset movielens --raw-dir "$DATA/ml-100k" --prepared-dir outputs/prepared/ml-100k \
        --variant hm4sr optim.epochs=${HM4SR_EPOCHS:-10} train.run_name=ml100k-hm4sr ;;
  beauty)
    run beauty-sasrec jobs/train.py --dataset beauty --raw-dir "$DATA/amazon-beauty" --prepared-dir outputs/prepared/beauty \
        --variant sasrec optim.epochs=${SASREC_EPOCHS:-20} train.run_name=beauty-sasrec
    run beauty-hm4sr jobs/train.py --dataset beauty --raw-dir "$DATA/amazon-beauty" --prepared-dir outputs/prepared/beauty \
        --variant hm4sr optim.epochs=${HM4SR_EPOCHS:-20} train.run_name=beauty-hm4sr ;;
  scaling)
    # Same 2 cores either way: 1 worker with 2 threads vs 2 workers with 1 thread each, i.e. the
    # cost of data parallelism (gloo all-reduce + all-gathered negatives) at fixed compute.
    for n in 1 2; do
      rm -rf outputs/ray_results/scaling-${n}w outputs/ray_results/scaling-beauty-${n}w   # fresh runs, not resumes
      run ml100k-sasrec-${n}w jobs/train.py --dataset movielens --raw-dir "$DATA/ml-100k" --prepared-dir outputs/prepared/ml-100k \
          --variant sasrec optim.epochs=1 train.num_workers=$n train.cpus_per_worker=$((2 / n)) train.run_name=scaling-${n}w
      run beauty-hm4sr-${n}w jobs/train.py --dataset beauty --raw-dir "$DATA/amazon-beauty" --prepared-dir outputs/prepared/beauty \
          --variant hm4sr optim.epochs=1 train.num_workers=$n train.cpus_per_worker=$((2 / n)) train.run_name=scaling-beauty-${n}w
    done ;;
  *) echo "usage: $0 ml100k|beauty|scaling" >&2; exit 2 ;;
esac

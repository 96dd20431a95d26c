#!/bin/bash
# Run the investigation's training jobs one after another (nice 15, one thread: 2 shared CPU cores).
# Each line of the queue file: <name> <config> [extra CLI args...]; a job whose run folder has an evaluation is skipped.
cd "$(dirname "$0")/../.."  # the repository root
queue=${1:-experiments/routing_investigation/queue.txt}
while true; do
  line=$(grep -v '^#' "$queue" | grep -v '^$' | while read -r name rest; do
    [ -d "runs/$name/version_0/evaluation" ] || [ -f "runs/$name.running" ] || { echo "$name $rest"; break; }; done)
  [ -z "$line" ] && break
  read -r name config extra <<< "$line"
  touch "runs/$name.running"; rm -rf "runs/$name"
  start=$(date +%s)
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 15 env PYTHONPATH=src:experiments/routing_investigation \
    .venv/bin/python -m moe_mtl fit --config "$config" --trainer.logger.init_args.name "$name" \
    --trainer.logger.init_args.flush_secs 10 $extra > "runs/$name.log" 2>&1
  echo "$name rc=$? wall_s=$(( $(date +%s) - start ))" >> runs/queue.done
  rm -f "runs/$name.running"
done

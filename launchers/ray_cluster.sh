#!/usr/bin/env bash
# Start a Ray cluster for asyncrl by hand (one command per node), then launch from the head.
#
#   head node:     launchers/ray_cluster.sh head
#   every worker:  launchers/ray_cluster.sh worker HEAD_IP
#   then, on the head:
#     python -m asyncrl.launch asyncrl/configs/recipes/qwen3_14b_lpreg_onpolicy.yaml --dry-run
#     python -m asyncrl.launch asyncrl/configs/recipes/qwen3_14b_lpreg_onpolicy.yaml cluster.address=auto
#   stop (every node):  launchers/ray_cluster.sh stop
#
# Every node needs the same Python environment (pip install "asyncrl[ray,vllm]") and the
# run directory, model and data on shared storage. Settings from the environment:
#   RAY_PORT (6379), NODE_IP (the address other nodes reach this one at; default: the
#   first address of `hostname -I`), NUM_GPUS / NUM_CPUS (default: what Ray detects).
set -euo pipefail

RAY_PORT=${RAY_PORT:-6379}
NODE_IP=${NODE_IP:-$(hostname -I | awk '{print $1}')}
resources=()
[[ -n "${NUM_GPUS:-}" ]] && resources+=(--num-gpus "$NUM_GPUS")
[[ -n "${NUM_CPUS:-}" ]] && resources+=(--num-cpus "$NUM_CPUS")
export RAY_USAGE_STATS_ENABLED=0

case "${1:-}" in
  head)
    ray start --head --node-ip-address "$NODE_IP" --port "$RAY_PORT" --include-dashboard=false "${resources[@]}"
    echo "Ray head at $NODE_IP:$RAY_PORT; on every other node: $0 worker $NODE_IP"
    ;;
  worker)
    head=${2:?usage: $0 worker HEAD_IP}
    ray start --address "$head:$RAY_PORT" --node-ip-address "$NODE_IP" "${resources[@]}"
    ;;
  stop)
    ray stop
    ;;
  *)
    echo "usage: $0 head | worker HEAD_IP | stop" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Start the reward servers of one node and keep them running; Ctrl-C (or SIGTERM) stops them all.
#
#   launch/serve_rewards.sh SPEC [LOG_DIR]
#
# SPEC has one server per line: NAME PORT [GPU] [CONFIG.yaml]   ('-' for no GPU; '#' starts a comment), e.g.
#   cer      8101 0 configs/rewards/cer.yaml
#   sim      8102 1 configs/rewards/sim.yaml
#   energy   8103 -
# Each server binds to 127.0.0.1 (set HOST to change it) and logs to LOG_DIR/NAME-PORT.log. The script prints the
# URLs once every /health answers; give them to the trainer's reward client.
set -euo pipefail
spec=${1:?usage: serve_rewards.sh SPEC [LOG_DIR]}
logs=${2:-reward-logs}
host=${HOST:-127.0.0.1}
vocalign=${VOCALIGN:-vocalign}
mkdir -p "$logs"
pids=()
urls=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap stop EXIT INT TERM
while read -r name port gpu config _; do
  [[ -z "${name:-}" || "$name" == \#* ]] && continue
  args=(serve-reward "$name" --host "$host" --port "$port")
  [[ -n "${config:-}" ]] && args+=(--config "$config")
  if [[ -n "${gpu:-}" && "$gpu" != "-" ]]; then
    CUDA_VISIBLE_DEVICES=$gpu $vocalign "${args[@]}" > "$logs/$name-$port.log" 2>&1 &
  else
    $vocalign "${args[@]}" > "$logs/$name-$port.log" 2>&1 &
  fi
  pids+=($!)
  urls+=("$name=http://$host:$port")
done < "$spec"
for entry in "${urls[@]}"; do
  url=${entry#*=}
  for _ in $(seq 600); do
    curl -sf "$url/health" > /dev/null && break
    sleep 0.2
  done
  curl -sf "$url/health" > /dev/null || { echo "reward server ${entry%%=*} at $url did not start; see $logs" >&2; exit 1; }
done
printf 'ready %s\n' "${urls[@]}"
wait

#!/usr/bin/env bash
# Figures for the replicated core, on a local three-node cluster:
#  1. time from SIGKILL of the leader to the next acknowledged write (5 trials, median);
#  2. Raft log size before and after a snapshot, after a burst of writes.
# Usage: scripts/bench/failover.sh [trials]   (starts and stops its own cluster)
set -euo pipefail
cd "$(dirname "$0")/../.."
TRIALS=${1:-5}
export LOCAL_CLUSTER_DIR="${LOCAL_CLUSTER_DIR:-$PWD/.local-cluster-bench}"
export ORCHESTRATOR_RATE_LIMIT__RPS=1000000 ORCHESTRATOR_RATE_LIMIT__BURST=1000000
export API_BASE_PORT="${API_BASE_PORT:-8180}" PEER_BASE_PORT="${PEER_BASE_PORT:-9180}"
LC=scripts/local-cluster.sh
rm -rf "$LOCAL_CLUSTER_DIR"
trap '$LC down >/dev/null 2>&1 || true' EXIT
$LC up >/dev/null
TOKEN=$($LC token --tenant ops --scope "orchestrator:read orchestrator:write orchestrator:admin" | tail -1)
API=/api/v1/runtime/orchestrator
now_ms() { date +%s%3N; }
post() { # node path body -> http status
  curl -s -o /dev/null -w "%{http_code}" -m 10 -X POST "http://127.0.0.1:$((API_BASE_PORT + $1))$API$2" \
    -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d "$3" || true
}
[ "$(post 1 /dags '{"dag_id":"bench","owner":"bench"}')" = 200 ] || { echo "cannot create the dag" >&2; exit 1; }

seq_no=0
write_via() { seq_no=$((seq_no + 1)); post "$1" /runs "{\"dag_id\":\"bench\",\"run_type\":\"manual\",\"from\":\"2020-01-01T00:00:00Z\",\"to\":\"2020-01-01T00:00:$(printf %02d $((seq_no % 60)))Z\",\"x\":1}" >/dev/null; }

figures=()
for t in $(seq "$TRIALS"); do
  leader=$($LC leader 60)
  survivor=$(( leader % 3 + 1 ))
  $LC kill "$leader" >/dev/null
  start=$(now_ms)
  while :; do
    seq_no=$((seq_no + 1))
    code=$(post "$survivor" /runs "{\"dag_id\":\"bench\",\"run_type\":\"backfill\",\"from\":\"2021-01-01T00:00:00Z\",\"to\":\"2021-01-01T00:$(printf %02d $((seq_no / 60 % 60))):$(printf %02d $((seq_no % 60)))Z\"}")
    [ "$code" = 200 ] && break
    [ $(( $(now_ms) - start )) -gt 60000 ] && { echo "no write within 60 s" >&2; exit 1; }
  done
  took=$(( $(now_ms) - start ))
  figures+=("$took")
  echo "trial $t: killed leader node $leader; next acknowledged write via node $survivor after ${took} ms"
  $LC start "$leader" >/dev/null
  $LC leader 60 >/dev/null
  sleep 1
done
median=$(printf '%s\n' "${figures[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo "FIGURE leader SIGKILL -> next acknowledged write: median ${median} ms over ${TRIALS} trials (${figures[*]})"

leader=$($LC leader 60)
for i in $(seq 1 600); do
  post "$leader" /runs "{\"dag_id\":\"bench\",\"run_type\":\"backfill\",\"from\":\"2022-01-01T00:00:00Z\",\"to\":\"2022-01-01T$(printf %02d $((i / 3600))):$(printf %02d $((i / 60 % 60))):$(printf %02d $((i % 60)))Z\"}" >/dev/null
done
snap=$(curl -s -m 60 -X POST "http://127.0.0.1:$((API_BASE_PORT + leader))$API/cluster/snapshot" -H "Authorization: Bearer $TOKEN")
echo "FIGURE snapshot on the leader after 600 more writes: $snap"

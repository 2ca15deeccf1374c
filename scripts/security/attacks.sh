#!/usr/bin/env bash
# The issue-9 attacks against one fresh single node, printed as a before/after table.
# Usage: scripts/security/attacks.sh BINARY API_PORT   (peer port = API_PORT + 1)
# Run with ORCHESTRATOR_EXECUTOR__SHELL_ENABLED=true and ORCHESTRATOR_EXECUTOR__SHELL_USER=nobody
# (as root), or ORCHESTRATOR_DEV_MODE=true, to see the shell-scope refusal: with shell on and
# neither, the node refuses to start.
BIN=$1; P=$2; D=$(mktemp -d); DATA=$D/data
API=http://127.0.0.1:$P/api/v1/runtime/orchestrator
$BIN server --node-id 1 --api-addr 127.0.0.1:$P --peer-addr 127.0.0.1:$((P+1)) --data-dir $DATA >$D/node.log 2>&1 &
NODE=$!
for i in $(seq 100); do curl -s -m1 http://127.0.0.1:$P/readyz | grep -q '"ready":true' && break; sleep 0.1; done
tok() { $BIN token --data-dir $DATA --tenant "$1" --scope "$2" | tail -1; }
W=$(tok acme "orchestrator:read orchestrator:write")
A=$(tok acme "orchestrator:read orchestrator:write orchestrator:admin")
echo "modes: $(stat -c '%a %n' $DATA $DATA/*.secret | tr '\n' ' ')"
code=$(curl -s -o $D/dag.json -w '%{http_code}' -X POST $API/dags -H "Authorization: Bearer $W" -H 'Content-Type: application/json' \
  -d "{\"dag_id\":\"peek\",\"tasks\":[{\"task_id\":\"t\",\"kind\":\"shell\",\"command\":\"cat $DATA/dev-jwt.secret; echo; env | grep -c .\"}]}")
echo "shell DAG by a writer: $code $(cat $D/dag.json)"
if [ "$code" = 200 ]; then
  run=$(curl -s -X POST $API/runs -H "Authorization: Bearer $W" -H 'Content-Type: application/json' -d '{"dag_id":"peek","run_type":"manual"}' | sed 's/.*"run_id":"\([^"]*\)".*/\1/')
  sleep 2
  log=$(curl -s $API/runs/$run/tasks/t/attempts/1/log -H "Authorization: Bearer $W")
  grep -q "$(cat $DATA/dev-jwt.secret)" <<<"$log" && echo "  -> task log shows the signing secret" || echo "  -> log: ${log:0:200}"
fi
echo "tenant admin GET /cluster/status: $(curl -s -o /dev/null -w '%{http_code}' $API/cluster/status -H "Authorization: Bearer $A")"
echo "tenant admin POST /cluster/members: $(curl -s -o /dev/null -w '%{http_code}' -X POST $API/cluster/members -H "Authorization: Bearer $A" -H 'Content-Type: application/json' -d '{"node_id":7,"api_addr":"8.8.8.8:80","peer_addr":"8.8.8.8:9080"}')"
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST $API/dags -H "Authorization: Bearer $W" -H 'Content-Type: application/json' \
  -d '{"dag_id":"ssrf","tasks":[{"task_id":"t","kind":"http","url":"http://169.254.169.254/latest/meta-data/"}]}')
echo "http task to 169.254.169.254 accepted: $code"
# Slowloris: partial headers, still open after 12 s?
python3 - $P <<'PY'
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n"); s.settimeout(15); t = time.time()
try:
    d = s.recv(10)
    print("slowloris: closed after %.1f s" % (time.time() - t))
except socket.timeout:
    print("slowloris: still open after 15 s")
PY
kill $NODE; wait $NODE 2>/dev/null; rm -rf "$D"

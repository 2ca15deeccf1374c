#!/usr/bin/env python3
"""The benchmark suite (issue 10): starts its own three-node cluster of the given binary
on loopback, runs each workload with real JWTs, and prints a table (and JSON with --json)
with the machine, the commit and the date.

Workloads (each bounded in time; medians over repeats, every repeat's p99 shown):
  dags       POST /dags with distinct ids, closed loop (wrk, connections over all nodes)
  backfill   POST /runs backfills of distinct windows of one DAG
  get        GET /dags/{id}, 500 ids, linearizable reads
  chain40    a 40-task noop chain: trigger -> done, as the client sees it
  chain40sh  the same chain of shell `true` tasks
  fan40      1 -> 40 -> 1 noop
  backlog    chain40 beside thousands of queued runs that have nothing due
  mixed      5 minutes of writes, reads, scheduled runs and shell tasks at once, with a
             probe reading every 50 ms: any background stall shows as a slow probe read
  firelag    N DAGs firing every 5 s: fire lag (window end -> run created) and window end
             -> run done, leader RSS and CPU
  catchup    one DAG catches up a backlog of one-second windows while 20 others fire
             every second: catch-up time and the others' fire lag meanwhile
  failover   leader SIGKILL under load -> first acknowledged write through a survivor

Run through scripts/bench.sh (which builds the release binary); --quick is the seconds-
long smoke that CI runs against the dev build.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = "/api/v1/runtime/orchestrator"
LC = os.path.join(ROOT, "scripts", "local-cluster.sh")
SCOPES = "orchestrator:read orchestrator:write orchestrator:admin orchestrator:shell"


def now_ms():
    return time.time() * 1000.0


class Bench:
    """The cluster under test and how to talk to it."""

    def __init__(self, args):
        self.args = args
        self.dir = os.path.join(ROOT, ".bench-cluster")
        self.api_base = args.api_base
        self.env = dict(os.environ)
        self.env.update({
            "LOCAL_CLUSTER_DIR": self.dir,
            "API_BASE_PORT": str(args.api_base),
            "PEER_BASE_PORT": str(args.peer_base),
            "ORCH_BIN": args.bin,
            # The bench tenant's limits, raised through configuration.
            "ORCHESTRATOR_RATE_LIMIT__RPS": "1000000",
            "ORCHESTRATOR_RATE_LIMIT__BURST": "1000000",
            "ORCHESTRATOR_LIMITS__MAX_DAGS_PER_TENANT": "100000000",
            # firelag fires every 5 s and catchup every second (the default allows a minute).
            "ORCHESTRATOR_LIMITS__MIN_SCHEDULE_INTERVAL_MS": "1000",
            # Backfills of a paused DAG queue runs; the bench makes hundreds of thousands.
            "ORCHESTRATOR_LIMITS__MAX_QUEUED_RUNS_PER_DAG": "100000000",
            "ORCHESTRATOR_LIMITS__MAX_ACTIVE_RUNS_PER_TENANT": "100000000",
            # `catchup` fires a backlog of thousands of windows, not the newest 100.
            "ORCHESTRATOR_SCHEDULER__MAX_CATCHUP": "100000",
            # Every load connection comes from 127.0.0.1.
            "ORCHESTRATOR_ADMISSION__MAX_CONNECTIONS_PER_ADDRESS": "4096",
        })
        self.token = None

    def lc(self, *a, check=True):
        r = subprocess.run([LC, *a], env=self.env, capture_output=True, text=True, timeout=180)
        if check and r.returncode != 0:
            raise RuntimeError(f"local-cluster.sh {' '.join(a)}: {r.stdout}{r.stderr}")
        return r.stdout.strip()

    def up(self):
        subprocess.run(["rm", "-rf", self.dir], check=True)
        self.lc("up")
        self.token = self.lc("token", "--tenant", "bench", "--scope", SCOPES).splitlines()[-1]
        self.ops = self.lc("token", "--tenant", "ops", "--scope", SCOPES).splitlines()[-1]

    def down(self):
        self.lc("down", check=False)

    def leader(self):
        return int(self.lc("leader", "60"))

    def term(self):
        """The highest Raft term any node reports (0 if none answers): a rise outside the
        failover workload is an election the load caused."""
        terms = [0]
        for node in (1, 2, 3):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.api_base + node}/readyz", timeout=2) as r:
                    terms.append(int(json.loads(r.read())["term"]))
            except urllib.error.HTTPError as e:
                try:
                    terms.append(int(json.loads(e.read())["term"]))
                except (ValueError, KeyError, TypeError):
                    pass
            except (urllib.error.URLError, OSError, TimeoutError, ValueError, KeyError, TypeError):
                pass
        return max(terms)

    def url(self, node, path):
        return f"http://127.0.0.1:{self.api_base + node}{BASE}{path}"

    def http(self, method, node, path, body=None, timeout=10, token=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url(node, path), data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            try:
                return e.code, json.loads(e.read() or b"null")
            except ValueError:
                return e.code, None
        except (urllib.error.URLError, OSError, TimeoutError):
            return 0, None

    def must(self, method, node, path, body=None):
        s, v = self.http(method, node, path, body, timeout=30)
        if s != 200:
            raise RuntimeError(f"{method} {path}: {s} {v}")
        return v

    def pid(self, node):
        with open(os.path.join(self.dir, f"node{node}.pid")) as f:
            return int(f.read().strip())


# ---------------------------------------------------------------------------------------
# Closed-loop HTTP load with wrk: one thread per node, connections spread over them.

WRK_COMMON = r"""
local nodes = {%(ports)s}
local idx = 0
function setup(thread)
  idx = idx + 1
  thread.addr = wrk.lookup("127.0.0.1", tostring(nodes[(idx - 1) %% #nodes + 1]))[1]
  thread:set("tid", idx)
end
wrk.headers["Authorization"] = "Bearer %(token)s"
wrk.headers["Content-Type"] = "application/json"
local n = 0
"""

WRK_REQUEST = {
    "dags": r"""
function request()
  n = n + 1
  local body = string.format('{"dag_id":"w%(tag)s_%%d_%%d","tasks":[{"task_id":"a","kind":"noop"}]}', tid, n)
  return wrk.format("POST", "%(base)s/dags", nil, body)
end
""",
    "backfill": r"""
function request()
  n = n + 1
  -- one-second windows, distinct per (repeat, thread, request), all between 2000 and 2020
  local t = 946684800 + ((%(tag)s %% 97) * 64 + tid) * 100000 + n
  local body = string.format('{"dag_id":"bf","run_type":"backfill","from":"%%s","to":"%%s"}',
    os.date("!%%Y-%%m-%%dT%%H:%%M:%%SZ", t), os.date("!%%Y-%%m-%%dT%%H:%%M:%%SZ", t + 1))
  return wrk.format("POST", "%(base)s/runs", nil, body)
end
""",
    "get": r"""
function request()
  n = n + 1
  return wrk.format("GET", string.format("%(base)s/dags/g_%%d", (n * 7 + tid * 131) %% 500))
end
""",
}


def to_ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(b, kind, seconds, connections, tag):
    """Run one wrk load; returns {rate, p50, p99, errors}."""
    ports = ",".join(str(b.api_base + n) for n in (1, 2, 3))
    script = (WRK_COMMON % {"ports": ports, "token": b.token}
              + WRK_REQUEST[kind] % {"base": BASE, "tag": tag})
    done_lua = r"""
function done(summary, latency, requests)
  io.write(string.format("BENCH non2xx=%d\n", summary.errors.status))
end
"""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script + done_lua)
        path = f.name
    try:
        r = subprocess.run(["wrk", "-t3", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s",
                            "-s", path, f"http://127.0.0.1:{b.api_base + 1}"],
                           capture_output=True, text=True, timeout=seconds + 60)
    finally:
        os.unlink(path)
    out = r.stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for pct, v, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M):
        lat[pct] = to_ms(v, unit)
    errors = int(re.search(r"BENCH non2xx=(\d+)", out).group(1))
    sock = re.search(r"Socket errors: (.*)", out)
    return {"rate": rate, "p50_ms": lat.get("50"), "p99_ms": lat.get("99"), "non_2xx": errors,
            "socket_errors": sock.group(1) if sock else None}


def load_workload(b, kind, args):
    if kind == "backfill":
        b.must("POST", 1, "/dags", {"dag_id": "bf", "tasks": [{"task_id": "a", "kind": "noop"}], "paused": True})
    if kind == "get":
        for i in range(500):
            b.must("POST", 1 + i % 3, "/dags", {"dag_id": f"g_{i}", "tasks": [{"task_id": "a", "kind": "noop"}]})
    repeats = []
    for rep in range(args.repeats):
        repeats.append(wrk(b, kind, args.duration, args.connections, f"{int(time.time()) % 100000}{rep}"))
    return {
        "rate_median": statistics.median(r["rate"] for r in repeats),
        "p99_ms": [r["p99_ms"] for r in repeats],
        "p50_ms": [r["p50_ms"] for r in repeats],
        "non_2xx": sum(r["non_2xx"] for r in repeats),
        "repeats": repeats,
    }


# ---------------------------------------------------------------------------------------
# DAG shapes: trigger -> done as the client sees it.

def chain(n, kind):
    tasks = []
    for i in range(n):
        t = {"task_id": f"t{i}", "kind": kind}
        if kind == "shell":
            t["command"] = "true"
        if i:
            t["depends_on"] = [f"t{i - 1}"]
        tasks.append(t)
    return tasks


def fan(n):
    return ([{"task_id": "src", "kind": "noop"}]
            + [{"task_id": f"m{i}", "kind": "noop", "depends_on": ["src"]} for i in range(n)]
            + [{"task_id": "sink", "kind": "noop", "depends_on": [f"m{i}" for i in range(n)]}])


def run_to_done(b, dag_id, node, deadline_s=120):
    t0 = now_ms()
    v = b.must("POST", node, "/runs", {"dag_id": dag_id, "run_type": "manual"})
    run = v["run_id"]
    end = time.time() + deadline_s
    while time.time() < end:
        s, v = b.http("GET", node, f"/runs/{run}")
        if s == 200 and v["state"] in ("done", "failed", "cancelled"):
            if v["state"] != "done":
                raise RuntimeError(f"{dag_id} {run} ended {v['state']}")
            return now_ms() - t0
        time.sleep(0.002)
    raise RuntimeError(f"{dag_id} {run} not done within {deadline_s} s")


def shape_workload(b, name, tasks, args):
    b.must("POST", 1, "/dags", {"dag_id": name, "tasks": tasks})
    node = b.leader()
    run_to_done(b, name, node)  # warm-up
    times = [run_to_done(b, name, node) for _ in range(args.shape_repeats)]
    return {"median_ms": statistics.median(times), "all_ms": [round(t, 1) for t in times]}


def backlog_workload(b, args):
    """chain40 beside runs that exist but have nothing due: `--backlog` backfill runs queued
    behind one run of a 10-minute shell task (max_active_runs 1), on a DAG of their own."""
    import concurrent.futures
    b.must("POST", 1, "/dags", {"dag_id": "backlog", "max_active_runs": 1,
                                "tasks": [{"task_id": "a", "kind": "shell", "command": "sleep 600"}]})
    day0 = 946684800

    def trigger(i):
        t = day0 + i * 60
        body = {"dag_id": "backlog", "run_type": "backfill",
                "from": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)),
                "to": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t + 60))}
        return b.must("POST", 1 + i % 3, "/runs", body)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(trigger, range(args.backlog)))
    r = shape_workload(b, "chain40bl", chain(40, "noop"), args)
    r["backlog"] = args.backlog
    return r


# ---------------------------------------------------------------------------------------
# Everything at once: the stalls a single workload does not show.

def mixed_workload(b, args):
    """`--mixed-seconds` of writes (POST /dags) and linearizable reads (GET /dags/{id}),
    each closed-loop over a quarter of `--connections`, while `--mixed-dags` noop DAGs
    and 10 shell DAGs (`sleep 0.5`) fire every 5 s. A probe reads one DAG every 50 ms
    from each node in turn: a snapshot, compaction, purge or election that stalls the
    node shows as a probe read over 100 ms (issue 10: none may)."""
    seconds = args.mixed_seconds
    for i in range(args.mixed_dags):
        b.must("POST", 1 + i % 3, "/dags", {"dag_id": f"mx_{i}", "schedule": "*/5 * * * * *",
                                            "tasks": [{"task_id": "a", "kind": "noop"}]})
    for i in range(10):
        b.must("POST", 1 + i % 3, "/dags", {"dag_id": f"mxs_{i}", "schedule": "*/5 * * * * *",
                                            "tasks": [{"task_id": "a", "kind": "shell",
                                                       "command": "sleep 0.5"}]})
    for i in range(500):  # what the reads read (the `get` workload's ids)
        b.must("POST", 1 + i % 3, "/dags", {"dag_id": f"g_{i}", "tasks": [{"task_id": "a", "kind": "noop"}]})
    stop = threading.Event()
    probes = []

    def probe():
        i = 0
        while not stop.is_set():
            i += 1
            t = time.time()
            s, _ = b.http("GET", 1 + i % 3, "/dags/mx_0", timeout=10)
            probes.append(((time.time() - t) * 1000.0, s))
            stop.wait(max(0.0, 0.05 - (time.time() - t)))

    loads = {}

    def load(kind):
        loads[kind] = wrk(b, kind, seconds, max(3, args.connections // 4), f"{int(time.time()) % 100000}9")

    t0 = now_ms()
    threads = [threading.Thread(target=probe)] + [threading.Thread(target=load, args=(k,)) for k in ("dags", "get")]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    t1 = now_ms()
    time.sleep(6)  # the last windows' runs finish
    leader = b.leader()
    lag, shell = [], {"done": 0, "failed": 0, "other": 0}
    for r in list_runs(b, leader, "run_type=scheduled"):
        if not r["dag_id"].startswith("mx"):
            continue
        end = parse_ts(r["window"]["to"])
        if not t0 <= end <= t1:
            continue
        lag.append(parse_ts(r["created_at"]) - end)
        if r["dag_id"].startswith("mxs_"):
            shell[r["state"] if r["state"] in ("done", "failed") else "other"] += 1
    # Quiet again for the workloads after this one.
    for i in range(args.mixed_dags):
        b.must("POST", 1, f"/dags/mx_{i}/pause", {})
    for i in range(10):
        b.must("POST", 1, f"/dags/mxs_{i}/pause", {})
    pct = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(len(xs) * p))] if xs else None
    ms = [p for p, _ in probes]
    return {"seconds": seconds, "dags": args.mixed_dags,
            "writes": loads.get("dags"), "reads": loads.get("get"),
            "probe_ms": {"n": len(ms), "p50": pct(ms, 0.5), "p99": pct(ms, 0.99), "max": max(ms) if ms else None,
                         "over_100": sum(1 for x in ms if x > 100),
                         "non_2xx": sum(1 for _, s in probes if s != 200)},
            "fire_lag_ms": {"p50": pct(lag, 0.5), "p99": pct(lag, 0.99), "windows": len(lag)},
            "shell_runs": shell}


# ---------------------------------------------------------------------------------------
# Scheduled DAGs: fire lag and window -> done.

def proc_stats(pid):
    with open(f"/proc/{pid}/status") as f:
        rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, cpu_s


def parse_ts(s):
    from datetime import datetime
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1000.0


def firelag_workload(b, args):
    n, seconds = args.fire_dags, args.fire_seconds
    for i in range(n):
        b.must("POST", 1 + i % 3, "/dags", {"dag_id": f"f_{i}", "schedule": "*/5 * * * * *",
                                            "tasks": [{"task_id": "a", "kind": "noop"}]})
    leader = b.leader()
    pid = b.pid(leader)
    _, cpu0 = proc_stats(pid)
    t0 = time.time()
    peak_rss = 0.0
    while time.time() - t0 < seconds:
        rss, _ = proc_stats(pid)
        peak_rss = max(peak_rss, rss)
        time.sleep(1)
    _, cpu1 = proc_stats(pid)
    # Only the windows that ended within the measured time count: the DAGs go on
    # firing while the runs are read, and a run created a moment before it is read is
    # not done yet.
    measured_until_ms = time.time() * 1000
    time.sleep(6)  # let the last windows' runs finish before reading them
    fire, done, runs, cursor = [], [], 0, None
    for _ in range(10000):
        q = "/runs?run_type=scheduled&limit=500" + (f"&cursor={cursor}" if cursor else "")
        v = b.must("GET", leader, q)
        for r in v["runs"]:
            end = parse_ts(r["window"]["to"])
            if end > measured_until_ms:
                continue
            runs += 1
            fire.append(parse_ts(r["created_at"]) - end)
            if r.get("ended_at"):
                done.append(parse_ts(r["ended_at"]) - end)
        cursor = v.get("next_cursor")
        if not cursor:
            break
    pct = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(len(xs) * p))] if xs else None
    return {"dags": n, "seconds": seconds, "runs": runs,
            "fire_lag_ms": {"p50": pct(fire, 0.5), "p99": pct(fire, 0.99)},
            "done_ms": {"p50": pct(done, 0.5), "p99": pct(done, 0.99), "not_done": runs - len(done)},
            "leader_peak_rss_mb": round(peak_rss, 1),
            "leader_cores": round((cpu1 - cpu0) / seconds, 2)}


def list_runs(b, node, query):
    """Every run a `/runs` query lists, through all its pages."""
    out, cursor = [], None
    for _ in range(10000):
        v = b.must("GET", node, f"/runs?{query}&limit=500" + (f"&cursor={cursor}" if cursor else ""))
        out.extend(v["runs"])
        cursor = v.get("next_cursor")
        if not cursor:
            return out
    return out


def catchup_workload(b, args):
    """One DAG catches up `--catchup-windows` one-second windows while 20 others fire
    every second: how long the catch-up takes, and the others' fire lag meanwhile (one
    DAG's backlog must not hold back the rest)."""
    n = args.catchup_windows
    for i in range(20):
        b.must("POST", 1 + i % 3, "/dags", {"dag_id": f"cb_{i}", "schedule": "* * * * * *",
                                            "tasks": [{"task_id": "a", "kind": "noop"}]})
    time.sleep(3)
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - n))
    t0 = now_ms()
    b.must("POST", 1, "/dags", {"dag_id": "cu", "schedule": "* * * * * *", "catchup": True,
                                "start_date": start, "tasks": [{"task_id": "a", "kind": "noop"}]})
    leader = b.leader()
    fired = 0
    while now_ms() - t0 < 300000:
        # Windows from the start up to the DAG's creation: the backlog to catch up.
        fired = sum(1 for r in list_runs(b, leader, "dag_id=cu")
                    if parse_ts(r["window"]["to"]) <= t0)
        if fired >= n - 1:
            break
        time.sleep(0.5)
    t1 = now_ms()
    time.sleep(2)
    lag = []
    for i in range(20):
        for r in list_runs(b, leader, f"dag_id=cb_{i}&run_type=scheduled"):
            end = parse_ts(r["window"]["to"])
            if t0 <= end <= t1:
                lag.append(parse_ts(r["created_at"]) - end)
    pct = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(len(xs) * p))] if xs else None
    return {"windows": n, "fired": fired, "catchup_ms": round(t1 - t0),
            "others_fire_lag_ms": {"p50": pct(lag, 0.5), "p99": pct(lag, 0.99),
                                   "max": max(lag) if lag else None, "windows": len(lag)}}


# ---------------------------------------------------------------------------------------
# Failover: writes at ~100/s, SIGKILL the leader, first acknowledged write after it.

def failover_workload(b, args):
    b.must("POST", 1, "/dags", {"dag_id": "fo", "tasks": [{"task_id": "a", "kind": "noop"}], "paused": True})
    seq = [0]

    def write(node):
        seq[0] += 1
        t = 1262304000 + seq[0]
        f = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
        e = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t + 1))
        return b.http("POST", node, "/runs", {"dag_id": "fo", "run_type": "backfill", "from": f, "to": e},
                      timeout=2)[0]

    out = []
    for _ in range(args.failover_trials):
        leader = b.leader()
        survivor = leader % 3 + 1
        for _ in range(20):  # 100 writes/s before the kill
            write(survivor)
            time.sleep(0.01)
        subprocess.run(["kill", "-KILL", str(b.pid(leader))], check=True)
        t0 = now_ms()
        while now_ms() - t0 < 60000:
            if write(survivor) == 200:
                break
            time.sleep(0.01)
        out.append(now_ms() - t0)
        b.lc("start", str(leader))
        b.leader()
        time.sleep(2)
    return {"median_ms": statistics.median(out), "max_ms": max(out), "all_ms": [round(x) for x in out]}


# ---------------------------------------------------------------------------------------

def machine():
    load = os.getloadavg()
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {"cores": os.cpu_count(), "load_1m": round(load[0], 2), "kernel": platform.release(),
            "commit": commit + ("-dirty" if dirty else ""),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def table(results, m):
    rows = [f"orchestrator bench — commit {m['commit']}, {m['date']}, {m['cores']} cores, load {m['load_1m']}",
            "", "| workload | result | every repeat's p99 / runs |", "| --- | --- | --- |"]
    fmt = lambda xs: ", ".join("-" if x is None else f"{x:.0f} ms" for x in xs)
    for name, r in results.items():
        # A leader change under load is a finding: say so on the workload's row.
        label = f"{name} ({r['elections']} elections)" if r.get("elections") else name
        if "error" in r:
            rows.append(f"| {label} | ERROR: {r['error']} | |")
        elif "rate_median" in r:
            rows.append(f"| {label} | {r['rate_median']:,.0f}/s median; non-2xx {r['non_2xx']} | p99 {fmt(r['p99_ms'])} |")
        elif name == "firelag":
            rows.append(f"| {label}: {r['dags']} DAGs /5 s, {r['seconds']} s | fire lag p50 {r['fire_lag_ms']['p50']:.0f} ms,"
                        f" p99 {r['fire_lag_ms']['p99']:.0f} ms; window -> done p99 {r['done_ms']['p99'] or 0:.0f} ms"
                        f" ({r['done_ms']['not_done']} not done) | {r['runs']} runs; leader RSS {r['leader_peak_rss_mb']} MB,"
                        f" {r['leader_cores']} cores |")
        elif name == "catchup":
            o = r["others_fire_lag_ms"]
            lag = (f"p50 {o['p50']:.0f} ms, p99 {o['p99']:.0f} ms, max {o['max']:.0f} ms" if o["windows"]
                   else "none ended meanwhile")
            rows.append(f"| {label}: {r['fired']}/{r['windows']} one-second windows | caught up in {r['catchup_ms']} ms;"
                        f" 20 other DAGs' fire lag meanwhile {lag} | {o['windows']} windows of the others |")
        elif name == "failover":
            rows.append(f"| {label} | median {r['median_ms']:.0f} ms, max {r['max_ms']:.0f} ms | {r['all_ms']} |")
        elif name == "mixed":
            w, rd, p, f = r["writes"], r["reads"], r["probe_ms"], r["fire_lag_ms"]
            rows.append(f"| {label}: {r['seconds']} s, {r['dags']}+10 shell DAGs /5 s | writes {w['rate']:,.0f}/s"
                        f" (p99 {w['p99_ms']:.0f} ms), reads {rd['rate']:,.0f}/s (p99 {rd['p99_ms']:.0f} ms);"
                        f" probe p50 {p['p50']:.0f} ms, p99 {p['p99']:.0f} ms, max {p['max']:.0f} ms,"
                        f" {p['over_100']} of {p['n']} over 100 ms | fire lag p99 {f['p99'] or 0:.0f} ms of"
                        f" {f['windows']} windows; shell runs {r['shell_runs']} |")
        else:
            rows.append(f"| {label} | {r['median_ms']:.0f} ms median | {r['all_ms']} |")
    return "\n".join(rows)


WORKLOADS = ["dags", "backfill", "get", "chain40", "chain40sh", "fan40", "backlog", "mixed", "firelag",
             "catchup", "failover"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="the orchestrator binary")
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke (CI)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk repeat")
    ap.add_argument("--connections", type=int, default=63)
    ap.add_argument("--shape-repeats", type=int, default=5)
    ap.add_argument("--fire-dags", type=int, default=1000)
    ap.add_argument("--fire-seconds", type=int, default=60)
    ap.add_argument("--failover-trials", type=int, default=5)
    ap.add_argument("--catchup-windows", type=int, default=1000)
    ap.add_argument("--backlog", type=int, default=5000, help="runs queued in `backlog`")
    ap.add_argument("--mixed-seconds", type=int, default=300)
    ap.add_argument("--mixed-dags", type=int, default=100)
    ap.add_argument("--api-base", type=int, default=8280)
    ap.add_argument("--peer-base", type=int, default=9280)
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.duration, args.connections = 1, 2, 12
        args.shape_repeats, args.fire_dags, args.fire_seconds, args.failover_trials = 1, 20, 12, 1
        args.backlog, args.catchup_windows = 100, 100
        args.mixed_seconds, args.mixed_dags = 10, 10
    b = Bench(args)
    results = {}
    try:
        b.up()
        for name in args.workloads.split(","):
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            term = b.term()
            try:
                if name in ("dags", "backfill", "get"):
                    results[name] = load_workload(b, name, args)
                elif name == "chain40":
                    results[name] = shape_workload(b, "chain40", chain(40, "noop"), args)
                elif name == "chain40sh":
                    results[name] = shape_workload(b, "chain40sh", chain(40, "shell"), args)
                elif name == "fan40":
                    results[name] = shape_workload(b, "fan40", fan(40), args)
                elif name == "backlog":
                    results[name] = backlog_workload(b, args)
                elif name == "mixed":
                    results[name] = mixed_workload(b, args)
                elif name == "firelag":
                    results[name] = firelag_workload(b, args)
                elif name == "catchup":
                    results[name] = catchup_workload(b, args)
                elif name == "failover":
                    results[name] = failover_workload(b, args)
                else:
                    raise RuntimeError(f"unknown workload {name}")
            except Exception as e:  # a failed workload is a finding: report it, go on
                results[name] = {"error": str(e)[:300]}
            if name != "failover":
                results[name]["elections"] = b.term() - term
    finally:
        b.down()
    m = machine()
    print(table(results, m))
    if args.json:
        print(json.dumps({"machine": m, "results": results}, indent=1))
    failed = [n for n, r in results.items()
              if "error" in r or r.get("non_2xx")
              or (n == "mixed" and (r["probe_ms"]["non_2xx"] or any(x and x.get("non_2xx") for x in (r["writes"], r["reads"]))))]
    if failed:
        print(f"bench: failed or answered non-2xx: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Chaos suite for orchestrator: a workload, nemeses, a history recorder and a checker.

Each scenario starts a fresh three-node cluster, runs a workload for a while, injects a
fault (the nemesis) in the middle of it, heals, waits for convergence and checks the
history and the final state of every node:

  1 no acknowledged write is lost          5 one X-Request-Id maps to one run
  2 at most one run per (dag_id, window)   6 the majority keeps accepting writes
  3 no due window is skipped               7 every node converges to one state digest
  4 attempts strictly increase, never two  8 no panic in any node log
    running at once                       9 no two attempts of one task overlap in
                                            time, as an external witness saw them
                                            (but a machine frozen longer than the
                                            lease: see FREEZE_EXEC_BOUND_MS)
 10 tenants are isolated: a tenant lists and reads its own runs and DAGs only, and
    an X-Request-Id sent by two tenants gives each a run of its own

Properties 1-5 hold per tenant. `--workload normal` (the default) is one tenant with one
sequential client of each kind; `--workload heavy` is three tenants with their own
tokens and DAGs, concurrent writers (hundreds of acknowledged writes per second before
the fault: `writes_per_s`, per trial) and 20 s shell tasks beside the short ones.

The witness (local backend): every shell task of the workload appends
`run/task/attempt start|end <CLOCK_BOOTTIME ns> <pid>` to <out>/witness-*.log, outside
every node's data dir, and a watcher thread here notes when the last process of a started attempt's
process group died without writing `end` (SIGKILL of the group cannot be trapped). An attempt
is taken as running from its start line until its end line, or until the watcher saw
its process gone; one with neither is running until the end of the trial.

--fault-scope process (default) signals only a node's server process; node signals
the server and every process below it (its task children too), like a machine freeze.

Backends: `local` (processes from scripts/local-cluster.sh on 127.0.0.N, partitions
with iptables on the peer ports) and `docker` (the compose cluster in cluster/).
Only the standard library is used. Everything is bounded in time and stops by itself.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = "/api/v1/runtime/orchestrator"
SCOPES = "orchestrator:read orchestrator:write orchestrator:admin orchestrator:shell"
# Separate runs (CI's smoke while a full run goes on) need their own ports and chain.
CHAIN = os.environ.get("CHAOS_CHAIN", "ORCH_CHAOS")
API_BASE = int(os.environ.get("CHAOS_API_BASE", "8380"))
PEER_BASE = int(os.environ.get("CHAOS_PEER_BASE", "9380"))
DOCKER_CHAIN = "ORCH_CHAOS_DOCKER"


def now_ms():
    return int(time.time() * 1000)


def mono_ns():
    """The witness clock: CLOCK_BOOTTIME, which is what a shell reads from /proc/uptime."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


# /proc/uptime has centiseconds: "12345.67" -> "12345670000000" ns, with no fork.
_SH_NOW = 'read u _ </proc/uptime; u=${u%.*}${u#*.}0000000'


RESOLUTION_MS = 10  # of the witness's start/end stamps (/proc/uptime)
# A whole machine frozen longer than the lease (node-scope pause-executor): the old
# attempt is frozen, so alive, while its successor runs, and after the thaw it executes
# until a fence check kills it (the executor checks every 200 ms; the keeper, frozen too,
# at once on waking). No lease can do better: only the resource can refuse a stale
# attempt, by its attempt number (the fencing token every task gets). So an overlap with
# a frozen part and at most this much execution with neither frozen is that documented
# bound, counted apart when the successor started while the old attempt was frozen; more
# execution, or any other overlap, is a violation.
FREEZE_EXEC_BOUND_MS = 250  # the 200 ms fence check, the kill, one 20 ms witness poll


def witness_cmd(path, body):
    """A shell task that tells the witness when it starts (with its pid) and ends."""
    if not path:
        return body
    me = "$ORCHESTRATOR_RUN_ID/$ORCHESTRATOR_TASK_ID/$ORCHESTRATOR_ATTEMPT"
    return (f'{_SH_NOW}; echo "{me} start $u $$" >>{path}; {body}; rc=$?; '
            f'{_SH_NOW}; echo "{me} end $u $$" >>{path}; exit $rc')


def proc_groups():
    """Process group id -> [(pid, state, starttime ticks)] of every process now."""
    groups = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        groups.setdefault(int(fields[2]), []).append((int(d), fields[0], int(fields[19])))
    return groups


def group_state(groups, pid, start_ns):
    """The state of the task whose shell (pid `pid`, the leader of its own process group,
    as the executor starts it) wrote a start line at `start_ns`: None once no process of
    that group is left (zombies count as gone), "T" if every one left is stopped
    (SIGSTOP: frozen), else "R". A pid cannot be reused while its group has members;
    a group leader younger than the start line is a reused pid, not our task."""
    hz = os.sysconf("SC_CLK_TCK")
    members = [m for m in groups.get(pid, []) if m[1] not in ("Z", "X", "x")]
    for p, _, starttime in members:
        if p == pid and starttime * 1_000_000_000 // hz > start_ns + 1_000_000_000 // hz:
            return None
    if not members:
        return None
    return "T" if all(m[1] in ("T", "t") for m in members) else "R"


def subtract(seg, holes):
    """[s, e] less the given sub-intervals, as a list of segments."""
    out, cur = [], seg[0]
    for a, c in sorted(holes):
        if a > cur:
            out.append((cur, min(a, seg[1])))
        cur = max(cur, c)
    if cur < seg[1]:
        out.append((cur, seg[1]))
    return [x for x in out if x[1] > x[0]]


def meet(xs, ys):
    return sum(max(0, min(a[1], b[1]) - max(a[0], b[0])) for a in xs for b in ys)


class Witness:
    """Reads the witness file as it grows and watches the process of every attempt
    that has started and not ended; `intervals()` gives each attempt's time alive."""

    def __init__(self, path, poll=0.02):
        self.path, self.poll = path, poll
        open(path, "w").close()
        self.starts = {}  # (run, task, attempt, pid) -> start ns
        self.ends = {}  # same key -> end ns (end line, or first seen dead)
        self.how = {}  # same key -> "end" | "died"
        # Same key -> [[from, to]]: seen stopped (frozen) from the first to the last of
        # consecutive polls that saw it stopped; an under-estimate, so the time counted
        # as executing is an over-estimate.
        self.frozen = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.pos = 0
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def read(self):
        with open(self.path) as f:
            f.seek(self.pos)
            data = f.read()
        cut = data.rfind("\n") + 1  # only whole lines
        self.pos += len(data[:cut].encode())
        for line in data[:cut].splitlines():
            parts = line.split()
            if len(parts) != 4:
                continue
            try:
                run, task, attempt = parts[0].split("/")
                key = (run, task, int(attempt), int(parts[3]))
                ns = int(parts[2])
            except ValueError:
                continue
            if parts[1] == "start":
                self.starts[key] = ns
            elif parts[1] == "end":  # /proc/uptime truncates to 10 ms: round the end up
                self.ends[key], self.how[key] = ns + 10_000_000, "end"

    def scan(self):
        with self.lock:
            self.read()
            open_keys = [(k, s) for k, s in self.starts.items() if k not in self.ends]
            if not open_keys:
                return
            seen = mono_ns()  # before the scan: whatever is found alive lived up to here at least
            groups = proc_groups()
            gone_by = mono_ns()  # after the scan: whatever is found gone had died by here
            for key, s in open_keys:
                state = group_state(groups, key[3], s)
                if state is None:
                    self.read()  # an end line may have landed since
                    if key not in self.ends:
                        self.ends[key], self.how[key] = gone_by, "died"
                    continue
                fr = self.frozen.setdefault(key, [])
                if state == "T":
                    if fr and fr[-1][2]:
                        fr[-1][1] = seen  # still stopped at this poll
                    else:
                        fr.append([mono_ns(), mono_ns(), True])  # stopped from (at most) now
                elif fr:
                    fr[-1][2] = False

    def loop(self):
        while not self.stop.is_set():
            try:
                self.scan()
            except Exception:
                pass
            time.sleep(self.poll)

    def intervals(self):
        """Stop watching; every attempt as (key, start, end, how); an attempt neither
        ended nor seen dead is running until now, the end of the trial."""
        self.stop.set()
        self.t.join(timeout=5)
        self.scan()
        end = mono_ns()
        with self.lock:
            return [(k, s, self.ends.get(k, end), self.how.get(k, "running"),
                     [(a, c) for a, c, _ in self.frozen.get(k, []) if c > a]) for k, s in self.starts.items()]

    @staticmethod
    def overlaps(intervals):
        """Pairs of attempts of one task (run_id + task_id) alive at the same time: `ms`
        alive at once (a frozen process counts: it resumes where it was), `exec_ms` of
        that with neither seen frozen."""
        by_task, out = {}, []
        for k, s, e, how, frozen in intervals:
            by_task.setdefault((k[0], k[1]), []).append((s, e, k[2], k[3], how, frozen))
        for (run, task), xs in by_task.items():
            xs.sort()
            for i, a in enumerate(xs):
                for c in xs[i + 1:]:
                    ov = min(a[1], c[1]) - max(a[0], c[0])
                    if ov > 0:
                        ex = meet(subtract((a[0], a[1]), a[5]), subtract((c[0], c[1]), c[5]))
                        # Whether the later attempt started while the earlier one was frozen.
                        started_frozen = any(fa <= c[0] <= fc for fa, fc in a[5])
                        out.append({"run": run, "task": task, "ms": round(ov / 1e6, 1), "exec_ms": round(ex / 1e6, 1),
                                    "started_frozen": started_frozen,
                                    "a": {"attempt": a[2], "pid": a[3], "ended": a[4]},
                                    "b": {"attempt": c[2], "pid": c[3], "ended": c[4]}})
        return out


def http(method, url, token=None, body=None, headers=None, timeout=5.0):
    """(status, json-or-text, headers); status 0 means no answer (unknown outcome)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status, hdrs = r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, dict(e.headers)
    except Exception as e:  # timeouts, refused connections: the outcome is unknown
        return 0, str(e), {}
    try:
        return status, json.loads(raw), hdrs
    except ValueError:
        return status, raw.decode(errors="replace"), hdrs


class LocalBackend:
    """Three processes via scripts/local-cluster.sh, node N on 127.0.0.N."""

    def __init__(self, workdir, api_base=API_BASE, peer_base=PEER_BASE):
        self.env = dict(os.environ, LOCAL_CLUSTER_DIR=workdir, API_BASE_PORT=str(api_base),
                        PEER_BASE_PORT=str(peer_base), DISTINCT_IPS="1",
                        ORCHESTRATOR_EXECUTOR__HEARTBEAT_MS="300",
                        ORCHESTRATOR_EXECUTOR__LEASE_MS="3000",
                        ORCHESTRATOR_SCHEDULER__TICK_MS="100",
                        ORCHESTRATOR_RAFT__SNAPSHOT_AFTER_LOGS="300",
                        ORCHESTRATOR_RAFT__LOGS_KEPT_AFTER_SNAPSHOT="50",
                        ORCHESTRATOR_RATE_LIMIT__RPS="100000",
                        ORCHESTRATOR_RATE_LIMIT__BURST="100000",
                        # The workload schedules every second (the default allows a minute).
                        ORCHESTRATOR_LIMITS__MIN_SCHEDULE_INTERVAL_MS="1000",
                        # Shell tasks append to the witness file as the suite's own user:
                        # a local trial, which dev mode says.
                        ORCHESTRATOR_DEV_MODE="true",
                        # Every writer of the workload connects from one address.
                        ORCHESTRATOR_ADMISSION__MAX_CONNECTIONS_PER_ADDRESS="4096")
        self.workdir, self.api_base, self.peer_base = workdir, api_base, peer_base
        self.nodes = [1, 2, 3]
        self.scope = "process"  # or "node": signals reach the node's task children too
        self.witness_path = None  # set per trial: shell tasks report to it
        self.removing = []  # background removals of the dirs of earlier trials

    def lc(self, *args):
        r = subprocess.run([os.path.join(ROOT, "scripts/local-cluster.sh"), *args], env=self.env,
                           capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"local-cluster {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout.strip()

    def api(self, n):
        return f"http://127.0.0.{n}:{self.api_base + n}"

    def up(self):
        """A fresh cluster. The last trial's dir is moved aside and removed in the
        background: the heavy workload leaves thousands of attempt dirs, which take
        seconds to remove on a busy disk."""
        if os.path.exists(self.workdir):
            old = f"{self.workdir}.old-{time.monotonic_ns()}"
            os.rename(self.workdir, old)
            self.removing.append(subprocess.Popen(["rm", "-rf", old]))
        self.removing = [p for p in self.removing if p.poll() is None]
        self.heal()
        self.lc("up")

    def cleanup(self):
        """Wait (bounded) for the background removals of old cluster dirs."""
        for p in self.removing:
            try:
                p.wait(timeout=300)
            except subprocess.TimeoutExpired:
                pass

    def down(self):
        self.heal()
        left = [p for n in self.nodes for p in self.tree(n)]
        try:
            self.lc("down")
        except Exception:
            pass
        for p in left:  # task children outlive their server on SIGTERM/SIGKILL
            signal_pid(p, "KILL")

    def pid(self, n):
        try:
            return int(open(os.path.join(self.workdir, f"node{n}.pid")).read().strip())
        except (OSError, ValueError):
            return None

    def tree(self, n):
        """Every process below node n's server (its task shells and their children)."""
        root = self.pid(n)
        if not root:
            return []
        kids = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                st = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            ppid = int(st[st.rindex(")") + 2:].split()[1])
            kids.setdefault(ppid, []).append(int(d))
        out, todo = [], list(kids.get(root, []))
        while todo:
            p = todo.pop()
            out.append(p)
            todo += kids.get(p, [])
        return out

    def signal_node(self, n, sig):
        """Node scope: freeze the server first (it spawns nothing more), then everything
        below it until no new process shows up, then deliver `sig` to all of it."""
        root = self.pid(n)
        if not root:
            return
        if sig == "CONT":
            for p in self.tree(n):
                signal_pid(p, "CONT")
            return
        signal_pid(root, "STOP")
        seen = set()
        for _ in range(20):
            new = [p for p in self.tree(n) if p not in seen]
            if not new:
                break
            for p in new:
                signal_pid(p, "STOP")
            seen.update(new)
        if sig == "KILL":
            for p in seen:
                signal_pid(p, "KILL")

    def token(self, tenant="ops", scopes=SCOPES):
        return self.lc("token", "--tenant", tenant, "--scope", scopes, "--ttl", "2h").splitlines()[-1]

    def kill(self, n):
        if self.scope == "node":
            self.signal_node(n, "KILL")
        self.lc("kill", str(n))

    def start(self, n):
        self.lc("start", str(n))

    def stop(self, n):
        if self.scope == "node":
            self.signal_node(n, "STOP")
        self.lc("stop", str(n))

    def cont(self, n):
        if self.scope == "node":
            self.signal_node(n, "CONT")
        self.lc("cont", str(n))

    def terminate(self, n):
        pid = open(os.path.join(self.workdir, f"node{n}.pid")).read().strip()
        subprocess.run(["kill", "-TERM", pid])
        for _ in range(200):
            if subprocess.run(["kill", "-0", pid], capture_output=True).returncode != 0:
                break
            time.sleep(0.05)
        os.remove(os.path.join(self.workdir, f"node{n}.pid"))

    def cut(self, a, b):
        """Drop peer traffic between nodes a and b (clients still reach both)."""
        for src, dst in ((a, b), (b, a)):
            subprocess.run(["iptables", "-A", CHAIN, "-s", f"127.0.0.{src}", "-d", f"127.0.0.{dst}",
                            "-p", "tcp", "--dport", str(self.peer_base + dst), "-j", "DROP"], check=True)

    def heal(self):
        subprocess.run(["iptables", "-N", CHAIN], capture_output=True)
        if subprocess.run(["iptables", "-C", "INPUT", "-j", CHAIN], capture_output=True).returncode != 0:
            subprocess.run(["iptables", "-I", "INPUT", "-j", CHAIN], check=True)
        subprocess.run(["iptables", "-F", CHAIN], check=True)

    def log(self, n):
        try:
            return open(os.path.join(self.workdir, f"node{n}.log"), errors="replace").read()
        except OSError:
            return ""


class DockerBackend(LocalBackend):
    """The compose cluster in cluster/: docker kill/pause/stop, partitions with host
    iptables on the bridge."""

    def __init__(self, workdir):
        super().__init__(workdir)
        self.compose = ["docker-compose", "-f", os.path.join(ROOT, "cluster/docker-compose.yml"),
                        "-f", os.path.join(ROOT, "cluster/chaos.override.yml"), "-p", "orchchaos"]

    def dc(self, *args):
        r = subprocess.run([*self.compose, *args], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def api(self, n):
        return f"http://127.0.0.1:{8080 + n}"

    def up(self):
        self.heal()
        self.dc("down", "-v")
        self.dc("up", "-d")
        wait(lambda: leader(self) is not None, 120, "a leader")

    def down(self):
        self.heal()
        self.dc("down", "-v")

    def token(self, tenant="ops", scopes=SCOPES):
        return subprocess.run(["docker", "exec", "orchchaos_node1_1", "/orchestrator", "token", "--config",
                               "/etc/orchestrator.toml", "--tenant", tenant, "--scope", scopes, "--ttl", "2h"],
                              capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]

    def kill(self, n):
        self.dc("kill", "-s", "KILL", f"node{n}")

    def start(self, n):
        self.dc("start", f"node{n}")

    def stop(self, n):
        self.dc("pause", f"node{n}")

    def cont(self, n):
        self.dc("unpause", f"node{n}")

    def terminate(self, n):
        self.dc("stop", "-t", "20", f"node{n}")

    # Containers talk over the host's bridge, so host iptables (DOCKER-USER, with bridge
    # netfilter on) can drop the peer traffic between two of them.
    def cut(self, a, b):
        for src, dst in ((a, b), (b, a)):
            subprocess.run(["iptables", "-A", DOCKER_CHAIN, "-s", f"172.28.0.1{src}", "-d", f"172.28.0.1{dst}",
                            "-p", "tcp", "--dport", "9080", "-j", "DROP"], check=True)

    def heal(self):
        subprocess.run(["iptables", "-N", DOCKER_CHAIN], capture_output=True)
        if subprocess.run(["iptables", "-C", "DOCKER-USER", "-j", DOCKER_CHAIN], capture_output=True).returncode != 0:
            subprocess.run(["iptables", "-I", "DOCKER-USER", "-j", DOCKER_CHAIN], check=True)
        subprocess.run(["iptables", "-F", DOCKER_CHAIN], check=True)

    def log(self, n):
        return subprocess.run([*self.compose, "logs", "--no-color", f"node{n}"], capture_output=True, text=True).stdout


def signal_pid(pid, sig):
    subprocess.run(["kill", f"-{sig}", str(pid)], capture_output=True)


def wait(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if pred():
                return True
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def leader(b):
    for n in b.nodes:
        s, v, _ = http("GET", b.api(n) + "/readyz", timeout=1)
        if s == 200 and isinstance(v, dict) and v.get("state") == "leader":
            return n
    return None


class History:
    """Every operation as invoke / ok / fail / unknown, with times and the node used."""

    def __init__(self, path):
        self.f = open(path, "w")
        self.lock = threading.Lock()
        self.ops = []

    def record(self, **op):
        op["t"] = now_ms()
        with self.lock:
            self.ops.append(op)
            self.f.write(json.dumps(op) + "\n")

    def close(self):
        self.f.close()


# The workloads (--workload). `normal` is the workload of runs 1-3 (the smoke profile in
# CI): one tenant, one sequential client of each kind. `heavy` has several tenants, each
# with its own token and DAG set, many concurrent writers and long shell tasks.
WORKLOADS = {
    "normal": {
        "tenants": ["ops"],  # the suite's operator token
        "triggerers": 1, "trigger_pause": 0.15,
        "updaters": 1, "update_pause": 0.5,
        "readers": 1, "read_pause": 0.2,
        "long_every": None,  # no long tasks but the executor nemeses' own
        "shared_keys": False,
        "node_env": {},
    },
    "heavy": {
        # "alpha" is a prefix of "alpha2": keys built per tenant must keep them apart.
        "tenants": ["alpha", "alpha2", "beta"],
        "triggerers": 12, "trigger_pause": 0.0,  # closed loop: a new trigger as soon as one is answered
        "updaters": 2, "update_pause": 0.0,  # concurrent compare-and-set updates of one DAG
        "readers": 1, "read_pause": 0.01,
        "long_every": 3.0, "long_sleep": 20,  # a 20 s shell task per tenant every 3 s
        "shared_keys": True,  # one X-Request-Id sent by every tenant
        # Long tasks hold slots for 20 s: ~7 per tenant at once, plus the short ones.
        "node_env": {"ORCHESTRATOR_EXECUTOR__SLOTS": "48"},
    },
}
# The tenants of the heavy workload may define shell DAGs but are not operators.
TENANT_SCOPES = "orchestrator:read orchestrator:write orchestrator:shell"
WRITES = ("trigger", "update")


class Tenant:
    """One tenant of the workload: its token, its DAG ids and what it was acknowledged.
    The scheduled and versioned DAGs have the same ids in every tenant (tick1, tick2,
    cfg: each tenant's own); the manual DAGs of the heavy workload carry the tenant's
    name, so a listing shows whose runs it holds."""

    def __init__(self, name, token, unique):
        self.name, self.token = name, token
        suffix = f"-{name}" if unique else ""
        self.work, self.long = "work" + suffix, "long" + suffix
        self.acked_runs = {}  # run_id -> X-Request-Id
        self.key_runs = {}  # X-Request-Id -> set of run ids answered
        self.acked_versions = []  # versions of cfg acknowledged to an update

    def dags(self, wp, long_sleep):
        """The DAG specs this tenant creates (`long` only when the workload runs long tasks)."""
        dags = [
            {"dag_id": "tick1", "schedule": "* * * * * *", "tasks": [{"task_id": "n", "kind": "noop"}]},
            {"dag_id": "tick2", "schedule": "*/2 * * * * *", "catchup": True,
             "tasks": [{"task_id": "s", "kind": "shell", "command": witness_cmd(wp, "sleep 0.3")}]},
            {"dag_id": self.work, "tasks": [{"task_id": "a", "kind": "shell", "command": witness_cmd(wp, "sleep 0.2"),
                                             "retries": 2, "retry_delay": "200ms"},
                                            {"task_id": "b", "kind": "noop", "depends_on": ["a"]}]},
            {"dag_id": "cfg", "owner": f"{self.name}-v0"},
        ]
        if long_sleep:
            dags.append({"dag_id": self.long, "tasks": [{"task_id": "l", "kind": "shell", "retries": 2,
                                                         "retry_delay": "100ms",
                                                         "command": witness_cmd(wp, f"sleep {long_sleep}")}]})
        return dags

    def run_dags(self):
        """The DAG ids whose runs this tenant may see (`long`: also the executor nemeses'
        DAG when the tenant is the suite's own)."""
        return {"tick1", "tick2", self.work, self.long}


class Workload:
    """Per tenant: scheduled DAGs firing every 1-2 s, manual triggers with X-Request-Id
    keys (retried on another node after a timeout), DAG updates with `version`, reads of
    acknowledged runs from every node and, in the heavy workload, long shell tasks and
    one X-Request-Id sent by every tenant. `spec` is one of WORKLOADS."""

    def __init__(self, b, tenants, history, rng, spec):
        self.b, self.tenants, self.h, self.rng, self.spec = b, tenants, history, rng, spec
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = []

    def setup(self):
        """Create every tenant's DAGs (on node 1, as that tenant)."""
        for t in self.tenants:
            for d in t.dags(self.b.witness_path, self.spec.get("long_sleep") if self.spec["long_every"] else None):
                s, v, _ = http("POST", self.b.api(1) + BASE + "/dags", t.token, d, timeout=20)
                if s != 200:
                    raise RuntimeError(f"setup {t.name}/{d['dag_id']}: {s} {v}")

    def node(self, rng):
        return rng.choice(self.b.nodes)

    def pause(self, seconds, status=200):
        """Wait between two operations of one client; True once the workload stops. After
        no answer at all (status 0: every node down or cut off) wait at least 0.1 s, so
        closed-loop clients do not spin on refused connections."""
        if status == 0:
            seconds = max(seconds, 0.1)
        return self.stop.wait(seconds) if seconds > 0 else self.stop.is_set()

    def trigger(self, t, rng, dag_id, key):
        """One manual trigger of `dag_id` as tenant `t` with X-Request-Id `key`: an
        unknown outcome (no answer) is retried with the same key on another node.
        Returns the last status (0: no node answered)."""
        nodes = rng.sample(self.b.nodes, len(self.b.nodes))
        for attempt, n in enumerate(nodes):
            self.h.record(op="trigger", phase="invoke", tenant=t.name, node=n, key=key, attempt=attempt, dag_id=dag_id)
            s, v, _ = http("POST", self.b.api(n) + BASE + "/runs", t.token, {"dag_id": dag_id, "run_type": "manual"},
                           {"X-Request-Id": key}, timeout=3)
            if s == 200:
                self.h.record(op="trigger", phase="ok", tenant=t.name, node=n, key=key, run_id=v["run_id"])
                with self.lock:
                    t.acked_runs[v["run_id"]] = key
                    t.key_runs.setdefault(key, set()).add(v["run_id"])
                return s
            phase = "unknown" if s == 0 else "fail"
            self.h.record(op="trigger", phase=phase, tenant=t.name, node=n, key=key, status=s)
            if s != 0:
                return s  # a definite failure: nothing to retry
            # Unknown outcome: retry the same key against another node.
        return 0

    def triggers(self, t, rng):
        """A client triggering the tenant's manual DAG, a fresh key each time."""
        while not self.stop.is_set():
            s = self.trigger(t, rng, t.work, str(uuid.UUID(int=rng.getrandbits(128))))
            if self.pause(self.spec["trigger_pause"], s):
                break

    def shared_triggers(self, rng):
        """One key sent by every tenant in turn: idempotency records are per tenant, so
        each must get a run of its own (the checker compares them)."""
        while not self.stop.is_set():
            key = str(uuid.UUID(int=rng.getrandbits(128)))
            for t in self.tenants:
                s = self.trigger(t, rng, t.work, key)
            if self.pause(0.2, s):
                break

    def long_triggers(self, t, rng):
        """A run of the tenant's long DAG (one shell task of `long_sleep` s) every `long_every` s."""
        while not self.stop.is_set():
            s = self.trigger(t, rng, t.long, str(uuid.UUID(int=rng.getrandbits(128))))
            if self.pause(self.spec["long_every"], s):
                break

    def updates(self, t, rng):
        """Compare-and-set updates of the tenant's `cfg`: read its version, write with it.
        Concurrent updaters conflict (409); each acknowledged version must be unique."""
        while not self.stop.is_set():
            n = self.node(rng)
            s, v, _ = http("GET", self.b.api(n) + BASE + "/dags/cfg", t.token, timeout=3)
            if s == 200:
                ver = v["version"]
                body = {"dag_id": "cfg", "owner": f"{t.name}-v{ver + 1}-{rng.randrange(1 << 30)}", "version": ver}
                self.h.record(op="update", phase="invoke", tenant=t.name, node=n, version=ver)
                s, v, _ = http("POST", self.b.api(n) + BASE + "/dags", t.token, body, timeout=3)
                if s == 200:
                    self.h.record(op="update", phase="ok", tenant=t.name, node=n, version=v["version"])
                    with self.lock:
                        t.acked_versions.append(v["version"])
                else:
                    self.h.record(op="update", phase="unknown" if s == 0 else "fail", tenant=t.name, node=n, status=s)
            if self.pause(self.spec["update_pause"], s):
                break

    def reads(self, t, rng):
        """Reads of the tenant's acknowledged runs, from every node in turn."""
        i, s = 0, 200
        while not self.stop.is_set():
            with self.lock:
                runs = list(t.acked_runs)
            if runs:
                run = rng.choice(runs)
                n = self.b.nodes[i % len(self.b.nodes)]
                i += 1
                s, v, _ = http("GET", self.b.api(n) + BASE + f"/runs/{run}", t.token, timeout=3)
                phase = "ok" if s == 200 else ("unknown" if s in (0, 503) else "fail")
                self.h.record(op="read", phase=phase, tenant=t.name, node=n, run_id=run, status=s)
            if self.pause(self.spec["read_pause"] if runs else 0.05, s):
                break

    def run(self):
        """Start every client thread (each with its own random stream drawn from the trial's)."""
        sp = self.spec
        jobs = []
        for t in self.tenants:
            jobs += [(self.triggers, t)] * sp["triggerers"] + [(self.updates, t)] * sp["updaters"]
            jobs += [(self.reads, t)] * sp["readers"]
            if sp["long_every"]:
                jobs.append((self.long_triggers, t))
        if sp["shared_keys"] and len(self.tenants) > 1:
            jobs.append((self.shared_triggers,))
        self.started_ms = now_ms()
        for f, *args in jobs:
            rng = random.Random(self.rng.getrandbits(64))
            self.threads.append(threading.Thread(target=f, args=(*args, rng), daemon=True))
        for th in self.threads:
            th.start()

    def finish(self):
        self.stop.set()
        for th in self.threads:
            th.join(timeout=30)
        self.finished_ms = now_ms()


# Nemeses: each takes the backend and the scenario clock, faults, and heals before returning.
def n_kill_leader(b, rng, hold):
    l = leader(b) or 1
    b.kill(l)
    time.sleep(hold)
    b.start(l)


def n_kill_random(b, rng, hold):
    n = rng.choice(b.nodes)
    b.kill(n)
    time.sleep(hold)
    b.start(n)


def n_pause_leader(b, rng, hold):
    l = leader(b) or 1
    b.stop(l)
    time.sleep(max(hold, 4))  # longer than the election timeout
    b.cont(l)


def n_partition_leader(b, rng, hold):
    l = leader(b) or 1
    for o in b.nodes:
        if o != l:
            b.cut(l, o)
    time.sleep(hold)
    b.heal()


def n_partition_follower_long(b, rng, hold):
    l = leader(b) or 1
    f = rng.choice([n for n in b.nodes if n != l])
    for o in b.nodes:
        if o != f:
            b.cut(f, o)
    time.sleep(hold * 2)  # long enough for the leader to snapshot and purge past it
    b.heal()


def n_bridge(b, rng, hold):
    a, c = rng.sample(b.nodes, 2)
    b.cut(a, c)
    time.sleep(hold)
    b.heal()


def n_rolling_restart(b, rng, hold):
    for n in b.nodes:
        b.terminate(n)
        b.start(n)
        wait(lambda: leader(b) is not None, 60, "a leader during the rolling restart")
        time.sleep(1)


def n_crash_all(b, rng, hold):
    for n in b.nodes:
        b.kill(n)
    time.sleep(1)
    for n in b.nodes:
        b.start(n)


def n_restart_one_while_peers_down(b, rng, hold):
    for n in b.nodes:
        b.kill(n)
    lone = rng.choice(b.nodes)
    b.start(lone)
    time.sleep(hold)
    for n in b.nodes:
        if n != lone:
            b.start(n)


def long_task_node(b, rng, timeout=30):
    """Start a run of a DAG with one 30 s shell task; return (run_id, node running it)."""
    tok = b.tok
    dag = {"dag_id": "long", "tasks": [{"task_id": "l", "kind": "shell", "retries": 2, "retry_delay": "100ms",
                                        "command": witness_cmd(b.witness_path, "sleep 30")}]}
    run = None
    deadline = time.time() + timeout
    while time.time() < deadline and run is None:
        n = leader(b) or rng.choice(b.nodes)
        s, v, _ = http("POST", b.api(n) + BASE + "/dags", tok, dag, timeout=5)
        if s == 200:
            s, v, _ = http("POST", b.api(n) + BASE + "/runs", tok, {"dag_id": "long", "run_type": "manual"}, timeout=5)
            if s == 200:
                run = v["run_id"]
        if run is None:
            time.sleep(0.3)
    if run is None:
        raise RuntimeError("could not start the long run")
    while time.time() < deadline:
        s, v, _ = http("GET", b.api(leader(b) or 1) + BASE + f"/runs/{run}", tok, timeout=3)
        if s == 200:
            at = v["task_details"]["l"]["attempts"]
            if at and at[-1]["state"] == "running":
                return run, at[-1]["node"]
        time.sleep(0.2)
    raise RuntimeError(f"the long run {run} never started its attempt")


def wait_handover(b, run, away, timeout):
    """Until a node other than `away` sees an attempt of the long task running on a
    node other than `away`; returns seconds waited (None if it never happened)."""
    t0 = time.time()
    while time.time() < t0 + timeout:
        for n in b.nodes:
            if n == away:
                continue
            s, v, _ = http("GET", b.api(n) + BASE + f"/runs/{run}", b.tok, timeout=2)
            if s == 200:
                at = v["task_details"]["l"]["attempts"]
                if at and at[-1]["node"] != away and at[-1]["state"] == "running":
                    return time.time() - t0
        time.sleep(0.2)
    return None


def n_partition_executor(b, rng, hold):
    """Cut the node running a 30 s task off from both peers until the leader has handed
    the task to another node, and a little longer; then heal. With self-fencing the
    first attempt is dead before the second starts."""
    run, n = long_task_node(b, rng)
    for o in b.nodes:
        if o != n:
            b.cut(n, o)
    b.nemesis_info = {"long_run": run, "node": n, "handover_s": wait_handover(b, run, n, 30)}
    time.sleep(2)  # attempt 2 runs while node n is still cut off
    b.heal()


def n_pause_executor(b, rng, hold):
    """SIGSTOP the node running a 30 s task until the task is handed to another node,
    then SIGCONT. The task's own processes are not stopped with it (local backend): the
    node's fence keeper must kill them at their fence deadline, before the handover."""
    run, n = long_task_node(b, rng)
    b.stop(n)
    b.nemesis_info = {"long_run": run, "node": n, "handover_s": wait_handover(b, run, n, 30)}
    time.sleep(2)
    b.cont(n)


NEMESES = {
    "kill-leader": n_kill_leader,
    "kill-random": n_kill_random,
    "pause-leader": n_pause_leader,
    "partition-leader": n_partition_leader,
    "partition-follower-snapshot": n_partition_follower_long,
    "bridge": n_bridge,
    "rolling-restart": n_rolling_restart,
    "crash-all": n_crash_all,
    "restart-one-while-peers-down": n_restart_one_while_peers_down,
    "partition-executor": n_partition_executor,
    "pause-executor": n_pause_executor,
}

PROFILES = {
    "smoke": {"scenarios": ["kill-leader", "pause-leader", "partition-leader", "crash-all", "partition-executor"],
              "trials": 1,
              "before": 4, "hold": 4, "after": 5},
    "full": {"scenarios": list(NEMESES), "trials": 10, "before": 5, "hold": 6, "after": 8},
}


def settled(method, url, token, timeout=10, within=30):
    """A final read after healing: retried while the node is (re)starting or electing
    (no answer, 503), up to `within` seconds; any other answer is returned as is."""
    deadline = time.time() + within
    while True:
        s, v, h = http(method, url, token, timeout=timeout)
        if s not in (0, 503) or time.time() > deadline:
            return s, v, h
        time.sleep(0.5)


def all_pages(b, token, node, query):
    out, cursor = [], None
    for _ in range(200):
        q = query + (f"&cursor={cursor}" if cursor else "")
        s, v, _ = settled("GET", b.api(node) + BASE + "/runs?" + q, token, timeout=20)
        if s != 200:
            raise RuntimeError(f"list runs {q}: {s} {v}")
        out += v["runs"]
        cursor = v.get("next_cursor")
        if not cursor:
            return out
    return out


def parse_ts(s):
    # "2026-12-01T06:36:06.981Z" -> epoch ms
    from datetime import datetime
    return int(datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=__import__("datetime").timezone.utc).timestamp() * 1000)


# Acknowledged runs of a tenant read one by one on every node: all of them up to
# LOST_ALL (the normal workload), else a random LOST_SAMPLE; the listings cover the rest.
LOST_ALL, LOST_SAMPLE = 150, 30


def statuses(b, token):
    """(state_digest, applied_index) of every node, asked at once (None for a node
    that did not answer): with a busy cluster, asking one after the other lets commits
    land in between."""
    out = {}

    def ask(n):
        s, v, _ = http("GET", b.api(n) + BASE + "/cluster/status", token, timeout=5)
        out[n] = (v["state_digest"], v["applied_index"]) if s == 200 else None

    ths = [threading.Thread(target=ask, args=(n,)) for n in b.nodes]
    for th in ths:
        th.start()
    for th in ths:
        th.join(timeout=10)
    return [out.get(n) for n in b.nodes]


def write_gaps(oks):
    """Gaps (ms) between consecutive acknowledged writes, as (before, after, gap)."""
    oks = sorted(oks)
    return [(a, c, c - a) for a, c in zip(oks, oks[1:])]


def check(b, token, w, history, fault_window, witness=None):
    """The checker: returns (violations, figures). `token` is the suite's operator token
    (cluster status, the executor nemeses' runs); each tenant is checked with its own."""
    violations, figures = [], {}
    heal_start = time.time()
    others = {t.name: {r for o in w.tenants if o is not t for r in o.acked_runs} for t in w.tenants}
    # 7: convergence of every node to one state digest.
    def converged():
        st = statuses(b, token)
        return None not in st and len(set(st)) == 1
    try:
        wait(lambda: leader(b) is not None, 60, "a leader after healing")
        # Let housekeeping settle (heartbeats keep writing, so retry until equal).
        wait(converged, 60, "all nodes to converge")
        figures["converge_s"] = round(time.time() - heal_start, 2)
    except TimeoutError as e:
        violations.append(f"7 convergence: {e}")
    # 1: every acknowledged run is there, on every node: in the tenant's listing there,
    # and read one by one (a sample when there are many).
    listings = {}  # (tenant, node) -> [run summaries]
    for t in w.tenants:
        acked = list(t.acked_runs)
        for n in b.nodes:
            listings[t.name, n] = all_pages(b, t.token, n, "limit=500")
            listed = {r["run_id"] for r in listings[t.name, n]}
            missing = [r for r in acked if r not in listed]
            for r in missing[:10]:
                violations.append(f"1 lost write: {t.name}'s acknowledged {r} is not listed on node {n}")
            if len(missing) > 10:
                violations.append(f"1 lost write: {len(missing) - 10} more of {t.name}'s runs not listed on node {n}")
        sample = acked if len(acked) <= LOST_ALL else random.Random(len(acked)).sample(acked, LOST_SAMPLE)
        for run in sample:
            for n in b.nodes:
                s, v, _ = settled("GET", b.api(n) + BASE + f"/runs/{run}", t.token)
                if s != 200:
                    violations.append(f"1 lost write: {t.name}'s acknowledged {run} answers {s} on node {n}")
        s, v, _ = settled("GET", b.api(1) + BASE + "/dags/cfg", t.token)
        if t.acked_versions and (s != 200 or v["version"] < max(t.acked_versions)):
            violations.append(f"1 lost write: {t.name}'s cfg version {v.get('version') if s == 200 else s} "
                              f"< acknowledged {max(t.acked_versions)}")
        # Compare-and-set: two updates acknowledged with one version means one was lost.
        twice = sorted({x for x in t.acked_versions if t.acked_versions.count(x) > 1})
        if twice:
            violations.append(f"1 lost update: {t.name}'s cfg versions {twice[:10]} acknowledged to two updates")
        # 10: the tenant's own DAG, never another's of the same id.
        if s == 200 and not str(v.get("owner", "")).startswith(t.name + "-"):
            violations.append(f"10 {t.name}'s cfg has owner {v.get('owner')!r}: another tenant's DAG")
    for op in history.ops:
        if op["op"] == "read" and op["phase"] == "fail" and op.get("status") == 404:
            violations.append(f"1 lost write: a current read of {op.get('tenant')}'s acknowledged {op['run_id']} "
                              f"answered 404 on node {op['node']}")
    # 2 and 3: one run per window; no window skipped (each tenant's own tick1 and tick2).
    dup = skipped = 0
    for t in w.tenants:
        for dag, step in (("tick1", 1000), ("tick2", 2000)):
            runs = all_pages(b, t.token, 1, f"dag_id={dag}&run_type=scheduled&limit=500")
            windows = sorted((parse_ts(r["window"]["from"]), parse_ts(r["window"]["to"])) for r in runs)
            if len(set(windows)) != len(windows):
                dup += len(windows) - len(set(windows))
                violations.append(f"2 duplicate windows for {t.name}/{dag}")
            ws = sorted(set(windows))
            for a, c in zip(ws, ws[1:]):
                if a[1] != c[0]:
                    skipped += (c[0] - a[1]) // step
                    violations.append(f"3 skipped windows for {t.name}/{dag} between {a} and {c}")
            if ws and ws[-1][1] < w.finished_ms - 3 * step - 2000:
                violations.append(f"3 {t.name}/{dag} stopped firing: last window ends {ws[-1][1]}, "
                                  f"workload ended {w.finished_ms}")
            if not ws:
                violations.append(f"3 {t.name}/{dag} never fired")
            figures[f"windows_{dag}"] = figures.get(f"windows_{dag}", 0) + len(ws)
    figures["duplicate_windows"], figures["skipped_windows"] = dup, skipped
    # 4: attempts strictly increasing; never two running at once.
    fencing = 0
    for t in w.tenants:
        longs = [r["run_id"] for r in listings.get((t.name, 2), []) if r["dag_id"] == t.long]
        sample = list(t.acked_runs)[-40:] + longs[:40]
        sample += [r["run_id"] for r in all_pages(b, t.token, 2, "dag_id=tick2&limit=40")[:40]]
        for run in sample:
            s, v, _ = settled("GET", b.api(2) + BASE + f"/runs/{run}", t.token)
            if s != 200:
                continue
            for task, d in v["task_details"].items():
                nums = [a["attempt"] for a in d["attempts"]]
                running = [a for a in d["attempts"] if a["state"] == "running"]
                if nums != list(range(1, len(nums) + 1)) or len(running) > 1:
                    fencing += 1
                    violations.append(f"4 attempts of {t.name}'s {run}/{task}: {nums}, running {len(running)}")
    figures["fencing_violations"] = fencing
    # 5: one X-Request-Id, one run (per tenant: keys are the tenant's own).
    merged = 0
    for t in w.tenants:
        for key, runs in t.key_runs.items():
            if len(runs) > 1:
                violations.append(f"5 {t.name}'s X-Request-Id {key} answered with runs {sorted(runs)}")
        # Counted, not a violation: before protocol 4 a manual run's window was its
        # trigger's millisecond and runs are idempotent by (dag_id, window), so two triggers
        # with different keys in the same millisecond got one run. A fresh cluster starts
        # at protocol 1 and is raised within about a second; from protocol 4 this stays 0.
        keys_of = {}
        for key, runs in t.key_runs.items():
            for r in runs:
                keys_of[r] = keys_of.get(r, 0) + 1
        merged += sum(1 for c in keys_of.values() if c > 1)
    figures["runs_shared_by_keys"] = merged
    # 10: tenants are isolated: a tenant's listing holds its own DAGs' runs and none of
    # the runs acknowledged to another; another tenant's run reads as missing; a key sent
    # by every tenant got each a run of its own.
    isolation = 0
    for t in w.tenants:
        seen = {(r["run_id"], r["dag_id"]) for n in b.nodes for r in listings[t.name, n]}
        foreign = sorted({d for _, d in seen} - t.run_dags())
        leaked = sorted(r for r, _ in seen if r in others[t.name])
        both = sorted(set(t.acked_runs) & others[t.name])
        for what, xs in (("DAG ids not its own", foreign), ("runs acknowledged to another tenant", leaked),
                         ("runs also acknowledged to another tenant", both)):
            if xs:
                isolation += len(xs)
                violations.append(f"10 {t.name} sees {what}: {xs[:10]}")
        for run in sorted(others[t.name])[:10]:
            s, v, _ = settled("GET", b.api(1) + BASE + f"/runs/{run}", t.token)
            if s != 404:
                isolation += 1
                violations.append(f"10 {t.name} reads another tenant's {run}: {s}")
    if not any(t.name == "ops" for t in w.tenants):  # the operator tenant: the nemeses' runs only
        ops_runs = all_pages(b, token, 1, "limit=500")
        workload_runs = {r for t in w.tenants for r in t.acked_runs}
        bad = sorted({r["run_id"] for r in ops_runs if r["dag_id"] != "long" or r["run_id"] in workload_runs})
        if bad:
            isolation += len(bad)
            violations.append(f"10 the operator tenant sees runs not its own: {bad[:10]}")
    figures["isolation_violations"] = isolation
    # 6: write availability: gaps between acknowledged writes (of any tenant, and of each).
    oks = [op for op in history.ops if op["phase"] == "ok" and op["op"] in WRITES]
    gaps = write_gaps(op["t"] for op in oks)
    figures["max_write_unavailability_ms"] = max((g for _, _, g in gaps), default=None)
    figures["median_write_gap_ms"] = statistics.median([g for _, _, g in gaps]) if gaps else None
    fs, fe = fault_window

    def outside(gs):
        return [g for a, c, g in gs if c < fs - 1000 or a > fe + 15000]
    out = outside(gaps)
    if out and max(out) > 5000:
        violations.append(f"6 writes stalled {max(out)} ms outside the fault window")
    tenant_max = 0
    for t in w.tenants:
        tg = write_gaps(op["t"] for op in oks if op.get("tenant") == t.name)
        tenant_max = max([tenant_max] + [g for _, _, g in tg])
        out = outside(tg)
        if len(w.tenants) > 1 and out and max(out) > 5000:
            violations.append(f"6 {t.name}'s writes stalled {max(out)} ms outside the fault window")
    figures["max_tenant_write_gap_ms"] = tenant_max
    figures["acknowledged"] = len(oks)
    figures["operations"] = len(history.ops)
    figures["tenants"] = len(w.tenants)
    # The load: acknowledged writes per second before the fault (the fault-free phase).
    pre = [op for op in oks if w.started_ms <= op["t"] < fs]
    figures["writes_per_s"] = round(len(pre) / max(0.001, (fs - w.started_ms) / 1000), 1)
    fails = {}
    for op in history.ops:
        if op["phase"] in ("fail", "unknown"):
            k = f"{op['op']}:{op.get('status', 0)}"
            fails[k] = fails.get(k, 0) + 1
    figures["failed_ops"] = fails
    # 9: the witness: no two attempts of one task alive at the same time.
    if witness is not None:
        iv = witness.intervals()
        # End lines are stamped to 10 ms and rounded up, so an attempt started in the
        # tick its predecessor ended in shows an "overlap" of at most 10 ms that the clock
        # cannot resolve: counted apart, not a violation.
        allovs = Witness.overlaps(iv)
        ovs = [o for o in allovs if o["ms"] > RESOLUTION_MS]
        figures["overlaps_within_resolution"] = len(allovs) - len(ovs)
        frozen = [o for o in ovs if o["started_frozen"] and o["exec_ms"] <= FREEZE_EXEC_BOUND_MS]
        ovs = [o for o in ovs if o not in frozen]
        figures["freeze_overlaps"] = len(frozen)
        figures["max_freeze_exec_ms"] = max((o["exec_ms"] for o in frozen), default=0)
        for o in ovs:
            violations.append(f"9 attempts {o['a']['attempt']} (pid {o['a']['pid']}, {o['a']['ended']}) and "
                              f"{o['b']['attempt']} (pid {o['b']['pid']}, {o['b']['ended']}) of {o['run']}/{o['task']} "
                              f"overlap {o['ms']} ms ({o['exec_ms']} ms of it with neither frozen)")
        figures["witnessed_attempts"] = len(iv)
        figures["witnessed_killed"] = sum(1 for x in iv if x[3] == "died")
        # How long before the next attempt started was a killed (unended) attempt seen dead:
        # the margin the fence actually left.
        by_task, gaps = {}, []
        for k, st, en, how, _ in iv:
            by_task.setdefault((k[0], k[1]), []).append((st, en, how))
        for xs in by_task.values():
            xs.sort()
            gaps += [(c[0] - a[1]) / 1e6 for a, c in zip(xs, xs[1:]) if a[2] == "died"]
        figures["min_kill_to_next_ms"] = round(min(gaps), 1) if gaps else None
        info = getattr(b, "nemesis_info", {})
        if "handover_s" in info and info["handover_s"] is None:
            violations.append(f"9 the long task of {info.get('long_run')} was never handed to another node: "
                              "the executor nemesis tested nothing")
        long_run = info.get("long_run")
        if long_run:  # the long task's attempt 1 (killed or frozen) and attempt 2
            xs = sorted((st, en, how) for k, st, en, how, _ in iv if k[0] == long_run)
            if len(xs) >= 2:
                figures["long_kill_to_next_ms"] = round((xs[1][0] - xs[0][1]) / 1e6, 1)
        figures["overlaps"] = len(ovs)
        figures["max_overlap_ms"] = max((o["ms"] for o in ovs), default=0)
        figures["max_exec_overlap_ms"] = max((o["exec_ms"] for o in ovs), default=0)
    # 8: no panics.
    for n in b.nodes:
        if "panicked at" in b.log(n):
            violations.append(f"8 node {n} panicked")
    return violations, figures


def tenants_for(b, spec, token):
    """The workload's tenants: the suite's own (operator) token for `ops`, a token of
    its own (no admin scope) for any other."""
    return [Tenant("ops", token, False) if name == "ops" else Tenant(name, b.token(name, TENANT_SCOPES), True)
            for name in spec["tenants"]]


def run_scenario(b, name, profile, rng, outdir, trial, spec=WORKLOADS["normal"]):
    t_up = time.time()
    b.up()
    token = b.token()
    b.tok, b.nemesis_info = token, {}
    witness = None
    if isinstance(b, LocalBackend) and not isinstance(b, DockerBackend):
        b.witness_path = os.path.join(outdir, f"witness-{name}-{trial}.log")
        witness = Witness(b.witness_path)
    h = History(os.path.join(outdir, f"{name}-{trial}.jsonl"))
    w = Workload(b, tenants_for(b, spec, token), h, rng, spec)
    w.setup()
    up_s = time.time() - t_up
    w.run()
    time.sleep(profile["before"])
    fault_start = now_ms()
    NEMESES[name](b, rng, profile["hold"])
    fault_end = now_ms()
    time.sleep(profile["after"])
    w.finish()
    h.close()
    t_check = time.time()
    violations, figures = check(b, token, w, h, (fault_start, fault_end), witness)
    figures["check_s"] = round(time.time() - t_check, 1)
    figures.update(b.nemesis_info)
    if violations:
        keep_logs(b, outdir, name, trial)
    t_down = time.time()
    b.down()
    figures["up_s"], figures["down_s"] = round(up_s, 1), round(time.time() - t_down, 1)
    return violations, figures


def keep_logs(b, outdir, name, trial):
    """Keep the node logs of a failed trial (the cluster dir is wiped by the next one)."""
    for n in b.nodes:
        with open(os.path.join(outdir, f"{name}-{trial}-node{n}.log"), "w") as f:
            f.write(b.log(n))


def witness_selftest(outdir):
    """The witness against attempts with known lives (no cluster): it must see the
    overlaps made on purpose, and only those. Returns a list of failures."""
    import signal
    path = os.path.join(outdir, "witness-selftest.log")
    w = Witness(path)
    procs = []

    def attempt(run, n, body):
        env = dict(os.environ, ORCHESTRATOR_RUN_ID=run, ORCHESTRATOR_TASK_ID="t", ORCHESTRATOR_ATTEMPT=str(n))
        p = subprocess.Popen(["/bin/sh", "-c", witness_cmd(path, body)], env=env, start_new_session=True)
        procs.append(p)
        return p

    # A: attempt 1 killed (SIGKILL of its group, no end line) only after attempt 2 ran: overlap.
    a1 = attempt("A", 1, "sleep 5")
    time.sleep(0.4)
    attempt("A", 2, "sleep 0.3")
    time.sleep(0.6)
    os.killpg(a1.pid, signal.SIGKILL)
    # B: attempt 1 killed, attempt 2 started 0.3 s later: no overlap.
    b1 = attempt("B", 1, "sleep 5")
    time.sleep(0.4)
    os.killpg(b1.pid, signal.SIGKILL)
    time.sleep(0.3)
    attempt("B", 2, "sleep 0.2")
    # C: only the shell of attempt 1 killed; its `sleep` (same process group) lives on: overlap.
    c1 = attempt("C", 1, "sleep 1.5")
    time.sleep(0.4)
    os.kill(c1.pid, signal.SIGKILL)
    time.sleep(0.3)
    attempt("C", 2, "sleep 0.2")
    # D: attempt 1 ends normally, then attempt 2: no overlap.
    attempt("D", 1, "sleep 0.2").wait()
    attempt("D", 2, "sleep 0.2")
    # E: attempt 1 frozen (SIGSTOP of its group) while attempt 2 runs, then thawed for a
    # while: overlap, part of it executing.
    e1 = attempt("E", 1, "sleep 5")
    time.sleep(0.3)
    os.killpg(e1.pid, signal.SIGSTOP)
    time.sleep(0.2)
    attempt("E", 2, "sleep 1")
    time.sleep(0.5)
    os.killpg(e1.pid, signal.SIGCONT)
    time.sleep(0.3)
    os.killpg(e1.pid, signal.SIGKILL)
    time.sleep(0.6)
    ovs = {o["run"]: o for o in Witness.overlaps(w.intervals()) if o["ms"] > RESOLUTION_MS}
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        p.wait()
    print(f"witness self-test: {json.dumps(ovs)}")
    fails = []
    for run, lo, hi in (("A", 250, 600), ("C", 150, 600), ("E", 650, 1200)):
        if run not in ovs or not lo <= ovs[run]["ms"] <= hi:
            fails.append(f"{run}: expected an overlap of {lo}-{hi} ms, got {ovs.get(run)}")
    if "E" in ovs and not 150 <= ovs["E"]["exec_ms"] <= ovs["E"]["ms"] - 300:
        fails.append(f"E: expected 150 ms or more of it executing and 300 ms or more frozen, got {ovs['E']}")
    for run in ("B", "D"):
        if run in ovs:
            fails.append(f"{run}: expected no overlap, got {ovs[run]}")
    return fails


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=PROFILES, default="smoke")
    ap.add_argument("--backend", choices=["local", "docker"], default="local")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--scenarios", default=None, help="comma-separated subset")
    ap.add_argument("--out", default=os.path.join(ROOT, ".chaos"))
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no trial that the longest so far says would end after this many "
                         "minutes; trials then go round the scenarios")
    ap.add_argument("--workload", choices=WORKLOADS, default="normal",
                    help="normal: one tenant, one client of each kind; heavy: several tenants, "
                         "concurrent writers (hundreds of writes/s), long shell tasks")
    ap.add_argument("--fault-scope", choices=["process", "node"], default="process",
                    help="kill/pause only the server process, or the node's whole process tree")
    ap.add_argument("--witness-selftest", action="store_true",
                    help="check the attempt witness against processes with known lives, then exit")
    args = ap.parse_args()
    if args.witness_selftest:
        os.makedirs(args.out, exist_ok=True)
        fails = witness_selftest(args.out)
        for f in fails:
            print("  - " + f)
        print("witness self-test: " + ("FAILED" if fails else "ok"))
        sys.exit(1 if fails else 0)
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    profile = dict(PROFILES[args.profile])
    if args.trials:
        profile["trials"] = args.trials
    scenarios = args.scenarios.split(",") if args.scenarios else profile["scenarios"]
    os.makedirs(args.out, exist_ok=True)
    backend = (LocalBackend if args.backend == "local" else DockerBackend)(os.path.join(args.out, "cluster"))
    backend.scope = args.fault_scope
    spec = WORKLOADS[args.workload]
    backend.env.update(spec["node_env"])  # the docker backend's nodes take cluster/chaos.override.yml
    print(f"chaos: profile={args.profile} workload={args.workload} backend={args.backend} "
          f"fault-scope={args.fault_scope} seed={seed} scenarios={','.join(scenarios)}", flush=True)
    rng = random.Random(seed)
    results, failed = {name: [] for name in scenarios}, False
    # Every trial of a scenario, then the next scenario; with --max-minutes round the
    # scenarios instead (trial 0 of each, then trial 1, ...), so that stopping at the
    # time limit leaves every scenario with as many trials as the time allowed.
    order = [(name, trial) for name in scenarios for trial in range(profile["trials"])]
    if args.max_minutes:
        order.sort(key=lambda x: x[1])
    deadline = time.time() + args.max_minutes * 60 if args.max_minutes else None
    longest = 0.0
    try:
        for name, trial in order:
            if deadline and time.time() + longest > deadline:
                print(f"chaos: --max-minutes {args.max_minutes}: no time for another trial "
                      f"(the longest took {longest:.0f} s); stopping", flush=True)
                break
            t0 = time.time()
            try:
                v, f = run_scenario(backend, name, profile, rng, args.out, trial, spec)
            except Exception as e:  # a scenario that cannot run is a failure, not a pass
                v, f = [f"scenario error: {e}"], {}
                keep_logs(backend, args.out, name, trial)
                backend.down()
            f["seconds"] = round(time.time() - t0, 1)
            longest = max(longest, time.time() - t0)
            results[name].append({"violations": v, "figures": f})
            status = "ok" if not v else "VIOLATION"
            print(f"  {name} trial {trial}: {status} {json.dumps(f)}", flush=True)
            for x in v[:10]:
                print(f"    - {x}", flush=True)
            failed |= bool(v)
        results = {name: rows for name, rows in results.items() if rows}
    finally:
        backend.down()
        backend.cleanup()
    print()
    print(f"{'scenario':30} {'trials':>6} {'ops':>7} {'acked':>7} {'writes/s':>8} {'lost':>5} {'dup':>4} {'skip':>5} "
          f"{'fence':>5} {'overlaps':>8} {'iso':>4} {'max unavail ms':>14} {'median gap ms':>13} {'converge s':>10}")
    summary = {"seed": seed, "profile": args.profile, "workload": args.workload, "backend": args.backend,
               "fault_scope": args.fault_scope, "scenarios": {}}
    for name, rows in results.items():
        fig = [r["figures"] for r in rows]
        agg = lambda k, fn=max: fn([x[k] for x in fig if x.get(k) is not None] or [0])
        lost = sum(sum(1 for v in r["violations"] if v.startswith("1 ")) for r in rows)
        line = {"trials": len(rows), "operations": agg("operations", sum), "acknowledged": agg("acknowledged", sum),
                "lost": lost, "duplicate_windows": agg("duplicate_windows", sum),
                "skipped_windows": agg("skipped_windows", sum), "fencing_violations": agg("fencing_violations", sum),
                "overlaps": agg("overlaps", sum), "max_overlap_ms": agg("max_overlap_ms"),
                "max_exec_overlap_ms": agg("max_exec_overlap_ms"),
                "overlaps_within_resolution": agg("overlaps_within_resolution", sum),
                "freeze_overlaps": agg("freeze_overlaps", sum), "max_freeze_exec_ms": agg("max_freeze_exec_ms"),
                "witnessed_attempts": agg("witnessed_attempts", sum), "witnessed_killed": agg("witnessed_killed", sum),
                "min_kill_to_next_ms": min([x["min_kill_to_next_ms"] for x in fig
                                            if x.get("min_kill_to_next_ms") is not None], default=None),
                "max_write_unavailability_ms": agg("max_write_unavailability_ms"),
                "median_write_gap_ms": agg("median_write_gap_ms", statistics.median),
                "max_converge_s": agg("converge_s"), "violations": sum(len(r["violations"]) for r in rows),
                "tenants": agg("tenants"), "writes_per_s": round(agg("writes_per_s", statistics.median), 1),
                "min_writes_per_s": agg("writes_per_s", min), "isolation_violations": agg("isolation_violations", sum),
                "max_tenant_write_gap_ms": agg("max_tenant_write_gap_ms"),
                "runs_shared_by_keys": agg("runs_shared_by_keys", sum)}
        summary["scenarios"][name] = line
        print(f"{name:30} {line['trials']:>6} {line['operations']:>7} {line['acknowledged']:>7} "
              f"{line['writes_per_s']:>8} {lost:>5} {line['duplicate_windows']:>4} {line['skipped_windows']:>5} "
              f"{line['fencing_violations']:>5} {line['overlaps']:>8} {line['isolation_violations']:>4} "
              f"{line['max_write_unavailability_ms']:>14} {line['median_write_gap_ms']:>13} {line['max_converge_s']:>10}")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    total = sum(s["violations"] for s in summary["scenarios"].values())
    passed = sum(1 for r in results.values() if not any(x["violations"] for x in r))
    print(f"\nchaos: {passed} passed, {len(results) - passed} failed")
    if failed:
        print(f"chaos: {total} violation(s); replay with --seed {seed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

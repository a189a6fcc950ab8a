#!/usr/bin/env python3
"""Benchmark Flower deployment-runtime round overhead on 127.0.0.1.

Starts 1 flower-superlink + N flower-supernode processes (insecure, free
ports on 127.0.0.1), submits the `flower_rounds` app with `flwr run`, waits
for R rounds, prints a one-line JSON summary and kills everything it started.

Usage: VENV/bin/python run.py --sites 2 --rounds 3 --params 1000 [--venv VENV]
"""

import argparse
import atexit
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"
PROCS: list[subprocess.Popen] = []


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((HOST, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    f = open(log, "wb")
    # New session => own process group, so cleanup also reaches the
    # ServerApp/ClientApp/SuperExec children these processes spawn.
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                         start_new_session=True)
    PROCS.append(p)
    return p


MARKER = f"FLOWER_ROUNDS_BENCH_{os.getpid()}_{int(time.time())}"


def _ours() -> set[int]:
    """PIDs started (transitively) by this driver.

    Flower's SuperExec starts ServerApp/ClientApp processes in *new sessions*,
    so killing our process groups is not enough. Every process we start gets
    the env var MARKER=1 (inherited by its children); we also walk the
    parent/child tree from the processes we launched.
    """
    me, found, children = os.getpid(), set(), {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        pid = int(d.name)
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(pid)
            if f"{MARKER}=1".encode() in (d / "environ").read_bytes().split(b"\0"):
                found.add(pid)
        except (OSError, IndexError, ValueError):
            continue
    todo, seen = [p.pid for p in PROCS] + sorted(found), set()
    for _ in range(100_000):  # bounded tree walk
        if not todo:
            break
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, []))
    return seen


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def cleanup() -> None:
    pids = _ours()
    for p in PROCS:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    _signal_all(pids, signal.SIGTERM)
    deadline = time.time() + 10
    while time.time() < deadline:
        for p in PROCS:
            p.poll()  # reap our direct children
        pids = _ours() | pids
        if not any(_alive(q) for q in pids):
            break
        time.sleep(0.2)
    else:
        _signal_all(pids | _ours(), signal.SIGKILL)
    for p in PROCS:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # group may outlive its leader
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    PROCS.clear()


def on_signal(signum, _frame):
    cleanup()
    sys.exit(128 + signum)


def wait_until(pred, timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        for p in PROCS:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited ({p.returncode}) while waiting for {what}")
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--params", type=int, default=1000)
    ap.add_argument("--evaluate", action="store_true",
                    help="also do a federated-evaluate exchange each round")
    # Default: the environment of the interpreter running this script.
    ap.add_argument("--venv", default=os.environ.get("FLWR_VENV", sys.prefix))
    ap.add_argument("--timeout", type=float, default=None,
                    help="overall limit for the run in seconds "
                         "(default 120 + 30*rounds*max(1,sites/2))")
    ap.add_argument("--workdir", default=None, help="logs/state dir (default: fresh tmp dir)")
    a = ap.parse_args()
    timeout = a.timeout or 120 + 30 * a.rounds * max(1.0, a.sites / 2)

    bindir = Path(a.venv) / "bin"
    work = Path(a.workdir or tempfile.mkdtemp(prefix="flower_rounds_"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "flwr_home"  # isolated FLWR_HOME: nothing touches ~/.flwr
    home.mkdir(exist_ok=True)
    stamps = work / "stamps.jsonl"
    stamps.unlink(missing_ok=True)

    link_port, *node_ports = free_ports(1 + a.sites)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "bench"\n\n'
        f'[superlink.bench]\naddress = "{HOST}:{link_port}"\ninsecure = true\n'
    )
    env = dict(os.environ, FLWR_HOME=str(home), PATH=f"{bindir}:{os.environ['PATH']}",
               PYTHONUNBUFFERED="1", **{MARKER: "1"})

    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    t0 = time.time()
    start([str(bindir / "flower-superlink"), "--insecure", "--host", HOST,
           "--port", str(link_port), "--disable-runtime-dependency-installation"],
          work / "superlink.log", env)
    wait_until(lambda: port_open(link_port), 60, "superlink port")
    for i, port in enumerate(node_ports):
        start([str(bindir / "flower-supernode"), "--insecure",
               "--superlink", f"{HOST}:{link_port}", "--host", HOST, "--port", str(port),
               "--node-config", f"partition-id={i} num-partitions={a.sites}",
               "--max-retries", "20", "--max-wait-time", "120"],
              work / f"supernode_{i}.log", env)

    def nodes_online() -> bool:
        r = subprocess.run([str(bindir / "flwr"), "supernode", "ls", "bench", "--format", "json"],
                           capture_output=True, text=True, env=env, cwd=work, timeout=30)
        try:
            nodes = json.loads(r.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return False
        return sum(str(n.get("status", "")).lower() == "online" for n in nodes) >= a.sites

    wait_until(nodes_online, 120, f"{a.sites} supernodes online", poll=1.0)
    t_nodes = time.time()

    run_cfg = (f"num-server-rounds={a.rounds} num-params={a.params} min-nodes={a.sites} "
               f"evaluate={'true' if a.evaluate else 'false'} stamp-file=\"{stamps}\"")
    t_launch = time.time()
    r = subprocess.run([str(bindir / "flwr"), "run", str(APP_DIR), "bench",
                        "--run-config", run_cfg, "--format", "json"],
                       capture_output=True, text=True, env=env, cwd=work, timeout=120)
    (work / "flwr_run.out").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        print(r.stdout + r.stderr, file=sys.stderr)
        raise RuntimeError("flwr run failed")
    try:
        run_id = json.loads(r.stdout).get("run-id")
    except json.JSONDecodeError:
        run_id = None

    def read_stamps() -> dict[int, float]:
        if not stamps.exists():
            return {}
        out = {}
        for line in stamps.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                out[int(d["round"])] = float(d["t"])
        return out

    wait_until(lambda: a.rounds in read_stamps(), timeout, f"{a.rounds} rounds", poll=0.2)
    ts = read_stamps()
    t_done = time.time()
    if run_id is not None:  # keep the ServerApp log for inspection (bounded)
        try:
            lr = subprocess.run([str(bindir / "flwr"), "log", str(run_id), "bench", "--show"],
                                capture_output=True, text=True, env=env, cwd=work, timeout=30)
            (work / "serverapp.log").write_text(lr.stdout + lr.stderr)
        except subprocess.TimeoutExpired:
            pass

    rounds = [ts[k] - ts[k - 1] for k in range(2, a.rounds + 1)]
    summary = {
        "sites": a.sites,
        "rounds": a.rounds,
        "params": a.params,
        "evaluate": a.evaluate,
        "first_round_s": round(ts[1] - t_launch, 3),
        "median_round_s": round(statistics.median(rounds), 3) if rounds else None,
        "launch_to_serverapp_start_s": round(ts[0] - t_launch, 3),
        "round1_s": round(ts[1] - ts[0], 3),
        "round_s": [round(x, 3) for x in rounds],
        "cluster_startup_s": round(t_nodes - t0, 3),
        "total_s": round(t_done - t0, 3),
        "flwr_version": subprocess.run([str(bindir / "python"), "-c",
                                        "import flwr; print(flwr.__version__)"],
                                       capture_output=True, text=True, timeout=60).stdout.strip(),
        "workdir": str(work),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    try:
        rc = main()
    finally:
        cleanup()
    sys.exit(rc)

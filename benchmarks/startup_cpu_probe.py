"""Where the CPU goes between ``ray job submit`` and raypod's first step, per process.

Starts one Ray cluster as ``raypod bench startup --cluster running`` does, submits the tiny
job ``trials`` times through that suite's own trial code, samples every process's CPU time
(``/proc/<pid>/stat``) every 0.1 s, and prints, per trial, the CPU each kind of process used
from just before the submit to the first step. On a 2-core machine the start is CPU-bound, so
this says what a cut can gain.

    .venv/bin/python benchmarks/startup_cpu_probe.py 3 | tee benchmarks/results/startup_cpu.txt

The sampler itself shows up as ``python | ...startup_cpu_probe.py`` (about 0.5 s a trial).
"""
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)
from raypod.bench import startup as su  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
samples = []  # (t, {pid: (name, cpu_s)})
stop = threading.Event()

def snap():
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                st = f.read()
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cl = f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
        except OSError:
            continue
        rest = st[st.rfind(b")") + 2:].split()
        cpu = (int(rest[11]) + int(rest[12])) / TICK
        comm = st[st.find(b"(") + 1:st.rfind(b")")].decode(errors="replace")
        out[int(p)] = (comm + " | " + cl, cpu)
    return out

def sampler():
    while not stop.is_set():
        samples.append((time.time(), snap()))
        time.sleep(0.1)

def classify(name):
    for key in ("ray::RankActor", "ray::NodeAgent", "ray::Spare", "ray::IDLE", "raylet", "gcs_server",
                "dashboard", "JobSupervisor", "ray job submit", "raypod.bench.startup", "runtime_env",
                "log_monitor", "monitor", "ray::"):
        if key in name:
            return key
    return name[:60]

def report(rec: dict, base: dict) -> None:
    """The CPU each kind of process used from the submit to the first step of one trial."""
    t0 = samples[0][0] - 0.1
    first = t0 + rec["seconds"]
    at = [s for s in samples if s[0] <= first][-1][1]  # the last sample before the first step
    groups: dict[str, list[float]] = {}
    for pid, (name, cpu) in at.items():
        d = cpu - base[pid][1] if pid in base else cpu  # a Ray worker renamed itself: same process
        if d > 0.005:
            groups.setdefault(classify(name), []).append(round(d, 2))
    total = sum(sum(v) for v in groups.values())
    print(f"  total CPU to first step {total:.2f}s over wall {rec['seconds']:.2f}s")
    for k, v in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        print(f"   {sum(v):6.2f}  {k}  {v}")


def main() -> None:
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    head = su.RunningCluster()
    head.start()
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "raypod-startup-cpu-logs"
    logs.mkdir(exist_ok=True)
    try:
        for i in range(trials):
            samples.clear()
            stop.clear()
            base = snap()
            th = threading.Thread(target=sampler, daemon=True)
            th.start()
            rec = su.run_trial("raypod", i, logs, head)
            stop.set()
            th.join()
            print("trial", i, rec.get("seconds"), json.dumps(rec.get("phases")))
            if rec.get("seconds") is None:
                print(rec.get("error"), rec.get("log_tail"))
                continue
            report(rec, base)
    finally:
        head.stop()


if __name__ == "__main__":
    main()

"""Time for two devices of one user to find each other through coordinator hints (`shoal peers`
on both lists the other), measured from the second agent's start. Run through bench/peers."""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sync_bench as sb  # noqa: E402  (the cluster, machine and helper functions)


def peers(home):
    out = subprocess.run([os.path.join(sb.BIN, "shoal"), "--home", home, "peers", "--json"],
                         capture_output=True, text=True, check=True).stdout
    return [p["name"] for p in json.loads(out)]


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    times = []
    for _ in range(runs):
        base = tempfile.mkdtemp(prefix="shoal-peers-", dir=os.environ.get("BENCH_DIR"))
        try:
            c = sb.Cluster(base, settle=0)
            a, b = os.path.join(base, "a-home"), os.path.join(base, "b-home")
            ok = sb.wait(lambda: "b" in peers(a) and "a" in peers(b), 30, 0.01)
            times.append(time.monotonic() - c.last_started if ok else None)
            c.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)
    found = sorted(t for t in times if t is not None)
    print(f"Machine: {sb.machine()}")
    print(f"Machine {sb.speed()}")
    print("Build: release; loopback; two agents of one user and a coordinator, started afresh each run")
    print()
    print("| measurement | target | median | max | runs |")
    print("|---|---|---|---|---|")
    med = f"{statistics.median(found) * 1000:.0f} ms" if found else "-"
    worst = f"{found[-1] * 1000:.0f} ms" if found else "-"
    missed = len(times) - len(found)
    print(f"| peers found through coordinator hints, from the second agent's start | <= 2 s | {med} | {worst} "
          f"| {runs}{f' ({missed} never found)' if missed else ''} |")
    sys.exit(0 if found and not missed and found[-1] <= 2 else 1)


if __name__ == "__main__":
    main()

"""LAN peers benchmark (run it through bench/lan, which builds the release binaries): two agents
of one user and a coordinator on loopback, peers connected, then
- a 1 GiB file written on A until it is complete on B, with A's origin upload unlimited and then
  limited to 10 MiB/s: time, B's bytes by source, throughput, CPU seconds per GiB on A, B and the
  coordinator;
- 10,000 files of 4 KiB in 100 directories written on A until all are on B.
Each measurement runs in a fresh cluster, RUNS times (default 3); the table shows medians."""

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

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def peers(home):
    out = subprocess.run([os.path.join(sb.BIN, "shoal"), "--home", home, "peers", "--json"],
                         capture_output=True, text=True, check=True).stdout
    return [p["name"] for p in json.loads(out)]


def by_source(home):
    out = subprocess.run([os.path.join(sb.BIN, "shoal"), "--home", home, "status", "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["status"]["bytes_by_source"]


def cluster(base, upload_limit=None):
    def configure(name, home):
        if name == "a" and upload_limit:
            with open(os.path.join(home, "config.toml"), "a") as f:
                f.write(f'upload_limit = "{upload_limit}"\n')

    c = sb.Cluster(base, settle=0, configure=configure)
    assert sb.wait(lambda: "b" in peers(c.homes["a"]) and "a" in peers(c.homes["b"]), 30, 0.01), "no peers"
    return c


def one_gib(upload_limit):
    base = tempfile.mkdtemp(prefix="shoal-lan-", dir=os.environ.get("BENCH_DIR"))
    try:
        c = cluster(base, upload_limit)
        staging = os.path.join(base, "staging.bin")
        sb.write_random(staging, sb.GIB)
        want = sb.sha(staging)
        pids = {"a": c.agents["a"].pid, "b": c.agents["b"].pid, "coord": c.coord.pid}
        cpu0 = {k: cpu_s(p) for k, p in pids.items()}
        t = time.monotonic()
        os.rename(staging, os.path.join(c.roots["a"], "big.bin"))
        dst = os.path.join(c.roots["b"], "big.bin")
        ok = sb.wait(lambda: os.path.exists(dst) and os.path.getsize(dst) == sb.GIB, 300, 0.005)
        took = time.monotonic() - t
        cpu = {k: cpu_s(p) - cpu0[k] for k, p in pids.items()}
        ok = ok and sb.sha(dst) == want
        # The status is written after the cycle that installed the file.
        sb.wait(lambda: by_source(c.homes["b"])["peer"] + by_source(c.homes["b"])["origin"] >= sb.GIB, 10, 0.05)
        src = by_source(c.homes["b"])
        c.stop()
        return {"ok": ok, "s": took, "cpu": cpu, "origin": src["origin"], "peer": src["peer"]}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def many_small(n=10000):
    base = tempfile.mkdtemp(prefix="shoal-lan-", dir=os.environ.get("BENCH_DIR"))
    try:
        c = cluster(base)
        a, b = c.roots["a"], c.roots["b"]
        t = time.monotonic()
        for i in range(n):
            d = os.path.join(a, "many", f"d{i % 100}")
            if i < 100:
                os.makedirs(d)
            with open(os.path.join(d, f"f{i}"), "wb") as f:
                f.write(os.urandom(4096))

        def count():
            return sum(len(files) for _, _, files in os.walk(os.path.join(b, "many")))

        ok = sb.wait(lambda: count() >= n, 120, 0.02)
        took = time.monotonic() - t
        src = by_source(c.homes["b"])
        c.stop()
        return {"ok": ok, "s": took, "peer": src["peer"], "origin": src["origin"]}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    free = [one_gib(None) for _ in range(runs)]
    limited = [one_gib("10MiB") for _ in range(runs)]
    small = [many_small() for _ in range(runs)]
    med = lambda rs, f: statistics.median(f(r) for r in rs)  # noqa: E731
    all_ok = all(r["ok"] for r in free + limited + small)
    free_s, lim_s, small_s = med(free, lambda r: r["s"]), med(limited, lambda r: r["s"]), med(small, lambda r: r["s"])
    origin_pct = max(r["origin"] for r in free + limited) * 100 / sb.GIB
    rows = [
        ("1 GiB file A→B, peers on", "<= 2.5 s", f"{free_s:.2f} s", free_s <= 2.5),
        ("… of its bytes B took from the origin (worst run)", "<= 2 %", f"{origin_pct:.1f} %", origin_pct <= 2),
        ("… peer transfer throughput", "", f"{sb.GIB / free_s / 1e6:.0f} MB/s", True),
        ("… CPU s per GiB: A / B / coordinator", "",
         " / ".join(f"{med(free, lambda r, k=k: r['cpu'][k]):.2f}" for k in ("a", "b", "coord")), True),
        ("1 GiB file A→B, A's origin upload limited to 10 MiB/s", "<= 1.3 × unlimited",
         f"{lim_s:.2f} s ({lim_s / free_s:.2f} ×)", lim_s <= 1.3 * free_s),
        ("… CPU s per GiB: A / B / coordinator", "",
         " / ".join(f"{med(limited, lambda r, k=k: r['cpu'][k]):.2f}" for k in ("a", "b", "coord")), True),
        ("10,000 files of 4 KiB in 100 dirs A→B, peers on", "<= 3.85 s", f"{small_s:.2f} s", small_s <= 3.85),
    ]
    print(f"Machine: {sb.machine()}")
    print(f"Build: release; loopback; two agents connected as peers and a coordinator; median of {runs} runs")
    print()
    print("| measurement | target | result | |")
    print("|---|---|---|---|")
    for what, target, value, ok in rows:
        print(f"| {what} | {target} | {value} | {'ok' if ok else 'MISSED'} |")
    if not all_ok:
        print("some runs did not complete (see above)")
    sys.exit(0 if all_ok and all(r[3] for r in rows) else 1)


if __name__ == "__main__":
    main()

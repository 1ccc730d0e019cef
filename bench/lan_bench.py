"""LAN peers benchmark (run it through bench/lan, which builds the release binaries): two agents
of one user and a coordinator on loopback, connected as peers (or with `lan_sync = false`, for
comparison), then
- a 1 GiB file written on A until it is complete on B, with A's origin upload unlimited and then
  limited to 10 MiB/s: time, B's bytes by source, throughput, CPU seconds per GiB on A, B and the
  coordinator;
- 10,000 files of 4 KiB in 100 directories written on A until all are on B.
Each measurement runs in a fresh cluster, RUNS times (default 3), interleaved; the table shows
medians. Small-file figures depend on how fast this file system creates files at the moment, so
LAN on is compared with LAN off measured alongside."""

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


def cluster(base, upload_limit=None, lan_sync=True):
    def configure(name, home):
        path = os.path.join(home, "config.toml")
        with open(path) as f:
            text = f.read()
        if not lan_sync:
            text = text.replace("lan_sync = true", "lan_sync = false")
        if name == "a" and upload_limit:
            text += f'upload_limit = "{upload_limit}"\n'
        with open(path, "w") as f:
            f.write(text)

    c = sb.Cluster(base, settle=0 if lan_sync else 1.0, configure=configure)
    if lan_sync:
        assert sb.wait(lambda: "b" in peers(c.homes["a"]) and "a" in peers(c.homes["b"]), 30, 0.01), "no peers"
    return c


def one_gib(upload_limit, lan_sync=True):
    base = tempfile.mkdtemp(prefix="shoal-lan-", dir=os.environ.get("BENCH_DIR"))
    try:
        c = cluster(base, upload_limit, lan_sync)
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


def many_small(n=10000, lan_sync=True):
    base = tempfile.mkdtemp(prefix="shoal-lan-", dir=os.environ.get("BENCH_DIR"))
    try:
        c = cluster(base, lan_sync=lan_sync)
        a, b = c.roots["a"], c.roots["b"]
        t = time.monotonic()
        sb.write_small_files(a, n)
        ok = sb.wait(lambda: sb.count_small_files(b) >= n, 120, 0.02)
        took = time.monotonic() - t
        src = by_source(c.homes["b"])
        c.stop()
        return {"ok": ok, "s": took, "peer": src["peer"], "origin": src["origin"]}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    free, off, limited, small, small_off = [], [], [], [], []
    # Interleaved, so LAN on and off see the same machine and file-system state.
    for _ in range(runs):
        free.append(one_gib(None))
        off.append(one_gib(None, lan_sync=False))
        limited.append(one_gib("10MiB"))
        small.append(many_small())
        small_off.append(many_small(lan_sync=False))
    med = lambda rs, f: statistics.median(f(r) for r in rs)  # noqa: E731
    secs = lambda rs: med(rs, lambda r: r["s"])  # noqa: E731
    cpu = lambda rs: " / ".join(f"{med(rs, lambda r, k=k: r['cpu'][k]):.2f}" for k in ("a", "b", "coord"))  # noqa: E731
    all_ok = all(r["ok"] for r in free + off + limited + small + small_off)
    free_s, off_s, lim_s = secs(free), secs(off), secs(limited)
    small_s, small_off_s = secs(small), secs(small_off)
    origin_pct = max(r["origin"] for r in free + limited) * 100 / sb.GIB
    rows = [
        ("1 GiB file A→B, LAN sync on", "<= 2.5 s", f"{free_s:.2f} s", free_s <= 2.5),
        ("… the same with LAN sync off (through the coordinator)", "", f"{off_s:.2f} s", True),
        ("… of its bytes B took from the origin (worst run)", "<= 2 %", f"{origin_pct:.1f} %", origin_pct <= 2),
        ("… peer transfer throughput (file size / time)", "", f"{sb.GIB / free_s / 1e6:.0f} MB/s", True),
        ("… CPU s per GiB, LAN on: A / B / coordinator", "", cpu(free), True),
        ("… CPU s per GiB, LAN off: A / B / coordinator", "", cpu(off), True),
        ("1 GiB file A→B, A's origin upload limited to 10 MiB/s", "<= 1.3 × unlimited",
         f"{lim_s:.2f} s ({lim_s / free_s:.2f} ×)", lim_s <= 1.3 * free_s),
        ("… CPU s per GiB: A / B / coordinator", "", cpu(limited), True),
        ("10,000 files of 4 KiB in 100 dirs A→B, LAN sync on", "no slower than off",
         f"{small_s:.2f} s (off: {small_off_s:.2f} s)", small_s <= small_off_s * 1.1),
    ]
    print(f"Machine: {sb.machine()}")
    print(f"Machine {sb.speed()}")
    print(f"Build: release; loopback; two agents and a coordinator, fresh for each run; median of {runs} runs")
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

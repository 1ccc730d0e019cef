"""How the cost of one change grows with the size of the folder: for each folder size N (files of
1 KiB, 100 per directory), the initial sync A→B (the files are in A's folder when the agents
start), then the time a new 1 KiB file on A takes to be complete on B with N files present, the
memory of both agents and the coordinator once in sync, and the CPU an idle agent uses. Prints
one table row per size, then what the initial sync cost each process (CPU seconds and bytes
written to disk) and how the sync time grows with the folder. Run through bench/scale."""

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sync_bench as sb  # noqa: E402  (the cluster, machine and helper functions)

FILE = 1024
PER_DIR = 100


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def written_mib(pid):
    """Bytes the process has caused to be written to storage so far, in MiB."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def count_files(root, top):
    total = 0
    for _, _, files in os.walk(os.path.join(root, top)):
        total += len(files)
    return total


def status(base, name):
    try:
        with open(os.path.join(base, f"{name}-home", "status.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def in_sync(c, base, n):
    """Both agents report in sync and B has pulled every journal entry (cheap to poll: walking a
    million files on every poll would take a core away from the agents being measured)."""
    a, b = status(base, "a"), status(base, "b")
    entries = c.metric("shoal_journal_entries_total")
    return entries >= n and a.get("in_sync") and b.get("in_sync") and b.get("cursor", 0) >= entries


def measure(n, samples, base):
    # Initial sync: N files already in A's folder when the agents start (as when a user installs
    # Shoal on an existing folder), timed from A's start until all are on B.
    a = os.path.join(base, "a")
    for i in range(n):
        d = os.path.join(a, "tree", f"d{i // PER_DIR}")
        if i % PER_DIR == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(os.urandom(FILE))
    os.sync()
    c = sb.Cluster(base)
    b = c.roots["b"]
    try:
        ok = sb.wait(lambda: in_sync(c, base, n), 3600, 0.1)
        initial = time.monotonic() - c.started if ok else None
        if ok and count_files(b, "tree") < n:  # the agents' word is checked against the disk
            ok = sb.wait(lambda: count_files(b, "tree") >= n, 600, 1)
            initial = time.monotonic() - c.started if ok else None
        procs = {**c.agents, "coord": c.coord}
        cost = {k: (cpu_seconds(p.pid), written_mib(p.pid)) for k, p in procs.items()}
        time.sleep(3)  # let both agents settle

        # A new 1 KiB file with N present, `samples` times.
        lat = []
        os.makedirs(os.path.join(a, "new"))
        for i in range(samples):
            data = os.urandom(FILE)
            dst = os.path.join(b, "new", f"{i}.bin")
            with open(os.path.join(a, "new", f"{i}.bin"), "wb") as f:
                f.write(data)
            t = time.monotonic()
            if not sb.wait(lambda: sb.has_bytes(dst, data), 120, 0.002):
                break
            lat.append(time.monotonic() - t)
            time.sleep(0.2)
        lat.sort()

        # Memory once in sync, and an idle agent's CPU over ten seconds.
        time.sleep(3)
        rss = {k: sb.rss_kib(p.pid, "VmRSS") / 1024 for k, p in c.agents.items()}
        coord = sb.rss_kib(c.coord.pid, "VmRSS") / 1024
        before = {k: cpu_seconds(p.pid) for k, p in c.agents.items()}
        time.sleep(10)
        idle = {k: (cpu_seconds(p.pid) - before[k]) / 10 * 100 for k, p in c.agents.items()}
        # The coordinator gives freed memory back to the OS once it has been idle for a while.
        coord_idle = sb.rss_kib(c.coord.pid, "VmRSS") / 1024
        return {
            "initial": initial,
            "median": statistics.median(lat) if lat else None,
            "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            "samples": len(lat),
            "rss": rss,
            "coord": coord,
            "coord_idle": coord_idle,
            "idle": idle,
            "cost": cost,
        }
    finally:
        c.stop()


def main():
    sizes = [int(s) for s in sys.argv[1:] if s.isdigit()] or [10_000, 100_000]
    # Sizes below the largest are measured `runs` times: a single run of the 100,000-file sync
    # varies by ±10 % on this VM, more than the linearity margin, while the largest size takes
    # long enough to run once.
    runs = next((int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--runs=")), 1)
    samples = 20
    rows = []
    # Every size's folders stay until all sizes are measured: on ext4 without a journal (this
    # VM's root file system), creating files stays slow for minutes after a large deletion
    # (the inode allocator skips recently deleted inodes one by one), which would charge the
    # previous size's clean-up to the next size.
    bases = []
    try:
        for n in sizes:
            for _ in range(runs if n < max(sizes) else 1):
                bases.append(tempfile.mkdtemp(prefix="shoal-scale-", dir=os.environ.get("BENCH_DIR")))
                rows.append((n, measure(n, samples, bases[-1])))
    finally:
        for base in bases:
            shutil.rmtree(base, ignore_errors=True)

    def secs(v):
        return "timeout" if v is None else f"{v:.2f} s"

    def ms(v):
        return "timeout" if v is None else f"{v * 1000:.0f} ms"

    print(f"Machine: {sb.machine()}")
    print(f"Machine {sb.speed()}")
    print(f"Build: release; loopback; files of {FILE} B, {PER_DIR} per directory; {samples} new files per size;"
          f" sizes below the largest run {runs} time(s), one row per run")
    print()
    print("| files | initial sync A→B | new 1 KiB file A→B, median / p99 | agent RSS A / B | coordinator RSS, then 10 s later | idle agent CPU A / B |")
    print("|---|---|---|---|---|---|")
    for n, r in rows:
        print(
            f"| {n:,} | {secs(r['initial'])} | {ms(r['median'])} / {ms(r['p99'])} "
            f"| {r['rss']['a']:.0f} / {r['rss']['b']:.0f} MiB | {r['coord']:.0f} / {r['coord_idle']:.0f} MiB "
            f"| {r['idle']['a']:.1f} / {r['idle']['b']:.1f} % |"
        )
    print()
    print("Initial sync, per process from its start to the end of the sync:")
    print()
    print("| files | CPU A / B / coordinator | written to disk A / B / coordinator | sync time per 1,000 files |")
    print("|---|---|---|---|")
    for n, r in rows:
        cpu = " / ".join(f"{r['cost'][k][0]:.1f}" for k in ("a", "b", "coord"))
        written = " / ".join(f"{r['cost'][k][1]:,.0f}" for k in ("a", "b", "coord"))
        per = "timeout" if r["initial"] is None else f"{r['initial'] / n * 1000:.3f} s"
        print(f"| {n:,} | {cpu} s | {written} MiB | {per} |")
    # Linearity: each size against ten times the size a tenth of it (the median of its runs), when
    # both ran.
    times = {}
    for n, r in rows:
        if r["initial"] is not None:
            times.setdefault(n, []).append(r["initial"])
    for n, ts in times.items():
        if n % 10 == 0 and n // 10 in times:
            t, small = statistics.median(ts), times[n // 10]
            ratios = ", ".join(f"{t / (10 * s):.2f}×" for s in small)
            print(f"\n{n:,} files took {t / (10 * statistics.median(small)):.2f}× ten times the median {n // 10:,}-file"
                  f" sync ({len(small)} run(s); against each: {ratios}).")


if __name__ == "__main__":
    main()

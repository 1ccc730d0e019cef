#!/usr/bin/env python3
"""Shoal sync benchmark driver (run it through bench/run, which builds the release binaries).

Starts a real coordinator and two real agents (`shoal run`) on loopback in a temp dir and
measures the figures the README reports. Prints a Markdown table; exits non-zero if a target
is missed.
"""
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SHOAL_BIN: a directory holding other builds of `shoal` and `shoal-coordinator` to compare.
BIN = os.environ.get("SHOAL_BIN") or os.path.join(ROOT, "target", "release")
QUICK = "--quick" in sys.argv
GIB = 1 << 30
MIB = 1 << 20


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def machine():
    cpu = "unknown cpu"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // (1024 * 1024)
    commit = sh("git", "-C", ROOT, "rev-parse", "--short", "HEAD").strip()
    if sh("git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no").strip():
        commit += "+dirty"
    return f"{os.cpu_count()} cores, {cpu}, {mem} GiB RAM, Linux {platform.release()}; commit {commit}; {folders()}"


def folders():
    """Where the benchmark's folders are, and on what: file creation cost differs between file
    systems (see bench/fs)."""
    where = os.environ.get("BENCH_DIR") or tempfile.gettempdir()
    try:
        fs = sh("findmnt", "--noheadings", "--output", "FSTYPE,SOURCE", "--target", where).split()
    except (OSError, subprocess.CalledProcessError):
        fs = ["unknown"]
    return f"folders in {where} ({' on '.join(fs)})"


def speed():
    """How fast this machine is at the moment: the speed of this VM drifts (in slow phases every
    figure doubled), so each table says how long touching 1 GiB of fresh memory and SHA-256 of
    256 MiB took when it was printed."""
    t = time.monotonic()
    buf = bytearray(GIB)
    buf[::4096] = b"\x01" * (GIB // 4096)
    touch = time.monotonic() - t
    del buf
    data = bytes(64 * MIB)
    t = time.monotonic()
    h = hashlib.sha256()
    for _ in range(4):
        h.update(data)
    return f"speed probe: 1 GiB of fresh memory touched in {touch:.2f} s, SHA-256 of 256 MiB in {time.monotonic() - t:.2f} s"


def write_random(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MIB)
            f.write(os.urandom(n))
            left -= n


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(8 * MIB)
            if not b:
                return h.hexdigest()
            h.update(b)


def rss_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def has_bytes(path, data):
    """True when the file at `path` holds exactly `data`."""
    try:
        with open(path, "rb") as f:
            return f.read() == data
    except OSError:
        return False


def write_small_files(root, n):
    """Writes `n` files of 4 KiB of random bytes into 100 directories under `root`/many."""
    for i in range(n):
        d = os.path.join(root, "many", f"d{i % 100}")
        if i < 100:
            os.makedirs(d)
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(os.urandom(4096))


def count_small_files(root):
    """How many files `root`/many holds."""
    return sum(len(files) for _, _, files in os.walk(os.path.join(root, "many")))


def wait(pred, timeout, step=0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


class Cluster:
    def __init__(self, base, settle=1.0, configure=None, coord_args=()):
        self.base = base
        data = os.path.join(base, "coord")
        self.coord = subprocess.Popen(
            [os.path.join(BIN, "shoal-coordinator"), "serve", "--data", data, "--listen", "127.0.0.1:0",
             "--metrics-listen", "127.0.0.1:0", *coord_args],
            stderr=open(os.path.join(base, "coord.log"), "w"),
        )
        info_path = os.path.join(data, "server.json")
        assert wait(lambda: os.path.exists(info_path) and json.load(open(info_path)).get("pid") == self.coord.pid, 30, 0.05)
        info = json.load(open(info_path))
        self.addr, self.metrics_addr = info["addr"], info["metrics_addr"]
        self.agents = {}
        self.roots = {}
        self.homes = {}
        for i, name in enumerate(["a", "b"]):
            sub = "add" if i == 0 else "invite"
            invite = sh(os.path.join(BIN, "shoal-coordinator"), "user", sub, "bench", "--data", data).strip().splitlines()[-1]
            home, root = os.path.join(base, name + "-home"), os.path.join(base, name)
            sh(os.path.join(BIN, "shoal"), "--home", home, "init", "--invite", invite, "--dir", root, "--device", name)
            # Loopback only: no mDNS announcements on the machine's other interfaces.
            config = os.path.join(home, "config.toml")
            with open(config) as f:
                text = f.read()
            with open(config, "w") as f:
                f.write(text.replace("mdns = true", "mdns = false"))
            if configure:
                configure(name, home)
            self.roots[name] = root
            self.homes[name] = home
            self.started = getattr(self, "started", None) or time.monotonic()
            self.last_started = time.monotonic()
            self.agents[name] = subprocess.Popen(
                [os.path.join(BIN, "shoal"), "--home", home, "run"],
                stderr=open(os.path.join(base, name + ".log"), "w"),
                env={**os.environ, "RUST_LOG": os.environ.get("SHOAL_BENCH_LOG", "warn")},
            )
        time.sleep(settle)

    def metric(self, name, default=None):
        text = urllib.request.urlopen(f"http://{self.metrics_addr}/metrics").read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return int(line.split()[1])
        if default is not None:
            return default
        raise KeyError(name)

    def stop(self):
        # The agents first: stopping, each sends what it owes the coordinator.
        for p in self.agents.values():
            p.terminate()
        for p in self.agents.values():
            p.wait(timeout=60)
        self.coord.terminate()
        self.coord.wait(timeout=30)


def main():
    base = tempfile.mkdtemp(prefix="shoal-bench-", dir=os.environ.get("BENCH_DIR"))
    rows = []

    def row(what, target, value, ok):
        rows.append((what, target, value, "ok" if ok else "MISSED"))

    try:
        # 1. Chunk + hash throughput from the page cache.
        big = os.path.join(base, "one-gib.bin")
        write_random(big, GIB)
        sha(big)  # warm the page cache
        gibs = float(sh(os.path.join(BIN, "examples", "chunkbench"), "throughput", big))
        os.remove(big)
        row("chunk + hash 1 GiB (page cache)", ">= 1 GiB/s", f"{gibs:.2f} GiB/s", gibs >= 1.0)

        c = Cluster(base)
        a, b = c.roots["a"], c.roots["b"]
        idle_start = rss_kib(c.coord.pid, "VmRSS")

        # 2. A new 1 KiB file on A is complete on B.
        lat = []
        os.makedirs(os.path.join(a, "lat"))
        tries = 20 if QUICK else 50
        for i in range(tries):
            data = os.urandom(1024)
            dst = os.path.join(b, "lat", f"{i}.bin")
            with open(os.path.join(a, "lat", f"{i}.bin"), "wb") as f:
                f.write(data)
            t = time.monotonic()
            assert wait(lambda: has_bytes(dst, data), 30), "1 KiB file never arrived"
            lat.append(time.monotonic() - t)
            time.sleep(0.05)
        lat.sort()
        med, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        row(f"1 KiB file A→B, median of {tries}", "<= 300 ms", f"{med * 1000:.0f} ms", med <= 0.3)
        row(f"1 KiB file A→B, p99 of {tries}", "<= 1 s", f"{p99 * 1000:.0f} ms", p99 <= 1.0)

        # 3. 10,000 files of 4 KiB in 100 dirs.
        n = 2000 if QUICK else 10000
        t = time.monotonic()
        write_small_files(a, n)
        ok = wait(lambda: count_small_files(b) >= n, 120, 0.02)
        many = time.monotonic() - t
        row(f"{n} files of 4 KiB in 100 dirs A→B", "<= 7 s", f"{many:.2f} s" if ok else "timeout", ok and many <= 7)

        # 4. A 1 GiB file created on A is on B (moved into the folder in one rename).
        staging = os.path.join(base, "staging.bin")
        write_random(staging, GIB)
        want = sha(staging)
        t = time.monotonic()
        os.rename(staging, os.path.join(a, "big.bin"))
        dst = os.path.join(b, "big.bin")
        ok = wait(lambda: os.path.exists(dst) and os.path.getsize(dst) == GIB, 120, 0.01)
        big_s = time.monotonic() - t
        ok = ok and sha(dst) == want
        row("1 GiB file A→B", "<= 5 s", f"{big_s:.2f} s" if ok else "timeout", ok and big_s <= 5)
        peak = max(rss_kib(c.agents["a"].pid, "VmHWM"), rss_kib(c.agents["b"].pid, "VmHWM"))
        row("peak RSS of an agent (through the 1 GiB sync)", "<= 150 MiB", f"{peak / 1024:.0f} MiB", peak <= 150 * 1024)
        os.remove(os.path.join(a, "big.bin"))

        # 5. 1 KiB inserted in the middle of a 256 MiB file.
        size = 256 * MIB
        staging = os.path.join(base, "staging-256.bin")
        write_random(staging, size)
        os.rename(staging, os.path.join(a, "mid.bin"))
        dst = os.path.join(b, "mid.bin")
        assert wait(lambda: os.path.exists(dst) and os.path.getsize(dst) == size, 120, 0.01)
        # B may have it from A before the origin does (a pending version): A's upload of it must
        # be over before the edit's is counted.
        assert wait(lambda: c.metric("shoal_pending_versions") == 0, 120, 0.05), "the 256 MiB file never became durable"
        time.sleep(0.5)
        before = c.metric("shoal_chunk_bytes_in_total")
        with open(os.path.join(a, "mid.bin"), "rb") as f:
            data = f.read()
        edited = data[: size // 2] + os.urandom(1024) + data[size // 2:]
        del data
        with open(staging, "wb") as f:
            f.write(edited)
        want = hashlib.sha256(edited).hexdigest()
        del edited
        t = time.monotonic()
        os.rename(staging, os.path.join(a, "mid.bin"))
        ok = wait(lambda: os.path.exists(dst) and os.path.getsize(dst) == size + 1024, 60, 0.005)
        edit_s = time.monotonic() - t
        ok = ok and sha(dst) == want
        time.sleep(0.5)
        sent = c.metric("shoal_chunk_bytes_in_total") - before
        row("1 KiB insert into 256 MiB: chunk bytes uploaded", "<= 512 KiB", f"{sent / 1024:.0f} KiB", sent <= 512 * 1024)
        row("1 KiB insert into 256 MiB: new version on B", "<= 2 s", f"{edit_s:.2f} s" if ok else "timeout", ok and edit_s <= 2)

        time.sleep(10)  # idle: no requests for ten seconds
        idle_end = rss_kib(c.coord.pid, "VmRSS")
        row("idle coordinator RSS (fresh / after the runs)", "<= 50 MiB",
            f"{idle_start / 1024:.0f} / {idle_end / 1024:.0f} MiB", max(idle_start, idle_end) <= 50 * 1024)
        c.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(f"Machine: {machine()}")
    print(f"Machine {speed()}")
    print("Build: release; loopback; coordinator on the embedded defaults (sled + local disk)")
    print()
    print("| measurement | target | result | |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")
    sys.exit(0 if all(r[3] == "ok" for r in rows) else 1)


if __name__ == "__main__":
    main()

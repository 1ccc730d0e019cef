#!/usr/bin/env python3
"""A regional relay against the coordinator (run it through bench/relay, which builds the binaries).

A real coordinator, a real relay (region `eu`, `--cache-size 10GiB`) and real agents on
loopback, LAN sync off (no byte from a peer). An author uploads a 1 GiB file; then, one at a
time, each a fresh device timed from its start to the whole file on disk:
  - device `fill` (region eu) downloads it through the relay, which fetches it from the origin;
  - three times in turn, a device with relays off downloads it from the coordinator and one of
    region eu through the relay, every chunk a cache hit (the medians are compared);
  - as root, once more through the relay after the kernel's page cache is dropped, so the
    relay reads its segments from the disk.
Then the author uploads a 256 MiB file and two more devices of the region download it at the
same time: the relay should fetch each chunk from the origin once. Prints a Markdown table;
exits non-zero if the relay's hits take more than 0.8x the coordinator's time, its peak RSS
passes 64 MiB, or the region cost the origin more than one fetch per chunk.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sync_bench import BIN, GIB, MIB, machine, rss_kib, sh, sha, speed, wait, write_random  # noqa: E402


ROUNDS = 3


def median(runs):
    """The run (seconds, CPU) with the median time."""
    return sorted(runs)[len(runs) // 2]


def cpu_s(pid):
    """User plus system CPU seconds the process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics(addr):
    text = urllib.request.urlopen(f"http://{addr}/metrics").read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


class World:
    def __init__(self, base):
        self.base = base
        self.data = os.path.join(base, "coord")
        self.procs = []
        self.coord = self.spawn("coord", [os.path.join(BIN, "shoal-coordinator"), "serve", "--data", self.data,
                                          "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        info_path = os.path.join(self.data, "server.json")
        assert wait(lambda: os.path.exists(info_path) and json.load(open(info_path)).get("pid") == self.coord.pid, 30, 0.05)
        info = json.load(open(info_path))
        self.addr, self.metrics_addr, self.fingerprint = info["addr"], info["metrics_addr"], info["fingerprint"]
        self.users = 0

    def spawn(self, name, args, **kw):
        p = subprocess.Popen(args, stderr=open(os.path.join(self.base, name + ".log"), "w"),
                             env={**os.environ, "RUST_LOG": os.environ.get("SHOAL_BENCH_LOG", "warn")}, **kw)
        self.procs.append(p)
        return p

    def relay(self, name, region, size):
        out = sh(os.path.join(BIN, "shoal-coordinator"), "relay", "add", name, "--region", region, "--data", self.data)
        token = out.strip().splitlines()[-1]
        cache = os.path.join(self.base, name)
        p = self.spawn(name, [os.path.join(BIN, "shoal-relay"), "serve", "--region", region, "--coordinator", self.addr,
                              "--coordinator-fingerprint", self.fingerprint, "--token", token, "--cache-dir", cache,
                              "--cache-size", size, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        info_path = os.path.join(cache, "relay.json")
        assert wait(lambda: os.path.exists(info_path) and json.load(open(info_path)).get("pid") == p.pid, 30, 0.05)
        return p, json.load(open(info_path))

    def device(self, name, region=None, relays=True):
        sub = "add" if self.users == 0 else "invite"
        self.users += 1
        invite = sh(os.path.join(BIN, "shoal-coordinator"), "user", sub, "bench", "--data", self.data).strip().splitlines()[-1]
        home, root = os.path.join(self.base, name + "-home"), os.path.join(self.base, name)
        sh(os.path.join(BIN, "shoal"), "--home", home, "init", "--invite", invite, "--dir", root, "--device", name)
        config = os.path.join(home, "config.toml")
        with open(config) as f:
            text = f.read().replace("mdns = true", "mdns = false").replace("lan_sync = true", "lan_sync = false")
        text = text.replace("relays = true", f"relays = {'true' if relays else 'false'}")
        if region:
            text += f'region = "{region}"\n'
        with open(config, "w") as f:
            f.write(text)
        return home, root

    def run(self, name, home):
        return self.spawn(name, [os.path.join(BIN, "shoal"), "--home", home, "run"])

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def timed_download(w, name, want_sha, size, path, servers, **kw):
    """Seconds until a fresh device has the file, and the CPU seconds it, then each of
    `servers` (processes), spent meanwhile."""
    home, root = w.device(name, **kw)
    os.sync()
    before = [cpu_s(s.pid) for s in servers]
    t = time.monotonic()
    p = w.run(name, home)
    dst = os.path.join(root, path)
    ok = wait(lambda: os.path.exists(dst) and os.path.getsize(dst) == size, 600, 0.01)
    took = time.monotonic() - t
    cpu = [cpu_s(p.pid)] + [cpu_s(s.pid) - b for s, b in zip(servers, before)]
    assert ok and sha(dst) == want_sha, f"{name} never got {path}; logs in {w.base}"
    p.terminate()
    p.wait(timeout=60)
    shutil.rmtree(root)
    return took, cpu


def drop_page_cache():
    """Empties the kernel's page cache (root only); False where it cannot."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def main():
    base = tempfile.mkdtemp(prefix="shoal-relay-bench-", dir=os.environ.get("BENCH_DIR"))
    w = World(base)
    ok = False
    try:
        relay, info = w.relay("eu1", "eu", "10GiB")
        home, root = w.device("author", relays=False)
        staging = os.path.join(base, "staging.bin")
        write_random(staging, GIB)
        want = sha(staging)
        os.rename(staging, os.path.join(root, "big.bin"))
        sh(os.path.join(BIN, "shoal"), "--home", home, "sync", "--once")
        servers = [w.coord, relay]
        idle_peak = rss_kib(relay.pid, "VmHWM") / 1024
        fill_s, fill_cpu = timed_download(w, "fill", want, GIB, "big.bin", servers, region="eu")
        fill_peak = rss_kib(relay.pid, "VmHWM") / 1024
        # Coordinator and relay hits in turns, so a slow spell of the machine hits both.
        m0 = metrics(info["metrics_addr"])
        origin_runs, hit_runs = [], []
        for i in range(ROUNDS):
            origin_runs.append(timed_download(w, f"origin{i}", want, GIB, "big.bin", servers, relays=False))
            hit_runs.append(timed_download(w, f"hit{i}", want, GIB, "big.bin", servers, region="eu"))
        m1 = metrics(info["metrics_addr"])
        hit_peak = rss_kib(relay.pid, "VmHWM") / 1024
        hits = m1["shoal_relay_cache_hits_total"] - m0["shoal_relay_cache_hits_total"]
        misses = m1["shoal_relay_cache_misses_total"] - m0["shoal_relay_cache_misses_total"]
        # The same hits with the cache's segments read from the disk, not from memory.
        cold = timed_download(w, "cold", want, GIB, "big.bin", servers, region="eu") if drop_page_cache() else None

        # Two devices of the region at once, a new file.
        staging = os.path.join(base, "staging2.bin")
        write_random(staging, 256 * MIB)
        want2 = sha(staging)
        os.rename(staging, os.path.join(root, "second.bin"))
        sh(os.path.join(BIN, "shoal"), "--home", home, "sync", "--once")
        before = metrics(info["metrics_addr"])["shoal_relay_origin_bytes_total"]
        pair = [w.device(n, region="eu") for n in ("p1", "p2")]
        procs = [w.run(n, h) for n, (h, _) in zip(("p1", "p2"), pair)]
        for _, r in pair:
            dst = os.path.join(r, "second.bin")
            assert wait(lambda: os.path.exists(dst) and os.path.getsize(dst) == 256 * MIB, 600, 0.01)
            assert sha(dst) == want2
        for p in procs:
            p.terminate()
        region_origin = metrics(info["metrics_addr"])["shoal_relay_origin_bytes_total"] - before
        relay_peak = rss_kib(relay.pid, "VmHWM") / 1024
        ok = True
    finally:
        w.stop()
        if ok:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"failed: logs kept in {base}", file=sys.stderr)

    origin_s, origin_cpu = median(origin_runs)
    hit_s, hit_cpu = median(hit_runs)
    ratio = hit_s / origin_s
    runs = lambda rs: " / ".join(f"{t:.2f}" for t, _ in rs)  # noqa: E731
    print(f"Machine: {machine()}")
    print(f"Machine {speed()}")
    print("Build: release; loopback; LAN sync off; relay cache 10 GiB (bench/relay)")
    print()
    print("| measurement | value | target |")
    print("|---|---|---|")
    print(f"| 1 GiB to a fresh device from the coordinator (median of {runs(origin_runs)} s) | {origin_s:.2f} s | - |")
    print(f"| 1 GiB to a fresh device through the relay, filling it (misses) | {fill_s:.2f} s | - |")
    print(f"| 1 GiB to a fresh device from the relay's cache (median of {runs(hit_runs)} s; {hits:.0f} hits, {misses:.0f} misses) "
          f"| {hit_s:.2f} s ({ratio:.2f}x the coordinator) | <= 0.8x |")
    if cold:
        print(f"| the same with the page cache dropped first (segments read from the disk) | {cold[0]:.2f} s "
              f"({cold[0] / origin_s:.2f}x) | - |")
    print(f"| relay peak RSS (cache 10 GiB, 1.25 GiB cached, 5.5 GiB served) | {relay_peak:.0f} MiB (registered: {idle_peak:.0f}; "
          f"after the fill: {fill_peak:.0f}; after the hits: {hit_peak:.0f}) | < 64 MiB |")
    print(f"| origin bytes for 256 MiB fetched by two devices of the region at once | {region_origin / MIB:.0f} MiB | 256 MiB |")
    print()
    print("CPU seconds spent during each download (agent / coordinator / relay):")
    for what, c in (("from the coordinator", origin_cpu), ("filling the relay", fill_cpu), ("relay hits", hit_cpu)):
        print(f"- {what}: {c[0]:.2f} / {c[1]:.2f} / {c[2]:.2f}")
    good = ratio <= 0.8 and relay_peak < 64 and region_origin == 256 * MIB
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()

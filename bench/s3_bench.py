#!/usr/bin/env python3
"""Chunks in S3 against chunks on local disk (run it through bench/s3, which builds the binaries).

For each backend: a real coordinator and two agents (LAN sync off, so every byte goes through the
origin) on loopback; a 1 GiB file written on A until it is whole on B; then 20 edits of 1 KiB (a
new small file each), counted in the S3 requests the coordinator made (`/metrics`). S3 runs
twice: as configured by default (B reads what A just uploaded from the coordinator's cache of
recent packs) and with that cache off (every byte read back from S3, as for a device that
fetches the file after the cache moved on). Prints a Markdown table; exits non-zero if S3 with
the default settings is slower than 1.5x local disk.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sync_bench import GIB, Cluster, has_bytes, machine, rss_kib, sha, speed, wait, write_random  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S3SERVER = os.path.join(ROOT, "target", "release", "examples", "s3server")
BUCKET = "shoal-bench"
KEY, SECRET = "shoal-test-access-key", "shoal-test-secret-key-0123456789"
EDITS = 20


def lan_off(name, home):
    config = os.path.join(home, "config.toml")
    with open(config) as f:
        text = f.read()
    if "lan_sync = true" in text:
        text = text.replace("lan_sync = true", "lan_sync = false")
    else:
        text += "lan_sync = false\n"
    with open(config, "w") as f:
        f.write(text)


def requests(c):
    return {op: c.metric(f'shoal_storage_requests_total{{op="{op}"}}', 0) for op in ("put", "get", "list", "delete")}


def run(base, coord_args):
    os.makedirs(base, exist_ok=True)
    c = Cluster(base, configure=lan_off, coord_args=coord_args)
    a, b = c.roots["a"], c.roots["b"]
    out = {}
    staging = os.path.join(base, "staging.bin")
    write_random(staging, GIB)
    want = sha(staging)
    # Both backends start from the same state: no dirty pages left to write back.
    os.sync()
    r0 = requests(c)
    t = time.monotonic()
    os.rename(staging, os.path.join(a, "big.bin"))
    dst = os.path.join(b, "big.bin")
    ok = wait(lambda: os.path.exists(dst) and os.path.getsize(dst) == GIB, 300, 0.01)
    out["gib_s"] = time.monotonic() - t if ok and sha(dst) == want else None
    assert out["gib_s"] is not None, f"the 1 GiB file never arrived; see the logs in {base}"
    time.sleep(1)
    r1 = requests(c)
    out["gib_requests"] = {k: r1[k] - r0[k] for k in r1}
    out["coord_peak_mib"] = rss_kib(c.coord.pid, "VmHWM") / 1024
    os.makedirs(os.path.join(a, "edits"))
    for i in range(EDITS):
        data = os.urandom(1024)
        with open(os.path.join(a, "edits", f"{i}.bin"), "wb") as f:
            f.write(data)
        assert wait(lambda: has_bytes(os.path.join(b, "edits", f"{i}.bin"), data), 30), "an edit never arrived"
    time.sleep(1)
    r2 = requests(c)
    out["edit_requests"] = {k: (r2[k] - r1[k]) / EDITS for k in r2}
    c.stop()
    return out


def main():
    base = tempfile.mkdtemp(prefix="shoal-s3-bench-", dir=os.environ.get("BENCH_DIR"))
    server = None
    ok = False
    try:
        local = run(os.path.join(base, "local"), ())
        shutil.rmtree(os.path.join(base, "local"), ignore_errors=True)
        objects = os.path.join(base, "objects")
        server = subprocess.Popen([S3SERVER, objects, BUCKET], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        endpoint = server.stdout.readline().strip()
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = KEY, SECRET
        flags = ("--s3-bucket", BUCKET, "--s3-endpoint", endpoint, "--s3-path-style")
        s3 = run(os.path.join(base, "s3"), flags)
        shutil.rmtree(os.path.join(base, "s3"), ignore_errors=True)
        cold = run(os.path.join(base, "s3-cold"), (*flags, "--s3-prefix", "cold/", "--s3-cache-size", "0"))
        ok = True
    finally:
        if server:
            server.stdin.close()
            server.wait(timeout=30)
        if ok:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"failed: logs kept in {base}", file=sys.stderr)

    def secs(v):
        return f"{v:.2f} s" if v is not None else "timeout"

    ratio = s3["gib_s"] / local["gib_s"] if s3["gib_s"] and local["gib_s"] else None
    cold_ratio = cold["gib_s"] / local["gib_s"]
    g, e, gc = s3["gib_requests"], s3["edit_requests"], cold["gib_requests"]
    print(f"Machine: {machine()}")
    print(f"Machine {speed()}")
    print("Build: release; loopback; LAN sync off; S3: s3s-fs on loopback (bench/s3)")
    print()
    def reqs(r):
        return f"{r['put']} PUT, {r['get']} GET, {r['list']} LIST, {r['delete']} DELETE"

    print("| measurement | local disk | S3 (default: cache of recent packs) | S3, cache off (every read from S3) |")
    print("|---|---|---|---|")
    print(f"| 1 GiB file A→B through the origin | {secs(local['gib_s'])} | {secs(s3['gib_s'])} ({ratio:.2f}x; target <= 1.5x) | "
          f"{secs(cold['gib_s'])} ({cold_ratio:.2f}x) |")
    print(f"| coordinator peak RSS through the 1 GiB file | {local['coord_peak_mib']:.0f} MiB | {s3['coord_peak_mib']:.0f} MiB | "
          f"{cold['coord_peak_mib']:.0f} MiB |")
    print(f"| S3 requests for the 1 GiB file (uploaded once, downloaded once) | - | {reqs(g)} | {reqs(gc)} |")
    print(f"| S3 requests per 1 KiB edit (a new file, mean of {EDITS}) | - | "
          f"{e['put']:.1f} PUT, {e['get']:.1f} GET, {e['list']:.1f} LIST | - |")
    sys.exit(0 if ratio is not None and ratio <= 1.5 else 1)


if __name__ == "__main__":
    main()

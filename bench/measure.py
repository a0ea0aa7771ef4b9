#!/usr/bin/env python3
"""Runs a shell command and prints "<wall seconds> <peak memory MiB>" on stderr's last line.

Peak memory is all the memory the command holds at once: the sum of the resident set sizes
of every process in its session (it runs under setsid), plus the bytes it adds to tmpfs
mounts (/dev/shm, and /tmp when it is a tmpfs), sampled every 10 ms.

usage: measure.py OUT_FILE -- COMMAND...   (writes "<seconds> <MiB>" to OUT_FILE)
"""
import os
import subprocess
import sys
import time


def tmpfs_mounts():
    mounts = []
    with open("/proc/self/mounts") as f:
        for line in f:
            _, target, fstype = line.split()[:3]
            if fstype == "tmpfs" and target in ("/dev/shm", "/tmp"):
                mounts.append(target)
    return mounts


def used(path):
    s = os.statvfs(path)
    return (s.f_blocks - s.f_bfree) * s.f_frsize


def session_rss(sid):
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid:  # field 6 (session), after state, ppid, pgrp
                continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return total


def main():
    out, sep, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
    assert sep == "--" and cmd
    mounts = tmpfs_mounts()
    base = {m: used(m) for m in mounts}
    start = time.monotonic()
    child = subprocess.Popen(cmd, start_new_session=True)
    peak = 0
    while child.poll() is None:
        mem = session_rss(child.pid) + sum(max(0, used(m) - base[m]) for m in mounts)
        peak = max(peak, mem)
        time.sleep(0.01)
    elapsed = time.monotonic() - start
    with open(out, "w") as f:
        f.write(f"{elapsed:.3f} {peak / 1048576:.1f}\n")
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()

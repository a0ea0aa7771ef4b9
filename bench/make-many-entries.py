#!/usr/bin/env python3
"""Writes an OCI layout with one layer of many small entries, for the per-entry memory rows
of `make bench`. Deterministic.

usage: make-many-entries.py OUT files|dirs
  files: tag `files`, 1,000,000 files of 0-63 bytes in 1,000 directories of 1,000
  dirs:  tag `dirs`, 300,000 empty directories, 300 under each of 1,000 directories
"""
import io, sys, tarfile

from oci_layout import write_layout

out, kind = sys.argv[1], sys.argv[2]
assert kind in ("files", "dirs")


def entry(name, type_, size=0):
    info = tarfile.TarInfo(name); info.type = type_; info.size = size
    info.mode = 0o755 if type_ == tarfile.DIRTYPE else 0o644
    info.mtime = 1_700_000_000
    return info


def fill(tar):
    for d in range(1000):
        tar.addfile(entry(f"data/d{d:03}", tarfile.DIRTYPE))
        if kind == "files":
            for f in range(1000):
                data = b"x" * ((d * 1000 + f) % 64)
                tar.addfile(entry(f"data/d{d:03}/file-{f:04}", tarfile.REGTYPE, len(data)), io.BytesIO(data))
        else:
            for s in range(300):
                tar.addfile(entry(f"data/d{d:03}/subdir-{s:03}", tarfile.DIRTYPE))


size = write_layout(out, kind, fill, tarfile.GNU_FORMAT)
print(f"{out}: one layer of {kind}, {size >> 20} MiB compressed")

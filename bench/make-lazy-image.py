#!/usr/bin/env python3
"""Writes an OCI layout (tag `big`) for the lazy-start rows of bench/lazy.sh: one layer of
1 GiB whose command reads little — the host's static busybox as /bin/busybox with `sh` and
`true` linked to it, and /data/big, 1 GiB of pseudo-random bytes (incompressible, as media or
model weights are). Deterministic."""
import io, random, sys, tarfile

from oci_layout import write_layout

out = sys.argv[1]
rng = random.Random(19)
MIB = 1 << 20


class Random1G(io.RawIOBase):
    """1 GiB of rng bytes, read in pieces."""
    def __init__(self):
        self.left = 1024 * MIB
    def readable(self):
        return True
    def readinto(self, b):
        n = min(len(b), self.left, MIB)
        b[:n] = rng.randbytes(n)
        self.left -= n
        return n


def fill(tar):
    for d in ("bin", "data"):
        info = tarfile.TarInfo(d); info.type = tarfile.DIRTYPE; info.mode = 0o755
        tar.addfile(info)
    busybox = open("/bin/busybox", "rb").read()
    info = tarfile.TarInfo("bin/busybox"); info.size = len(busybox); info.mode = 0o755
    tar.addfile(info, io.BytesIO(busybox))
    for applet in ("sh", "true"):
        info = tarfile.TarInfo(f"bin/{applet}"); info.type = tarfile.SYMTYPE; info.linkname = "busybox"
        tar.addfile(info)
    info = tarfile.TarInfo("data/big"); info.size = 1024 * MIB; info.mode = 0o644
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BufferedReader(Random1G(), MIB))


size = write_layout(out, "big", fill, tarfile.PAX_FORMAT)
print(f"{out}: one layer, {size >> 20} MiB compressed")

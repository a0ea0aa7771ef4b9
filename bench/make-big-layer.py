#!/usr/bin/env python3
"""Writes an OCI layout (tag `big`) with one ~2 GiB layer, for `BIG=1 make bench`: 20,000
files of 100 KiB in 200 directories. Content is pseudo-random but repetitive enough for gzip
-1 to halve it, so the layer is big unpacked and realistic to decompress. Deterministic."""
import io, random, sys, tarfile

from oci_layout import write_layout

out = sys.argv[1]
rng = random.Random(42)
words = [bytes(rng.getrandbits(8) for _ in range(64)) for _ in range(256)]


def fill(tar):
    for d in range(200):
        info = tarfile.TarInfo(f"data/d{d:03}"); info.type = tarfile.DIRTYPE; info.mode = 0o755
        tar.addfile(info)
        for f in range(100):
            data = b"".join(rng.choice(words) for _ in range(1600))
            info = tarfile.TarInfo(f"data/d{d:03}/f{f:03}"); info.size = len(data); info.mode = 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))


size = write_layout(out, "big", fill, tarfile.PAX_FORMAT)
print(f"{out}: one layer, {size >> 20} MiB compressed")

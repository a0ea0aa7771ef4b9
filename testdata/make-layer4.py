#!/usr/bin/env python3
"""Layer 4 of the test image, written entry by entry with Python's tarfile (PAX format).

- etc/default/.wh..wh..opq: etc/default becomes opaque (its lower files vanish) with one
  new file in it;
- etc/.wh.motd: a whiteout of a file from the base layer;
- usr/local/share/layer4/file.txt: the tar lists neither usr/ nor usr/local/ nor
  usr/local/share/ (setgid, group staff on Debian), which must keep their lower metadata;
- a file with a nanosecond PAX mtime, a PAX xattr and a large uid.
No directory that exists below is listed, so no parent comes from this tar.
"""
import io
import sys
import tarfile


def add(tar, name, data=b"", mode=0o644, kind=tarfile.REGTYPE, mtime=1_700_000_000, pax=None, uid=0):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = mtime
    info.uid = uid
    info.gid = 0
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if pax:
        info.pax_headers = pax
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as tar:
    add(tar, "etc/default/.wh..wh..opq", mtime=0)
    add(tar, "etc/default/only-this", b"opaque dir content\n")
    add(tar, "etc/.wh.motd", mtime=0)
    add(tar, "usr/local/share/layer4", kind=tarfile.DIRTYPE, mode=0o755, mtime=1_600_000_000)
    add(tar, "usr/local/share/layer4/file.txt", b"parents not listed\n")
    add(tar, "edge/pax-file", b"pax\n", mode=0o640, uid=3_000_000,
        pax={"mtime": "1700000000.987654321", "SCHILY.xattr.user.pax": "from-pax"})

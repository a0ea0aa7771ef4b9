#!/usr/bin/env python3
"""Writes an OCI layout with one layer of many small entries, for the per-entry memory rows
of `make bench`. Deterministic.

usage: make-many-entries.py OUT files|dirs
  files: tag `files`, 1,000,000 files of 0-63 bytes in 1,000 directories of 1,000
  dirs:  tag `dirs`, 300,000 empty directories, 300 under each of 1,000 directories
"""
import gzip, hashlib, io, json, os, sys, tarfile

out, kind = sys.argv[1], sys.argv[2]
assert kind in ("files", "dirs")
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs, exist_ok=True)


class Hasher(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0
    def writable(self):
        return True
    def write(self, b):
        self.h.update(b); self.n += len(b); return self.f.write(b)


def entry(name, type_, size=0):
    info = tarfile.TarInfo(name); info.type = type_; info.size = size
    info.mode = 0o755 if type_ == tarfile.DIRTYPE else 0o644
    info.mtime = 1_700_000_000
    return info


tmp = os.path.join(out, "layer.tmp")
with open(tmp, "wb") as raw:
    zhash = Hasher(raw)
    with gzip.GzipFile(fileobj=zhash, mode="wb", compresslevel=1, mtime=0) as gz:
        thash = Hasher(gz)
        with tarfile.open(fileobj=thash, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for d in range(1000):
                tar.addfile(entry(f"data/d{d:03}", tarfile.DIRTYPE))
                if kind == "files":
                    for f in range(1000):
                        data = b"x" * ((d * 1000 + f) % 64)
                        tar.addfile(entry(f"data/d{d:03}/file-{f:04}", tarfile.REGTYPE, len(data)), io.BytesIO(data))
                else:
                    for s in range(300):
                        tar.addfile(entry(f"data/d{d:03}/subdir-{s:03}", tarfile.DIRTYPE))
    diff_id, digest, size = thash.h.hexdigest(), zhash.h.hexdigest(), zhash.n
os.rename(tmp, os.path.join(blobs, digest))
def put(obj):
    b = json.dumps(obj).encode(); h = hashlib.sha256(b).hexdigest()
    open(os.path.join(blobs, h), "wb").write(b); return h, len(b)
cfg, cfg_size = put({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id]}})
man, man_size = put({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + cfg, "size": cfg_size},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + digest, "size": size}]})
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": "sha256:" + man, "size": man_size, "annotations": {"org.opencontainers.image.ref.name": kind}}]},
    open(os.path.join(out, "index.json"), "w"))
open(os.path.join(out, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
print(f"{out}: one layer of {kind}, {size >> 20} MiB compressed")

#!/usr/bin/env python3
"""Writes an OCI layout (tag `big`) with one ~2 GiB layer, for `BIG=1 make bench`: 20,000
files of 100 KiB in 200 directories. Content is pseudo-random but repetitive enough for gzip
-1 to halve it, so the layer is big unpacked and realistic to decompress. Deterministic."""
import gzip, hashlib, io, json, os, random, sys, tarfile

out = sys.argv[1]
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs, exist_ok=True)
rng = random.Random(42)
words = [bytes(rng.getrandbits(8) for _ in range(64)) for _ in range(256)]

class Hasher(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0
    def writable(self):
        return True
    def write(self, b):
        self.h.update(b); self.n += len(b); return self.f.write(b)

tmp = os.path.join(out, "layer.tmp")
with open(tmp, "wb") as raw:
    zhash = Hasher(raw)
    with gzip.GzipFile(fileobj=zhash, mode="wb", compresslevel=1, mtime=0) as gz:
        thash = Hasher(gz)
        with tarfile.open(fileobj=thash, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for d in range(200):
                info = tarfile.TarInfo(f"data/d{d:03}"); info.type = tarfile.DIRTYPE; info.mode = 0o755
                tar.addfile(info)
                for f in range(100):
                    data = b"".join(rng.choice(words) for _ in range(1600))
                    info = tarfile.TarInfo(f"data/d{d:03}/f{f:03}"); info.size = len(data); info.mode = 0o644
                    info.mtime = 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))
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
    "digest": "sha256:" + man, "size": man_size, "annotations": {"org.opencontainers.image.ref.name": "big"}}]},
    open(os.path.join(out, "index.json"), "w"))
open(os.path.join(out, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
print(f"{out}: one layer, {size >> 20} MiB compressed")

"""One-layer OCI layouts for the bench generators (make-big-layer.py, make-many-entries.py):
the layer gzip -1 compressed and hashed as it is written, then config, manifest and index.
Deterministic for a deterministic `fill`."""
import gzip, hashlib, io, json, os, tarfile


class Hasher(io.RawIOBase):
    """Passes writes on to `f`, counting and hashing them."""
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0
    def writable(self):
        return True
    def write(self, b):
        self.h.update(b); self.n += len(b); return self.f.write(b)


def write_layout(out, tag, fill, tar_format):
    """Writes the layout `out` whose image `tag` has one layer: a tar (`tar_format`) whose
    entries `fill(tar)` adds. Returns the layer's compressed size."""
    def write_tar(f):
        with tarfile.open(fileobj=f, mode="w|", format=tar_format) as tar:
            fill(tar)
    return write_layout_of(out, tag, write_tar)


def write_layout_of(out, tag, write_tar):
    """Writes the layout `out` whose image `tag` has one layer: the tar bytes `write_tar(f)`
    writes into `f`. Returns the layer's compressed size."""
    blobs = os.path.join(out, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    tmp = os.path.join(out, "layer.tmp")
    with open(tmp, "wb") as raw:
        zhash = Hasher(raw)
        with gzip.GzipFile(fileobj=zhash, mode="wb", compresslevel=1, mtime=0) as gz:
            thash = Hasher(gz)
            write_tar(thash)
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
        "digest": "sha256:" + man, "size": man_size, "annotations": {"org.opencontainers.image.ref.name": tag}}]},
        open(os.path.join(out, "index.json"), "w"))
    open(os.path.join(out, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
    return size


if __name__ == "__main__":
    # usage: oci_layout.py OUT TAG TAR — a layout whose image TAG has the tar file TAR as its layer.
    import shutil, sys
    out, tag, tar_path = sys.argv[1:4]
    write_layout_of(out, tag, lambda f: shutil.copyfileobj(open(tar_path, "rb"), f))

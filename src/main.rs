//! The `vmrootfs` command line: parses arguments, calls the library, prints results.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vmrootfs::progress::{self, Reporter};
use vmrootfs::{BuildOptions, Builder, FsType, Platform, Store};

/// Turn OCI container images into read-only filesystem blobs, one per layer, for microVMs.
///
/// Each layer becomes an EROFS or ext4 image that a microVM runtime (Firecracker, Cloud
/// Hypervisor, QEMU, libkrun) attaches as a read-only drive and stacks with overlayfs
/// (`lowerdir=top:…:base`). Blobs live in a content-addressed store shared by all images.
/// `build --merge` and `export --single-disk` hand a runtime short of drives the whole image
/// as one drive instead, over the same blobs.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    /// Store directory [default: $XDG_DATA_HOME/vmrootfs or ~/.local/share/vmrootfs]
    #[arg(long, global = true, env = "VMROOTFS_STORE", value_name = "DIR")]
    store: Option<PathBuf>,
    /// Print more (tool command lines).
    #[arg(short, long, global = true)]
    verbose: bool,
    /// Print only errors and results.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an image into per-layer blobs and record it under a tag
    ///
    /// SOURCE is one of:
    ///   REF, docker://REF           a registry image: alpine:3.20, ghcr.io/org/app@sha256:…,
    ///                               127.0.0.1:5000/lab/img:tag (plain HTTP for localhost)
    ///   oci:DIR[:TAG]               an OCI image layout directory
    ///   oci-archive:FILE[:TAG]      a tar of an OCI image layout
    ///   docker-archive:FILE[:REF]   a `docker save` tar
    ///
    /// Layers already in the store are not converted again. Needs no root (only --squash does:
    /// it mounts the blobs). Examples:
    ///   vmrootfs build alpine:3.20
    ///   vmrootfs build oci-archive:testdata/busybox.oci.tar:busybox --tag busybox
    ///   vmrootfs build oci:./layout:v1 --fs ext4 --json
    #[command(verbatim_doc_comment)]
    Build {
        /// The image to convert (see above).
        source: String,
        /// Tag to record the image under [default: SOURCE as given].
        #[arg(long, short)]
        tag: Option<String>,
        /// Filesystem of the blobs.
        #[arg(long, value_enum, default_value_t = FsType::Erofs)]
        fs: FsType,
        /// Platform to pick from a multi-platform index, os/arch[/variant] [default: the host's].
        #[arg(long)]
        platform: Option<Platform>,
        /// Layers streamed (downloaded, decompressed, converted) at once [default: number of CPUs].
        #[arg(long, short)]
        jobs: Option<usize>,
        /// Also make one flattened blob of the whole image (whiteouts applied), for runtimes
        /// without overlayfs or with more layers than drives.
        #[arg(long)]
        squash: bool,
        /// Also make one EROFS metadata blob of the merged tree (whiteouts applied) over the
        /// layer blobs, no file data copied: one drive per image with `export --single-disk`
        /// or `run --merged`. EROFS only; needs no root.
        #[arg(long)]
        merge: bool,
        /// Give each layer blob a dm-verity hash tree (4096-byte blocks, sha256, salt = the
        /// chain ID, so the root digest is the same on every host), recorded with its root
        /// digest and hash offset. `run` then opens every lower through dm-verity in the guest:
        /// a block that does not match its hash fails the read, and `run` names the lower.
        /// With --merge, the merged blob gets a tree too (`run --merged` checks it).
        /// `verify` recomputes the layers' trees. The tree is kept beside the blob (no second copy
        /// of it); a plain build of the same image shares the blobs; `push` appends it to
        /// each layer with the org.erofs.dmverity.* annotations.
        #[arg(long)]
        verity: bool,
        #[command(flatten)]
        registry: RegistryArgs,
        /// For a registry image: if the repository has an EROFS image `vmrootfs push` made from
        /// it with this vmrootfs's recipe (found as a referrer of its manifest), pull that
        /// instead of converting. Trusts whoever can push to the repository (see the README).
        #[arg(long)]
        use_converted: bool,
        /// Refuse a layer that unpacks to more than this (K, M, G suffixes).
        #[arg(long, value_name = "SIZE", default_value = "64G", value_parser = parse_size)]
        max_layer_size: u64,
        /// Record the registry image SOURCE (an EROFS image pushed with --verity, as for
        /// `run --lazy`) without fetching its layers: only their dm-verity trees are fetched
        /// and checked. `run TAG` then boots it lazily and stores it; `rm TAG` forgets it.
        #[arg(long, conflicts_with_all = ["squash", "merge", "verity", "use_converted"])]
        lazy: bool,
        /// Print the build result as JSON on stdout (and nothing else).
        #[arg(long)]
        json: bool,
    },
    /// Publish a stored image: as EROFS (default), or as a standard OCI image (--format oci)
    ///
    /// DEST is one of:
    ///   REF, docker://REF        a registry repository and tag: 127.0.0.1:5000/lab/app:erofs
    ///   oci:DIR[:TAG]            an OCI image layout directory (created or added to)
    ///   oci-archive:FILE[:TAG]   a tar of an OCI image layout (written whole, then renamed)
    ///
    /// Layers go out in the spelling --media-type names (default: containerd 2.1's for raw
    /// layers, containerd ≥ 2.3's with --zstd: what the most consumers read), `os.features`
    /// holds "erofs", and vmrootfs annotations say which tar layer each blob was made from,
    /// so another host's `vmrootfs build DEST` stores the blobs without converting. The bytes
    /// are reproducible: pushing twice gives the same manifest digest. An image built from a
    /// registry names its source manifest as `subject` (found through the referrers API or
    /// the `sha256-<hex>` fallback tag; see `build --use-converted`). ext4 images are refused.
    ///
    /// --format oci publishes the image as docker, podman and containerd run it: its
    /// original tar layers (a committed layer from the store, the others from the
    /// source the image was built from, read at the recorded manifest digest), its config and
    /// manifest, every byte checked against the digests the record names. To the source's own
    /// registry, layers are mounted from the source repository (no bytes move); elsewhere
    /// they are fetched and sent. Works for EROFS and ext4 images alike. An image not
    /// committed is a plain re-push of its source (the same manifest digest when the source's
    /// is an OCI manifest).
    /// Examples:
    ///   vmrootfs push busybox 127.0.0.1:5000/lab/busybox:erofs
    ///   vmrootfs push debian oci-archive:debian-erofs.tar:v1 --zstd
    ///   vmrootfs push debian 127.0.0.1:5000/lab/debian:erofs --media-type spec
    ///   vmrootfs push debian 127.0.0.1:5000/lab/debian:oci --format oci
    ///   vmrootfs push debian oci:/tmp/debian-layout:v1 --format oci
    #[command(verbatim_doc_comment)]
    Push {
        /// The stored image (its tag).
        tag: String,
        /// Where to publish it (see above).
        dest: String,
        /// What to publish: erofs (the stored EROFS blobs, EROFS image layer format) or oci
        /// (a standard OCI image with the original tar layers).
        #[arg(long, value_enum, default_value = "erofs")]
        format: vmrootfs::push::PushFormat,
        /// Compress the layers with zstd (`+zstd`; not with --media-type containerd-2.1).
        #[arg(long)]
        zstd: bool,
        /// Layer media types: spec (application/vnd.erofs[+zstd]), containerd
        /// (application/vnd.erofs.layer.v1[+zstd], containerd ≥ 2.3) or containerd-2.1
        /// (application/vnd.oci.image.layer.v1.erofs, raw only). Default: containerd-2.1, or
        /// containerd with --zstd.
        #[arg(long, value_enum)]
        media_type: Option<vmrootfs::push::MediaTypes>,
        #[command(flatten)]
        registry: RegistryArgs,
        /// Print what was pushed as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List the images in the store: tag, image digest, filesystem, layers, size, age (an
    /// image recorded by `build --lazy` and not stored yet: `lazy: not fetched`; --json lists
    /// stored images only).
    Ls {
        /// Print the image records as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Remove images by tag, then delete the layer blobs no other image uses.
    Rm {
        #[arg(required = true)]
        tags: Vec<String>,
        /// Print what was collected as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete layer blobs that no image references, and leftovers of interrupted builds.
    Gc {
        /// Print what was collected as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash the blobs of TAGs (default: all) against their records and fsck them.
    ///
    /// A lower built with --verity also has its dm-verity tree recomputed from the blob: the
    /// root digest must equal the recorded one and the stored tree the recomputed one.
    /// Exits non-zero and names each bad blob if any is missing, altered or corrupt.
    Verify {
        tags: Vec<String>,
        /// Print the bad blobs as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Boot a stored image in a throw-away QEMU microVM and run a command in it
    ///
    /// It boots the image's runtime kit (see `kit`) with the kit's own qemu.sh, adding only
    /// the ports that carry the command's output and status. The lowers are attached
    /// read-only and stacked with overlayfs under a tmpfs upper; the
    /// command (default: the image's entrypoint and cmd) runs with the image's env, working
    /// directory and user. Prints its stdout and stderr on ours and exits with its status.
    /// With --merged the image is one drive (see `build --merge`) mounted as one read-only
    /// EROFS filesystem, the one lower under the tmpfs upper. Holds the store lock while the
    /// guest runs (rm and gc wait). Lowers built with --verity are opened through dm-verity in
    /// the guest (needs dmsetup on the host): a block that does not match the recorded root
    /// digest fails the guest's read, and run then fails naming the blob. --merged of a
    /// --verity image needs `build --merge --verity` (the merged blob's tree; the merged blob
    /// and every layer then get a drive and dm-verity); --squashed of one is refused: the
    /// squashed blob has no tree, so the guest could not check it.
    ///
    /// With --upper FILE the writable layer is FILE instead of a tmpfs: an ext4 filesystem
    /// made sparse when FILE is missing (--upper-size nominal; it costs only what is written),
    /// kept after the guest ends, so the next `run --upper FILE` sees what this one wrote, and
    /// `commit --upper FILE` turns it into a new image. FILE is bound to the image it was made
    /// over (FILE.vmrootfs.json) and refused with another; it is locked while a guest uses it
    /// (a second run with it fails at once). The host never mounts it: the guest wrote it.
    ///
    /// Exit status: the command's own, or
    ///   125  run itself failed: no such image, missing tools, boot failure, timeout, a
    ///        corrupt block (dm-verity), the guest could not start the command, an upper
    ///        in use or made over another image
    ///   126  the command cannot be run (not executable, working directory missing)
    ///   127  the command is not in the image's PATH
    /// (as docker and podman do; the error on stderr says which failure it was). Examples:
    ///
    /// With --lazy, TAG is a registry reference to an EROFS image pushed uncompressed with
    /// `push --verity`: the guest boots before the layers have arrived. Its drives are served
    /// by vmrootfs over NBD (QEMU's own client, a unix socket); each 512 KiB chunk is fetched
    /// by HTTP range when first read, every 4 KiB block checked against the layer's dm-verity
    /// tree (itself checked against the manifest's root digest) and kept in the store's
    /// lazy/ cache before the guest sees it. A block that fails is never served: the guest's
    /// read fails and run fails naming the layer. The rest arrives in the background
    /// (--background-rate while the guest runs, reads first). run exits with the command's
    /// status when the command ends; a detached `vmrootfs lazy-complete` takes over the
    /// cache, fetches the rest at full speed, stores the blobs and records the image as REF,
    /// as `build REF` would (its log: lazy/complete-*.log in the store; --wait does it
    /// before exiting instead). A later run of REF boots the recorded image, waiting for the
    /// completion if one is under way; gc waits for it too. A killed run's or completer's
    /// cache is resumed by the next one (or removed by gc). Images without verity or with
    /// zstd layers are refused. A TAG recorded by `build REF --lazy` boots this way too,
    /// without --lazy, from the manifest it was recorded at.
    ///
    /// Examples:
    ///   vmrootfs run busybox -- cat /etc/motd
    ///   vmrootfs run debian --timeout 120 -- python3 -c 'print(42)'
    ///   vmrootfs run --lazy registry.lan:5000/lab/debian:v1 -- true
    ///   vmrootfs run debian --upper work.ext4 -- sh -c 'apt-get install -y jq'
    #[command(verbatim_doc_comment)]
    Run {
        /// A stored image's tag, or with --lazy a registry reference.
        tag: String,
        /// Kernel (bzImage) to boot [default: the newest /boot/vmlinuz-*].
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 512)]
        memory: u32,
        /// Seconds before the guest is killed.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Boot the squashed blob (see `build --squash`) instead of the layer stack.
        #[arg(long, conflicts_with = "merged")]
        squashed: bool,
        /// Boot the merged image (see `build --merge`) through one drive, a VMDK over the
        /// stored blobs, mounted as one EROFS filesystem: no overlayfs in the guest, and the
        /// root is read-only.
        #[arg(long)]
        merged: bool,
        /// Boot the registry image TAG without pulling it first (see above).
        #[arg(long, conflicts_with_all = ["merged", "squashed"])]
        lazy: bool,
        /// With --lazy: bandwidth background completion takes while the guest runs, per
        /// second (K, M, G; 0: no limit); reads of the guest always go first.
        #[arg(long, value_parser = parse_size, default_value = "8M", requires = "lazy")]
        background_rate: u64,
        /// With --lazy: write what was fetched when to FILE (JSON: the bytes-fetched curve).
        #[arg(long, value_name = "FILE", requires = "lazy")]
        fetch_log: Option<PathBuf>,
        /// With --lazy: fetch the rest, store and record the image before exiting, instead of
        /// leaving that to a detached completer.
        #[arg(long, requires = "lazy")]
        wait: bool,
        #[command(flatten)]
        registry: RegistryArgs,
        /// The guest's writable layer, kept between runs: an ext4 file, made when missing.
        #[arg(long, value_name = "FILE", conflicts_with = "lazy")]
        upper: Option<PathBuf>,
        /// Nominal size of an upper made now (sparse: it costs what is written).
        #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "10G", requires = "upper")]
        upper_size: u64,
        /// The command and its arguments.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Turn what a guest wrote into an upper (`run --upper FILE`) into a new image
    ///
    /// The new image is the upper's image with one more layer: the upper's changes, as an
    /// OCI layer (overlayfs whiteouts become .wh. entries, opaque directories .wh..wh..opq,
    /// everything else kept with owners, modes, xattrs, devices, hardlinks and mtimes). A
    /// short guest boot reads the upper (the host never mounts it) and lists it as a tar whose
    /// file data the host reads from the upper file where the guest says it lies; the host
    /// puts it through the same checks as any layer and stores it as a blob of the base's
    /// filesystem (with --merge and --verity as the base was built). The new config has the
    /// new DiffID and a history entry; the layer's tar (uncompressed), the config and the
    /// manifest are kept for `push` in OCI form. The upper is not changed: commit again after
    /// more runs, or `run NEW --upper OTHER` to build on the new image. Examples:
    ///   vmrootfs run debian --upper work.ext4 -- sh -c 'echo hi > /etc/motd'
    ///   vmrootfs commit --upper work.ext4 --tag debian-motd --message 'motd'
    #[command(verbatim_doc_comment)]
    Commit {
        /// The upper to commit (made by `run --upper FILE`).
        #[arg(long, value_name = "FILE")]
        upper: PathBuf,
        /// Tag of the new image.
        #[arg(long)]
        tag: String,
        /// Comment of the new history entry.
        #[arg(long, short)]
        message: Option<String>,
        /// Kernel (bzImage) to boot [default: the newest /boot/vmlinuz-*].
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 512)]
        memory: u32,
        /// Seconds before the guest is killed.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Print the new image's record (with blob paths) as JSON.
        #[arg(long)]
        json: bool,
        /// The program the guest runs as `vmrootfs guest-tar` [default: this vmrootfs]: for
        /// trying the host's checks against a hostile guest (a `#!/bin/sh` script that writes
        /// a crafted tar runs under the guest's busybox).
        #[arg(long, hide = true, value_name = "PROGRAM")]
        guest_binary: Option<PathBuf>,
    },
    /// Complete the lazy image REF after `run --lazy` (which starts this, the registry options
    /// on stdin): fetch the rest, store the blobs, record REF
    #[command(hide = true)]
    LazyComplete {
        reference: String,
        /// The tag to record it under.
        #[arg(long)]
        tag: String,
    },
    /// Write the upper directory DIR to stdout as a layer tar (commit's guest runs this)
    #[command(hide = true)]
    GuestTar {
        dir: PathBuf,
        /// Name regular files' data by where it lies on the upper drive instead of copying it
        #[arg(long)]
        extents: bool,
    },
    /// Write what a microVM runtime needs to boot a stored image into DIR
    ///
    /// DIR gets: vmlinux (the kernel, uncompressed, from the newest /boot/vmlinuz-* or
    /// --kernel), initramfs.cpio (busybox, the kernel modules the image needs with their soft
    /// dependencies, an /init that finds the drives by position without udev, opens
    /// dm-verity lowers, stacks the lowers with overlayfs or mounts the merged disk, and
    /// starts the command with the image's env, working directory and user, its output and
    /// exit status on the serial console), qemu.sh (a QEMU microvm command line),
    /// firecracker.json (`firecracker --no-api --config-file`), cloud-hypervisor.sh, and
    /// hashes.img (--verity images: the dm-verity trees) or disk.raw (--merged: the single
    /// disk, a copy). The configurations attach the stored blobs by absolute path, read-only,
    /// in the same order: the kit is valid while the image is in the store. `run` boots the
    /// same kit. Examples:
    ///   vmrootfs kit deb ./deb-kit && ./deb-kit/qemu.sh
    ///   vmrootfs kit deb ./deb-kit --merged -- python3 -c 'print(42)'
    #[command(verbatim_doc_comment)]
    Kit {
        tag: String,
        /// Directory to write the kit into (created if missing; the kit's files replaced).
        dir: PathBuf,
        /// Kernel (bzImage, or an ELF vmlinux named vmlinux-<version>) [default: the newest
        /// /boot/vmlinuz-*]; its modules come from /lib/modules/<version>.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 512)]
        memory: u32,
        /// Boot the squashed blob (see `build --squash`) instead of the layer stack.
        #[arg(long, conflicts_with = "merged")]
        squashed: bool,
        /// Boot the merged image (see `build --merge`) as one raw disk (disk.raw, a copy of
        /// the blobs); for a `--merge --verity` image, the merged blob and the layer blobs,
        /// each through dm-verity.
        #[arg(long)]
        merged: bool,
        /// Print what was written as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// The command and its arguments [default: the image's entrypoint and cmd].
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Serve a stored image's lowers as plain files on a FUSE mount, for runtimes that take paths
    ///
    /// Mounts a read-only FUSE filesystem on DIR (created if missing) whose files are the
    /// image's lowers, base first, named as the runtime kit names its drives: DIR/lower0 …
    /// DIR/lower<n-1>, each the exact size of its blob. Firecracker and Cloud Hypervisor attach
    /// them as drives; `losetup -r` makes a block device of one. The paths stay the same
    /// whatever the store's layout. With --kit KITDIR it also writes the image's runtime kit
    /// (see `kit`; layer stack form) whose configurations attach the served files.
    ///
    /// With --lazy, TAG is a registry reference to an EROFS image pushed uncompressed with
    /// `push --verity` (as for `run --lazy`): a read fetches the 512 KiB chunk that holds it
    /// by HTTP range, checks every 4 KiB block against the layer's dm-verity tree (itself
    /// checked against the manifest's root digest), caches it in the store, and only then
    /// answers; a block that fails is never served (EIO, and the layer is named on stderr).
    /// The rest arrives in the background within --background-rate. When serving stops, what
    /// is missing is fetched and the blobs are published and the image recorded under the
    /// reference, as `build REF` would (a signal then stops that; what was fetched stays
    /// cached for the next lazy read, or `gc` removes it). The kit's guest checks every lower
    /// through dm-verity too.
    ///
    /// Serves in the foreground until SIGINT or SIGTERM, then unmounts DIR. If a served file
    /// is still open then (a loop device, a running VM), DIR is detached at once and the open
    /// files are served until they are closed; a second signal ends the process at once (their
    /// readers then get errors). Prints what it serves once mounted (--json: one JSON object,
    /// then nothing more on stdout). Holds the store lock while serving (rm and gc wait).
    /// Needs root (it mounts) and /dev/fuse. Examples:
    ///   vmrootfs serve deb /run/vmrootfs/deb --kit ./deb-kit
    ///   firecracker --no-api --config-file ./deb-kit/firecracker.json
    ///   losetup -r -f --show /run/vmrootfs/deb/lower0
    ///   vmrootfs serve --lazy registry.lan:5000/lab/deb:v1 /run/vmrootfs/deb --kit ./deb-kit
    #[command(verbatim_doc_comment)]
    Serve {
        /// A stored image's tag, or with --lazy a registry reference.
        tag: String,
        /// The mount point.
        dir: PathBuf,
        /// Also write the runtime kit whose drives are the served files into this directory.
        #[arg(long, value_name = "KITDIR")]
        kit: Option<PathBuf>,
        /// Kernel for the kit (see `kit --kernel`).
        #[arg(long, requires = "kit")]
        kernel: Option<PathBuf>,
        /// Guest memory in MiB, for the kit.
        #[arg(long, default_value_t = 512, requires = "kit")]
        memory: u32,
        /// Threads answering reads (a read waiting for its bytes holds one).
        #[arg(long, default_value_t = 8)]
        threads: usize,
        /// Print what is served (and the kit) as JSON on stdout once mounted.
        #[arg(long)]
        json: bool,
        /// Serve TAG, a registry reference, lazily (see above).
        #[arg(long)]
        lazy: bool,
        /// With --lazy: bandwidth background completion takes while serving, per second (K, M,
        /// G suffixes; 0: no limit).
        #[arg(long, value_parser = parse_size, default_value = "8M", requires = "lazy")]
        background_rate: u64,
        #[command(flatten)]
        registry: RegistryArgs,
        /// The kit's command and its arguments [default: the image's entrypoint and cmd].
        #[arg(last = true, requires = "kit")]
        command: Vec<String>,
    },
    /// Write a merged image (see `build --merge`) as one disk for a runtime
    ///
    /// The disk is the merged metadata blob followed by the layer blobs, base first; the
    /// blob's device table maps each layer where it starts on it, so the guest mounts it as
    /// one EROFS filesystem (Linux ≥ 6.4: `mount -t erofs /dev/vda /mnt`). By default FILE is
    /// a VMDK descriptor whose read-only (RDONLY) flat extents point at the stored blobs
    /// (nothing copied; for runtimes that read VMDK and honour RDONLY, which QEMU does not:
    /// it reads only RW extents; valid while the image is in the store and the store does not
    /// move). With --raw FILE is one raw image, the blobs copied (for Firecracker, QEMU and
    /// runtimes that take raw files only). An existing FILE is replaced only if it is a
    /// regular file. Examples:
    ///   vmrootfs export deb --single-disk deb.vmdk
    ///   vmrootfs export deb --single-disk deb.img --raw
    #[command(verbatim_doc_comment)]
    Export {
        tag: String,
        /// Where to write the disk (replaced atomically).
        #[arg(long, value_name = "FILE", required = true)]
        single_disk: PathBuf,
        /// One raw file (a copy of every blob) instead of a VMDK descriptor.
        #[arg(long)]
        raw: bool,
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the record of a tag: its lowers (base first), filesystem and OCI config.
    Inspect {
        tag: String,
        /// Print the record as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How to reach registries.
#[derive(clap::Args)]
struct RegistryArgs {
    /// Registry credentials for every registry [default: docker's config.json, else none].
    #[arg(long, value_name = "USER:PASS")]
    creds: Option<String>,
    /// Speak plain HTTP to this registry host (localhost and 127.0.0.0/8 always are).
    #[arg(long, value_name = "HOST")]
    insecure_registry: Vec<String>,
}

impl RegistryArgs {
    fn options(self) -> anyhow::Result<vmrootfs::RegistryOptions> {
        let creds = match self.creds {
            Some(c) => {
                let (user, pass) = c.split_once(':').context("--creds takes USER:PASS")?;
                Some((user.to_string(), pass.to_string()))
            }
            None => None,
        };
        Ok(vmrootfs::RegistryOptions { creds, insecure: self.insecure_registry })
    }
}

/// `run`'s exit code for its own failures (docker's and podman's), so that they are not
/// taken for the command's status: a command exits 1 far more often than 125.
const RUN_FAILED: u8 = 125;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_run = matches!(cli.command, Command::Run { .. });
    progress::set_verbosity(if cli.quiet {
        0
    } else if cli.verbose {
        2
    } else {
        1
    });
    match run(cli) {
        Ok(Some(status)) => ExitCode::from(status.clamp(0, 255) as u8),
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            // Writes to stdout fail with a bare io::Error (print_json unwraps serde_json's): a
            // reader that went away (`ls --json | head -c1`) is success. A broken pipe deeper
            // in the chain (mkfs died) is a real failure and stays one.
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            if is_run { ExitCode::from(RUN_FAILED) } else { ExitCode::FAILURE }
        }
    }
}

/// `123`, `64K`, `512M`, `2G` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        Some('T' | 't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{s:?} is not a size like 512M or 2G"))
}

fn open_store(dir: Option<PathBuf>) -> anyhow::Result<Store> {
    let root = match dir {
        Some(d) => d,
        None => Store::default_root()?,
    };
    Store::open(&root).with_context(|| format!("opening store {}", root.display()))
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    // As io::Error (serde_json hands back the write's own error), so main sees a broken pipe.
    serde_json::to_writer_pretty(&mut out, value).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

fn print_gc(report: &vmrootfs::store::GcReport, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(report);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "removed {} layer blob(s) and {} OCI blob(s), {:.1} MiB; {} leftover(s) in tmp/; {} cache file(s) in vm/; {} unfinished lazy blob(s) in lazy/",
        report.layers,
        report.oci_blobs,
        report.bytes as f64 / (1 << 20) as f64,
        report.tmp,
        report.vm,
        report.lazy
    )?;
    Ok(())
}

/// `ls` as a table.
fn print_table(
    records: &[vmrootfs::ImageRecord],
    lazy: &[vmrootfs::store::LazyRecord],
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let now = std::time::SystemTime::now();
    writeln!(out, "{:<32} {:<19} {:<5} {:>6} {:>10}  AGE", "TAG", "IMAGE", "FS", "LAYERS", "SIZE")?;
    for r in records {
        let fs = r.lowers.first().map(|l| l.fs.to_string()).unwrap_or_default();
        let age = humantime::parse_rfc3339(&r.created_at)
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .map(|d| humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string())
            .unwrap_or_else(|| "?".into());
        let short = &r.manifest_digest.to_string()[..19.min(r.manifest_digest.to_string().len())];
        writeln!(
            out,
            "{:<32} {:<19} {:<5} {:>6} {:>7.1}MiB  {age}",
            r.tag,
            short,
            fs,
            r.lowers.len(),
            r.size as f64 / (1 << 20) as f64
        )?;
    }
    // Recorded lazily: listed until stored (a stored record of the tag comes first).
    for r in lazy.iter().filter(|l| !records.iter().any(|r| r.tag == l.tag)) {
        let short = &r.manifest_digest.to_string()[..19];
        writeln!(
            out,
            "{:<32} {:<19} {:<5} {:>6} {:>7.1}MiB  lazy: not fetched",
            r.tag,
            short,
            "erofs",
            r.layers.len(),
            r.data_bytes as f64 / (1 << 20) as f64
        )?;
    }
    Ok(())
}

/// `inspect` of an image recorded by `build --lazy`.
fn print_lazy_record(lazy: &vmrootfs::store::LazyRecord, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(lazy);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "tag:       {}", lazy.tag)?;
    writeln!(out, "recorded lazily (build --lazy): its layers are fetched when run")?;
    writeln!(out, "source:    {}", lazy.source)?;
    writeln!(out, "created:   {}", lazy.created_at)?;
    writeln!(out, "data:      {} bytes in {} layers", lazy.data_bytes, lazy.layers.len())?;
    for l in &lazy.layers {
        writeln!(out, "  {l}")?;
    }
    Ok(())
}

/// Runs a command; `Some(status)` when the process should exit with the guest's status.
fn run(cli: Cli) -> anyhow::Result<Option<i32>> {
    match cli.command {
        Command::Run {
            tag,
            kernel,
            memory,
            timeout,
            squashed,
            merged,
            lazy,
            wait,
            background_rate,
            fetch_log,
            registry,
            upper,
            upper_size,
            command,
        } => {
            let store = open_store(cli.store)?;
            let opts = vmrootfs::vm::RunOptions {
                kernel,
                memory_mb: memory,
                timeout: std::time::Duration::from_secs(timeout),
                command,
                squashed,
                merged,
                upper,
                upper_size,
            };
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            // A tag recorded lazily (build --lazy) boots lazily from its pinned source.
            let lazy_record = match store.get(&tag) {
                Err(vmrootfs::store::StoreError::Lazy(_)) => store.lazy_record(&tag)?,
                _ => None,
            };
            let status = if lazy || lazy_record.is_some() {
                use vmrootfs::vm::Completion;
                let completion = if wait {
                    Completion::Wait
                } else {
                    Completion::Detached(std::env::current_exe().context("finding this program")?)
                };
                let (reference, record_as) = match lazy_record {
                    Some(r) => (r.source, Some(tag)),
                    None => (tag, None),
                };
                let lazy = vmrootfs::vm::LazyOptions {
                    registry: registry.options()?,
                    background_rate,
                    fetch_log,
                    completion,
                    tag: record_as,
                };
                vmrootfs::vm::run_lazy(&store, &reference, &opts, &lazy, &mut out, &mut err)?
            } else {
                vmrootfs::vm::run(&store, &tag, &opts, &mut out, &mut err)?
            };
            return Ok(Some(status));
        }
        Command::Kit { tag, dir, kernel, memory, squashed, merged, json, command } => {
            use vmrootfs::vm::kit::{self, KitForm, KitOptions, MergedDisk};
            let store = open_store(cli.store)?;
            let form = if merged {
                KitForm::Merged
            } else if squashed {
                KitForm::Squashed
            } else {
                KitForm::Stack
            };
            let opts = KitOptions {
                kernel,
                memory_mb: memory,
                form,
                merged_disk: MergedDisk::Raw,
                command,
                served_lowers: None,
                upper: None,
            };
            let written = kit::write(&store, &tag, &dir, &opts)?;
            if json {
                print_json(&written)?;
            } else {
                let mut out = std::io::stdout().lock();
                let files = [Some(&written.vmlinux), Some(&written.initramfs), Some(&written.qemu)]
                    .into_iter()
                    .chain([written.firecracker.as_ref(), written.cloud_hypervisor.as_ref()]);
                for f in files.flatten() {
                    writeln!(out, "{}", f.display())?;
                }
                for d in &written.drives {
                    writeln!(out, "drive {}: {} ({})", d.name, d.path.display(), d.format.qemu_name())?;
                }
            }
        }
        Command::Serve {
            tag,
            dir,
            kit,
            kernel,
            memory,
            threads,
            json,
            lazy,
            background_rate,
            registry,
            command,
        } => {
            let lazy = match lazy {
                true => Some((registry.options()?, background_rate)),
                false => None,
            };
            let kit = kit.map(|dir| (dir, KitArgs { kernel, memory, command }));
            serve(open_store(cli.store)?, &tag, &dir, lazy, kit, threads, json)?;
        }
        Command::Build {
            source,
            tag,
            fs,
            platform,
            jobs,
            squash,
            merge,
            verity,
            registry,
            use_converted,
            max_layer_size,
            lazy,
            json,
        } => {
            let store = open_store(cli.store)?;
            if lazy {
                let platform = platform.unwrap_or_else(vmrootfs::Platform::host);
                let recorded =
                    vmrootfs::lazy::record(&store, &source, tag.as_deref(), &registry.options()?, &platform)?;
                let tag = tag.as_deref().unwrap_or(&source);
                match recorded {
                    Some(r) if json => print_json(&r)?,
                    Some(r) => println!(
                        "{} recorded lazily: {} layers, {:.1} MiB to fetch when run (from {})",
                        r.tag,
                        r.layers.len(),
                        r.data_bytes as f64 / (1 << 20) as f64,
                        r.source
                    ),
                    None if json => print_json(&store.get(tag)?)?,
                    None => println!("{tag} is stored already"),
                }
                return Ok(None);
            }
            let mut opts = BuildOptions {
                fs,
                max_layer_bytes: max_layer_size,
                squash,
                merge,
                verity,
                ..BuildOptions::default()
            };
            if let Some(p) = platform {
                opts.platform = p;
            }
            if let Some(j) = jobs {
                opts.jobs = j.max(1);
            }
            opts.registry = registry.options()?;
            opts.use_converted = use_converted;
            let builder = Builder::new(store, opts)?;
            let reporter = Reporter::new();
            let result = builder.build(&source, tag.as_deref(), &reporter)?;
            if json {
                print_json(&result)?;
            } else {
                let r = &result.record;
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "{} ({}, {} layers, {:.1} MiB{})",
                    r.tag,
                    fs,
                    r.lowers.len(),
                    r.size as f64 / (1 << 20) as f64,
                    if result.cached { ", cached" } else { "" }
                )?;
                for (i, l) in r.lowers.iter().enumerate() {
                    writeln!(out, "  {i}: {}", l.path.display())?;
                    if let Some(v) = &l.verity {
                        writeln!(out, "     verity root {} at {}", v.root_digest, v.hash_offset)?;
                    }
                }
                if let Some(s) = &r.squashed {
                    writeln!(out, "  squashed: {}", s.path.display())?;
                }
                if let Some(m) = &r.merged {
                    writeln!(out, "  merged: {} ({:.1} KiB)", m.path.display(), m.size as f64 / 1024.0)?;
                }
            }
        }
        Command::Push { tag, dest, format, zstd, media_type, registry, json } => {
            let store = open_store(cli.store)?;
            let opts = vmrootfs::push::PushOptions {
                format,
                zstd,
                media_types: media_type,
                registry: registry.options()?,
            };
            let pushed = vmrootfs::push::push(&store, &tag, &dest, &opts)?;
            if json {
                print_json(&pushed)?;
            } else {
                let sent = pushed.layers.iter().filter(|l| !l.existed && !l.mounted).count();
                let mounted = pushed.layers.iter().filter(|l| l.mounted).count();
                writeln!(
                    std::io::stdout().lock(),
                    "{dest}: {} ({} layers, {sent} sent, {mounted} mounted)",
                    pushed.manifest_digest,
                    pushed.layers.len()
                )?;
            }
        }
        Command::Ls { json } => {
            let store = open_store(cli.store)?;
            let records = store.list()?;
            if json {
                print_json(&records)?;
            } else {
                print_table(&records, &store.lazy_records()?)?;
            }
        }
        Command::Rm { tags, json } => {
            let report = open_store(cli.store)?.remove(&tags)?;
            print_gc(&report, json)?;
        }
        Command::Gc { json } => {
            let report = open_store(cli.store)?.gc()?;
            print_gc(&report, json)?;
        }
        Command::Commit { upper, tag, message, kernel, memory, timeout, json, guest_binary } => {
            let store = open_store(cli.store)?;
            let opts = vmrootfs::commit::CommitOptions {
                tag,
                message,
                kernel,
                memory_mb: memory,
                timeout: std::time::Duration::from_secs(timeout),
                guest_binary: match guest_binary {
                    Some(p) => p,
                    None => std::env::current_exe().context("finding the vmrootfs binary for the guest")?,
                },
                max_layer_bytes: vmrootfs::BuildOptions::default().max_layer_bytes,
            };
            let reporter = vmrootfs::progress::Reporter::new();
            let result = vmrootfs::commit::commit(&store, &upper, &opts, &reporter)?;
            if json {
                print_json(&result)?;
            } else {
                let r = &result.record;
                println!("{} {} ({} layers)", r.tag, r.manifest_digest, r.lowers.len());
            }
        }
        Command::LazyComplete { reference, tag } => {
            let store = open_store(cli.store)?;
            let reporter = vmrootfs::progress::Reporter::new();
            vmrootfs::lazy::completer::run(&store, &reference, &tag, std::io::stdin().lock(), &reporter)?;
        }
        Command::GuestTar { dir, extents } => {
            let out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
            vmrootfs::upper::guest_tar::write_upper(&dir, out, extents)?;
        }
        Command::Verify { tags, json } => {
            let bad = open_store(cli.store)?.verify(&tags)?;
            if json {
                print_json(&bad)?;
            }
            for b in &bad {
                eprintln!("bad blob {} ({}): {}", b.path.display(), b.tags.join(", "), b.problem);
                eprintln!("  to repair: {}", b.repair);
            }
            if !bad.is_empty() {
                anyhow::bail!("{} bad blob(s)", bad.len());
            }
            progress::info("all blobs match their records and pass fsck");
        }
        Command::Export { tag, single_disk, raw, json } => {
            use vmrootfs::export::{self, DiskFormat};
            let store = open_store(cli.store)?;
            let format = if raw { DiskFormat::Raw } else { DiskFormat::Vmdk };
            let done = export::export(&store, &tag, &single_disk, format)?;
            if json {
                print_json(&done)?;
            } else {
                writeln!(
                    std::io::stdout().lock(),
                    "{} ({}, a disk of {:.1} MiB)",
                    done.path.display(),
                    if raw { "raw" } else { "VMDK descriptor over the stored blobs" },
                    done.disk_bytes as f64 / (1 << 20) as f64
                )?;
            }
        }
        Command::Inspect { tag, json } => {
            let store = open_store(cli.store)?;
            let record = match store.get(&tag) {
                Err(vmrootfs::store::StoreError::Lazy(_)) => {
                    let lazy = store.lazy_record(&tag)?.context("the lazy record went meanwhile")?;
                    return print_lazy_record(&lazy, json).map(|()| None);
                }
                record => store.locate(record?)?,
            };
            if json {
                print_json(&record)?;
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(out, "tag:       {}", record.tag)?;
                writeln!(out, "source:    {}", record.source)?;
                writeln!(out, "manifest:  {}", record.manifest_digest)?;
                writeln!(out, "platform:  {}", record.platform)?;
                writeln!(out, "created:   {}", record.created_at)?;
                writeln!(out, "size:      {} bytes", record.size)?;
                writeln!(out, "lowers (base first):")?;
                for l in &record.lowers {
                    writeln!(out, "  {} {} {}", l.fs, l.chain_id, l.path.display())?;
                    if let Some(v) = &l.verity {
                        writeln!(
                            out,
                            "    dm-verity: root {} hash_offset {} salt {} tree {}",
                            v.root_digest,
                            v.hash_offset,
                            v.salt,
                            l.verity_tree.as_deref().unwrap_or(std::path::Path::new("?")).display()
                        )?;
                    }
                }
                if let Some(s) = &record.squashed {
                    writeln!(out, "squashed:  {} {}", s.fs, s.path.display())?;
                }
                if let Some(m) = &record.merged {
                    writeln!(out, "merged:    {} {}", m.fs, m.path.display())?;
                }
                writeln!(out, "entrypoint: {:?}  cmd: {:?}", record.config.entrypoint, record.config.cmd)?;
            }
        }
    }
    Ok(None)
}

/// `serve --kit`'s kit settings.
struct KitArgs {
    kernel: Option<PathBuf>,
    memory: u32,
    command: Vec<String>,
}

/// What `serve --json` prints once mounted.
#[derive(serde::Serialize)]
struct ServeReport<'a> {
    #[serde(flatten)]
    served: &'a vmrootfs::serve::Served,
    #[serde(skip_serializing_if = "Option::is_none")]
    kit: Option<vmrootfs::vm::kit::Kit>,
}

/// `vmrootfs serve`: mounts (a stored image, or with `lazy` a registry image read lazily),
/// writes the kit, prints, serves until SIGINT or SIGTERM, unmounts; completes a lazy image.
fn serve(
    store: Store,
    tag: &str,
    dir: &std::path::Path,
    lazy: Option<(vmrootfs::RegistryOptions, u64)>,
    kit: Option<(PathBuf, KitArgs)>,
    threads: usize,
    json: bool,
) -> anyhow::Result<()> {
    use vmrootfs::serve::{self, ServeOptions, StopSignals, Unmounted};
    use vmrootfs::vm::kit::{KitForm, KitOptions, MergedDisk};
    // Before the workers start: they inherit the mask, so the signals come to `wait` alone.
    let signals = StopSignals::block().context("blocking SIGINT and SIGTERM")?;
    let opts = ServeOptions { threads };
    let mut server = match &lazy {
        None => serve::serve(&store, tag, dir, &opts)?,
        Some((registry, rate)) => {
            serve::serve_lazy(&store, tag, dir, &opts, registry, vmrootfs::lazy::Share::new(*rate))?
        }
    };
    let served = server.served().clone();
    let kit = match kit {
        Some((kit_dir, args)) => {
            let opts = KitOptions {
                kernel: args.kernel,
                memory_mb: args.memory,
                form: KitForm::Stack,
                merged_disk: MergedDisk::Raw,
                command: args.command,
                served_lowers: None,
                upper: None,
            };
            Some(server.write_kit(&store, &kit_dir, &opts)?)
        }
        None => None,
    };
    if json {
        print_json(&ServeReport { served: &served, kit: kit.clone() })?;
    } else {
        let mut out = std::io::stdout().lock();
        for l in &served.lowers {
            let from = match (&l.blob, &l.layer) {
                (Some(blob), _) => blob.display().to_string(),
                (None, Some(layer)) => format!("registry layer {layer}, lazily"),
                (None, None) => String::new(),
            };
            writeln!(out, "{} ({} bytes, {}) serves {from}", l.path.display(), l.size, l.fs)?;
        }
        if let Some(k) = &kit {
            writeln!(
                out,
                "kit: {} (drives: the served files)",
                k.qemu.parent().unwrap_or(&k.qemu).display()
            )?;
        }
    }
    std::io::stdout().flush()?;
    progress::info(&format!("serving {tag} on {} until SIGINT or SIGTERM", served.dir.display()));
    signals.wait(None);
    match server.stop()? {
        Unmounted::Clean => progress::info(&format!("unmounted {}", served.dir.display())),
        Unmounted::Detached => {
            progress::info(&format!(
                "{} detached; a served file is still open (a loop device, a VM): serving it until it is closed (signal again to stop now)",
                served.dir.display()
            ));
            while !server.finished() {
                if signals.wait(Some(std::time::Duration::from_millis(200))).is_some() {
                    anyhow::bail!(
                        "stopped while a file of {} was still open: its reader now gets errors",
                        served.dir.display()
                    );
                }
            }
            progress::info("the last served file was closed");
        }
    }
    if lazy.is_some() {
        progress::info(&format!("fetching the rest of {tag} and storing it (a signal stops this)"));
        let completing = std::thread::spawn(move || server.complete(&store));
        while !completing.is_finished() {
            if signals.wait(Some(std::time::Duration::from_millis(200))).is_some() {
                anyhow::bail!(
                    "stopped before {tag} was complete: what was fetched stays cached for its next lazy read (`gc` removes it)"
                );
            }
        }
        let built = completing.join().expect("completion does not panic")?;
        if let Some(built) = built {
            progress::info(&format!("{tag}: stored ({} layers)", built.record.lowers.len()));
        }
    }
    Ok(())
}

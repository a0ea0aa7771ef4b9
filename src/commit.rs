//! `vmrootfs commit --upper FILE --tag NEW`: the changes an upper holds ([`crate::upper`]) as
//! a new layer over the image it was made over, and a new image record.
//!
//! 1. A short guest boot reads the upper: the host never mounts it (a guest wrote it). The
//!    guest's initramfs holds the host's own vmrootfs (symbols stripped) and runs
//!    `vmrootfs guest-tar` ([`crate::upper::guest_tar`]) over the upper's `upper/`, the drive
//!    attached read-only; its tar comes out on the stdout port, the status on its own port.
//!    vmrootfs rather than busybox `tar`: busybox drops xattrs and knows no whiteouts.
//!    File data is not copied through the emulated guest but named: the guest lists where
//!    each file's bytes lie on the upper drive ([`crate::upper::extent_tar`]).
//! 2. On the host that listing becomes the layer's tar, each named range read from the upper
//!    file (checked to lie in it), hashed on the way (its DiffID). The layer is kept
//!    uncompressed (`application/vnd.oci.image.layer.v1.tar`, which every runtime takes):
//!    commit does no compression work (gzip cost a second on 100 MB of random bytes and saved
//!    nothing), and the blob's digest is its DiffID.
//! 3. A new image is built like any other ([`crate::Builder`]) from a source made here: the
//!    base image's manifest and config with the new layer appended (a new `rootfs.diff_ids`
//!    entry and a history entry), its layers already stored, the new one read from the
//!    tar through the same digest checks, normalizer and safety checks as any
//!    layer, into a blob of the base's filesystem (`--merge` and `--verity` as the base was
//!    built). The tar (moved, not copied) and the new config and manifest are kept in the
//!    store's OCI area ([`crate::Store::put_oci_blob`]) for the push in OCI form; the
//!    record's `source` stays the base's, where the base layers' tars are.
//!
//! A committed image is an image like any other: `run --upper` over it and `commit` again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_spec::image::{Digest, ImageConfiguration};

use crate::builder::{BuildError, BuildOptions, Builder};
use crate::platform::Platform;
use crate::progress::Reporter;
use crate::record::{BuildResult, ImageRecord};
use crate::source::{ImageSource, LayerRef, ResolvedImage, SourceError};
use crate::store::{Store, StoreError};
use crate::upper::extent_tar::{Capped, ResolveError};
use crate::upper::{Upper, UpperError};
use crate::vm::VmError;
use crate::vm::kit::{self, KitForm, KitOptions, MergedDisk};

/// Why [`commit`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// The upper cannot be used.
    #[error(transparent)]
    Upper(#[from] Box<UpperError>),
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The guest that reads the upper could not be made or booted.
    #[error(transparent)]
    Vm(#[from] Box<VmError>),
    /// The guest could not write the upper out as a tar.
    #[error("the guest could not read the upper {upper} (its error is above){}", status.map(|s| format!(": guest-tar exited {s}")).unwrap_or_default())]
    GuestTar {
        /// The upper.
        upper: PathBuf,
        /// guest-tar's exit status; none if `/init` failed before it ran.
        status: Option<i32>,
    },
    /// The guest's stream names data the host does not take (see [`crate::upper::extent_tar`]).
    #[error("the guest's listing of the upper {upper}")]
    Resolve {
        /// The upper.
        upper: PathBuf,
        /// What is wrong with it.
        #[source]
        source: crate::upper::extent_tar::ResolveError,
    },
    /// Writing the layer's tar failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The base image's manifest or config is not in the store.
    #[error(
        "the store does not keep the {what} {digest} of {tag} (built from {built_from}): commit needs it to write the new image's; rebuild {tag} from an OCI layout, archive or registry"
    )]
    NoBaseJson {
        /// `manifest` or `config`.
        what: &'static str,
        /// Its digest.
        digest: Digest,
        /// The base's tag.
        tag: String,
        /// The base's source.
        built_from: String,
    },
    /// The base image's manifest or config is not the JSON commit extends.
    #[error("the {what} {digest} of {tag}: {why}")]
    BadBaseJson {
        /// `manifest` or `config`.
        what: &'static str,
        /// Its digest.
        digest: Digest,
        /// The base's tag.
        tag: String,
        /// Why.
        why: String,
    },
    /// Building the new image from the committed layer failed (the layer's checks among it).
    #[error("recording the committed layer")]
    Build(#[from] BuildError),
}

/// Options of [`commit`].
#[derive(Debug, Clone)]
pub struct CommitOptions {
    /// The new image's tag.
    pub tag: String,
    /// The history entry's comment.
    pub message: Option<String>,
    /// bzImage to boot [default: the newest /boot/vmlinuz-*].
    pub kernel: Option<PathBuf>,
    /// Guest memory in MiB.
    pub memory_mb: u32,
    /// Longest the guest may take.
    pub timeout: Duration,
    /// The vmrootfs binary the guest runs (`guest-tar`): the running one.
    pub guest_binary: PathBuf,
    /// Most bytes the layer may unpack to.
    pub max_layer_bytes: u64,
}

/// The committed layer's tar (staged, then in the store's OCI area) and its digest: the blob
/// is the tar itself, uncompressed, so its digest is its DiffID.
struct CommittedTar {
    path: PathBuf,
    /// sha256 of the tar.
    diff_id: Digest,
    /// Bytes of the tar.
    size: u64,
}

/// Commits the upper at `upper` as a new layer over its image; records the new image as
/// `opts.tag`.
pub fn commit(
    store: &Store,
    upper: &Path,
    opts: &CommitOptions,
    reporter: &Reporter,
) -> Result<BuildResult, CommitError> {
    store.require_writable()?;
    store.check_tag(&opts.tag)?;
    let upper = Upper::open(upper).map_err(Box::new)?;
    // Shared store lock from reading the base's record to writing the new one.
    let _store_lock = store.lock_shared()?;
    let base_tag = upper.binding().tag.clone();
    let base = match store.get(&base_tag) {
        Ok(r) => Some(r),
        Err(StoreError::NoSuchTag(_)) => None,
        Err(e) => return Err(e.into()),
    };
    upper.check_base(base.as_ref()).map_err(Box::new)?;
    let base = base.expect("check_base refuses a missing base");
    let staging = store.staging("commit-")?;
    let mut tar = read_upper(store, &upper, &base, staging.path(), opts)?;
    // Kept before the record that names it is written, under the store lock (gc waits).
    store.adopt_oci_file(&tar.path, &tar.diff_id, tar.size)?;
    tar.path = store.oci_blob_path(&tar.diff_id)?;
    reporter.line(&format!(
        "{}: the upper's changes are a layer of {} bytes, DiffID {}",
        upper.path().display(),
        tar.size,
        tar.diff_id
    ));
    let source = CommitSource::new(store, &base, &tar, opts)?;
    let build_opts = BuildOptions {
        fs: base.lowers.first().map_or(crate::backend::FsType::Erofs, |l| l.fs),
        platform: Platform::host(),
        jobs: 1,
        max_layer_bytes: opts.max_layer_bytes,
        squash: false,
        merge: base.merged.is_some(),
        verity: base.lowers.iter().any(|l| l.verity.is_some()),
        registry: Default::default(),
        use_converted: false,
    };
    keep_oci_json(store, &source)?;
    let builder = Builder::new(store.clone(), build_opts)?;
    // The store lock taken above is shared: the build's own shared lock does not wait for it.
    let spec = format!("commit of {}", upper.path().display());
    Ok(builder.build_from(&source, &spec, Some(&opts.tag), reporter)?)
}

/// Boots the commit guest over the upper and makes what it lists the layer's tar in
/// `staging`, hashing it on the way.
fn read_upper(
    store: &Store,
    upper: &Upper,
    base: &ImageRecord,
    staging: &Path,
    opts: &CommitOptions,
) -> Result<CommittedTar, CommitError> {
    let kit_opts = KitOptions {
        kernel: opts.kernel.clone(),
        memory_mb: opts.memory_mb,
        form: KitForm::Commit,
        merged_disk: MergedDisk::Raw,
        command: Vec::new(),
        served_lowers: None,
        upper: None,
    };
    let kit_dir = staging.join("kit");
    let kit = kit::write_commit(store, &base.tag, upper.path(), &opts.guest_binary, &kit_dir, &kit_opts)
        .map_err(Box::new)?;
    // The guest's stream is small: file data comes as extents of the upper (see
    // `upper::extent_tar`), read from the upper file once the guest is gone.
    let guest_path = staging.join("guest.tar");
    let guest_io = |source| CommitError::Io { path: guest_path.clone(), source };
    // As big as the layer may be at most (files ext4 keeps inline come in band).
    let file = fs_err::File::create(&guest_path).map_err(guest_io)?.into_parts().0;
    let mut guest_tar = Capped::new(std::io::BufWriter::new(file), opts.max_layer_bytes);
    let started = std::time::Instant::now();
    // The guest's stderr (guest-tar's and /init's complaints) is shown as it comes.
    let (status, _) = crate::vm::boot(&kit, &kit_dir, opts.timeout, &mut guest_tar, &mut std::io::stderr())
        .map_err(Box::new)?;
    if status.code != Some(0) {
        return Err(CommitError::GuestTar { upper: upper.path().to_owned(), status: status.code });
    }
    if guest_tar.exceeded() {
        let source = ResolveError::TooBig { max: opts.max_layer_bytes };
        return Err(CommitError::Resolve { upper: upper.path().to_owned(), source });
    }
    guest_tar.flush().map_err(guest_io)?;
    crate::progress::debug(&format!(
        "the guest booted and listed the upper in {:.2}s",
        started.elapsed().as_secs_f64()
    ));
    let started = std::time::Instant::now();
    let path = staging.join("layer.tar");
    let io = |source| CommitError::Io { path: path.clone(), source };
    let file = fs_err::File::create(&path).map_err(io)?.into_parts().0;
    let mut tar = crate::digest::HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, file));
    let listing =
        std::io::BufReader::with_capacity(1 << 20, fs_err::File::open(&guest_path).map_err(guest_io)?);
    crate::upper::extent_tar::resolve(listing, upper.file(), &mut tar, opts.max_layer_bytes)
        .map_err(|e| CommitError::Resolve { upper: upper.path().to_owned(), source: e })?;
    let (diff_id, size, file) = tar.finish();
    file.into_inner().map_err(|e| io(e.into_error()))?;
    crate::progress::debug(&format!(
        "the layer's tar ({size} bytes) written in {:.2}s",
        started.elapsed().as_secs_f64()
    ));
    Ok(CommittedTar { path, diff_id, size })
}

/// Keeps the new image's config and manifest in the store's OCI area, beside the committed
/// layer: what `push` in OCI form publishes. Kept before the record that names them is
/// written, under the store lock (gc waits).
fn keep_oci_json(store: &Store, source: &CommitSource) -> Result<(), CommitError> {
    store.put_oci_bytes(&source.image.config_bytes, Some(&source.image.config_digest))?;
    if let Some(manifest) = &source.image.manifest_bytes {
        store.put_oci_bytes(manifest, Some(&source.image.manifest_digest))?;
    }
    Ok(())
}

/// The new image as a source: the base's manifest and config with the committed layer
/// appended. Only the committed layer is ever opened: the base's are stored.
struct CommitSource {
    /// The base's source: where the base layers' tars are (`push` in OCI form reads them there).
    base_source: String,
    image: ResolvedImage,
    tar: PathBuf,
}

/// Media types of the committed layer (an uncompressed tar) and of the new config, as the
/// base manifest's kind has them.
fn media_types(manifest_media_type: Option<&str>) -> (&'static str, &'static str) {
    match manifest_media_type {
        Some("application/vnd.docker.distribution.manifest.v2+json") => {
            ("application/vnd.docker.image.rootfs.diff.tar", "application/vnd.docker.container.image.v1+json")
        }
        _ => ("application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.config.v1+json"),
    }
}

impl CommitSource {
    fn new(
        store: &Store,
        base: &ImageRecord,
        tar: &CommittedTar,
        opts: &CommitOptions,
    ) -> Result<CommitSource, CommitError> {
        let json = |what: &'static str, digest: &Digest| -> Result<serde_json::Value, CommitError> {
            let bytes = store.source_json(digest)?.ok_or_else(|| CommitError::NoBaseJson {
                what,
                digest: digest.clone(),
                tag: base.tag.clone(),
                built_from: base.source.clone(),
            })?;
            serde_json::from_slice(&bytes).map_err(|e| CommitError::BadBaseJson {
                what,
                digest: digest.clone(),
                tag: base.tag.clone(),
                why: e.to_string(),
            })
        };
        let bad = |what: &'static str, digest: &Digest, why: &str| CommitError::BadBaseJson {
            what,
            digest: digest.clone(),
            tag: base.tag.clone(),
            why: why.to_string(),
        };
        let mut manifest = json("manifest", &base.manifest_digest)?;
        let mut config = json("config", &base.config_digest)?;
        let (layer_type, config_type) = media_types(manifest.get("mediaType").and_then(|m| m.as_str()));
        // The config: the new DiffID appended, and a history entry saying where it came from.
        config
            .pointer_mut("/rootfs/diff_ids")
            .and_then(|d| d.as_array_mut())
            .ok_or_else(|| bad("config", &base.config_digest, "no rootfs.diff_ids array"))?
            .push(tar.diff_id.to_string().into());
        let created = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let mut entry = serde_json::json!({ "created": created, "created_by": "vmrootfs commit" });
        if let Some(m) = &opts.message {
            entry["comment"] = m.clone().into();
        }
        let history =
            config.as_object_mut().ok_or_else(|| bad("config", &base.config_digest, "not an object"))?;
        match history.entry("history").or_insert_with(|| serde_json::json!([])).as_array_mut() {
            Some(h) => h.push(entry),
            None => return Err(bad("config", &base.config_digest, "history is not an array")),
        }
        let config_bytes = serde_json::to_vec(&config).expect("a JSON value serializes");
        let config_digest = crate::digest::sha256_of(&config_bytes);
        let parsed: ImageConfiguration = serde_json::from_slice(&config_bytes)
            .map_err(|e| bad("config", &base.config_digest, &e.to_string()))?;
        // The manifest: the new config, the base's layers and the committed one.
        manifest["config"] = serde_json::json!({
            "mediaType": config_type, "digest": config_digest.to_string(), "size": config_bytes.len(),
        });
        let new_layer = serde_json::json!({
            "mediaType": layer_type, "digest": tar.diff_id.to_string(), "size": tar.size,
        });
        let layers = manifest
            .get_mut("layers")
            .and_then(|l| l.as_array_mut())
            .ok_or_else(|| bad("manifest", &base.manifest_digest, "no layers array"))?;
        // The base's layers as its manifest describes them (stored: never read here).
        let not_the_records = || bad("manifest", &base.manifest_digest, "its layers are not the record's");
        if layers.len() != base.lowers.len() {
            return Err(not_the_records());
        }
        let described = |l: &serde_json::Value, lower: &crate::record::Lower| {
            let media_type = l.get("mediaType")?.as_str()?.to_string();
            let digest: Digest = l.get("digest")?.as_str()?.parse().ok()?;
            let size = l.get("size")?.as_u64()?;
            (digest == lower.digest).then(|| LayerRef::described(media_type, digest, size))
        };
        let mut refs = layers
            .iter()
            .zip(&base.lowers)
            .map(|(l, lower)| described(l, lower))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(not_the_records)?;
        refs.push(LayerRef::described(layer_type.to_string(), tar.diff_id.clone(), tar.size));
        layers.push(new_layer);
        let manifest_bytes = serde_json::to_vec(&manifest).expect("a JSON value serializes");
        let manifest_digest = crate::digest::sha256_of(&manifest_bytes);
        let mut diff_ids: Vec<Digest> = base.lowers.iter().map(|l| l.diff_id.clone()).collect();
        diff_ids.push(tar.diff_id.clone());
        let image = ResolvedImage {
            manifest_digest,
            config_digest,
            config: parsed,
            platform: base.platform.clone(),
            layers: refs,
            diff_ids,
            manifest_bytes: Some(manifest_bytes),
            config_bytes,
            erofs: None,
        };
        Ok(CommitSource { base_source: base.source.clone(), image, tar: tar.path.clone() })
    }
}

impl ImageSource for CommitSource {
    fn describe(&self) -> String {
        self.base_source.clone()
    }

    fn resolve(&self, _platform: &Platform) -> Result<ResolvedImage, SourceError> {
        Ok(self.image.clone())
    }

    fn open_layer(&self, layer: &LayerRef) -> Result<Box<dyn std::io::Read + Send + '_>, SourceError> {
        let committed = self.image.layers.last().expect("the committed layer is last");
        if layer.digest != committed.digest {
            // The base's layers are stored (the build reuses them): only the committed one is read.
            let why = std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "commit's source serves only the new layer",
            );
            return Err(SourceError::Read {
                what: format!("layer {} of the base image", layer.digest),
                source: why,
            });
        }
        let file = fs_err::File::open(&self.tar)
            .map_err(|source| SourceError::Read { what: self.tar.display().to_string(), source })?;
        Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, file)))
    }
}

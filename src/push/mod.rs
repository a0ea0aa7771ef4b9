//! `push TAG DEST`: publishes a stored EROFS image in the EROFS image layer format
//! (`application/vnd.erofs` and its spellings, [`MediaTypes`]) — to a registry, an OCI layout directory or an OCI archive — so
//! that other hosts pull ready-to-attach blobs instead of converting.
//!
//! The bytes are deterministic: the config is the source's own with `rootfs.diff_ids` of the
//! EROFS layers and `erofs` in `os.features` (kept key order, no timestamps), the layer
//! descriptors carry only content-derived annotations, and `--zstd` compresses at a fixed
//! level, so pushing twice gives the same manifest digest. When the source came from a
//! registry, the manifest's `subject` names the source manifest, so the converted image can be
//! found from it (the referrers API, or the fallback tag `sha256-<hex>` on registries without
//! it).

mod layout;
mod oci_form;
mod registry;

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;
use serde::Serialize;

use crate::backend::FsType;
use crate::digest;
use crate::erofs_image::{self, ProducedLayer};
use crate::record::ImageRecord;
use crate::source::RegistryOptions;
use crate::store::{Store, StoreError};

pub use crate::erofs_image::MediaTypes;

pub(crate) const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// zstd level of `--zstd` layers: fixed, so the bytes are reproducible.
const ZSTD_LEVEL: i32 = 3;

/// Why [`push`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An image of blobs other than EROFS.
    #[error(
        "{tag} is an {fs} image: only EROFS images can be pushed (the EROFS image layer format carries EROFS layers only); build it with --fs erofs"
    )]
    NotErofs {
        /// The image's tag.
        tag: String,
        /// Its filesystem.
        fs: FsType,
    },
    /// The store has no copy of the source image's config.
    #[error(
        "the store has no copy of {tag}'s source config {digest} (it was built by an older vmrootfs); build it again to push it"
    )]
    NoSourceConfig {
        /// The image's tag.
        tag: String,
        /// The source config's digest.
        digest: Digest,
    },
    /// The source image's config is not a JSON object.
    #[error("the source config of {tag} is not a JSON object")]
    BadSourceConfig {
        /// The image's tag.
        tag: String,
    },
    /// A destination that is not `REGISTRY/REPO[:TAG]`, `oci:DIR[:TAG]` or `oci-archive:FILE[:TAG]`.
    #[error("bad destination {0:?}: expected REGISTRY/REPO[:TAG], oci:DIR[:TAG] or oci-archive:FILE[:TAG]")]
    BadDestination(String),
    /// `zstd` with containerd 2.1's spelling, which has no compressed form.
    #[error(
        "--zstd with --media-type containerd-2.1: containerd 2.1's spelling has no compressed form (containerd 2.1 reads raw EROFS layers only); push raw layers, or --zstd with --media-type containerd or spec"
    )]
    CompressedContainerd21,
    /// A stored blob is not the bytes its record names.
    #[error(transparent)]
    StoredBlobChanged(Box<ChangedBlob>),
    /// Reading or writing a file failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The registry refused the push.
    #[error("pushing to {destination}: {detail}")]
    Registry {
        /// The destination as given.
        destination: String,
        /// What the registry said.
        detail: String,
    },
    /// A request to the registry failed.
    #[error("pushing to {destination}: {what}")]
    Http {
        /// The destination as given.
        destination: String,
        /// The request that failed.
        what: String,
        /// What went wrong.
        #[source]
        source: crate::source::http::HttpError,
    },
    /// The destination registry's credentials could not be read.
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    /// Opening the source the image was built from, or reading its manifest or config, failed,
    /// or its config is not the one the record names (`--format oci`).
    #[error("reading {source_name}")]
    Origin {
        /// The source, as read (a registry source pinned to the record's manifest).
        source_name: String,
        /// What went wrong.
        #[source]
        source: Box<crate::source::SourceError>,
    },
    /// Fetching a layer from the source failed, or it served other bytes than the record
    /// names (`--format oci`): nothing was pushed as complete.
    #[error("fetching layer {digest} from {source_name} (nothing was pushed as complete)")]
    OriginLayer {
        /// The source.
        source_name: String,
        /// The layer.
        digest: Digest,
        /// What went wrong.
        #[source]
        source: Box<crate::source::SourceError>,
    },
    /// The source served a layer of another size than its descriptor's (`--format oci`).
    #[error(
        "{source_name} served layer {digest} as {size} bytes, its descriptor says {expected}: nothing pushed as complete"
    )]
    OriginSize {
        /// The source.
        source_name: String,
        /// The layer.
        digest: Digest,
        /// Bytes served.
        size: u64,
        /// Bytes its descriptor gives.
        expected: u64,
    },
    /// The source no longer has what the record names (`--format oci`).
    #[error(
        "{source_name} has no {what} any more, and the store has no copy: the image cannot be pushed in OCI form"
    )]
    OriginLacks {
        /// The source.
        source_name: String,
        /// What is missing.
        what: String,
    },
    /// A layer that is not a tar layer (`--format oci`).
    #[error(
        "{tag}'s layer {digest} is {media_type:?}, not a tar layer: only images built from tar layers can be pushed in OCI form"
    )]
    NotTarLayer {
        /// The image's tag.
        tag: String,
        /// The layer's digest.
        digest: Digest,
        /// Its media type.
        media_type: String,
    },
    /// A record whose platform does not parse.
    #[error("{tag}'s record gives the platform {platform:?}, which is not os/arch[/variant]")]
    BadRecordPlatform {
        /// The image's tag.
        tag: String,
        /// The platform it gives.
        platform: String,
    },
    /// A kept config or manifest is not the bytes its digest names.
    #[error(transparent)]
    Mismatch(#[from] digest::DigestMismatch),
    /// Options that do not go with `--format oci`.
    #[error(
        "--zstd and --media-type choose how EROFS layers are pushed; --format oci pushes the original tar layers"
    )]
    ErofsOptionWithOci,
}

/// A stored blob whose bytes are not those its record names (found while pushing it).
#[derive(Debug, thiserror::Error)]
#[error(
    "stored blob {} is not what its record says ({found}, {found_size} bytes; the record says {expected}, {expected_size} bytes): nothing pushed under that name; `vmrootfs verify` checks the store",
    .path.display()
)]
pub struct ChangedBlob {
    /// The stored blob.
    pub path: PathBuf,
    /// The digest its record gives.
    pub expected: Digest,
    /// The size its record gives.
    pub expected_size: u64,
    /// The digest of its bytes.
    pub found: Digest,
    /// Its size in bytes.
    pub found_size: u64,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> PushError + '_ {
    move |source| PushError::Io { path: path.to_owned(), source }
}

/// What a push publishes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PushFormat {
    /// The EROFS image layer format: the stored EROFS blobs.
    #[default]
    Erofs,
    /// A standard OCI image with the original tar layers (docker, podman, containerd run it).
    Oci,
}

/// How to push.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// What to publish.
    pub format: PushFormat,
    /// Publish zstd-compressed layers (`+zstd`) rather than raw ones.
    pub zstd: bool,
    /// The layer media-type spelling; `None`: [`MediaTypes::default_for`].
    pub media_types: Option<MediaTypes>,
    /// Credentials and plain-HTTP hosts for a registry destination.
    pub registry: RegistryOptions,
}

/// Where a push goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Destination {
    Registry(String),
    Layout { dir: PathBuf, tag: String },
    Archive { file: PathBuf, tag: String },
}

impl Destination {
    pub fn parse(spec: &str) -> Result<Destination, PushError> {
        let split = |rest: &str| -> (PathBuf, String) {
            match rest.rsplit_once(':') {
                Some((path, tag)) if !path.is_empty() && is_tag(tag) => (path.into(), tag.to_string()),
                _ => (rest.into(), "latest".to_string()),
            }
        };
        if let Some(rest) = spec.strip_prefix("oci:") {
            let (dir, tag) = split(rest);
            return Ok(Destination::Layout { dir, tag });
        }
        if let Some(rest) = spec.strip_prefix("oci-archive:") {
            let (file, tag) = split(rest);
            return Ok(Destination::Archive { file, tag });
        }
        let reference = spec.strip_prefix("docker://").unwrap_or(spec);
        if reference.is_empty() || reference.contains(char::is_whitespace) {
            return Err(PushError::BadDestination(spec.to_string()));
        }
        Ok(Destination::Registry(reference.to_string()))
    }
}

/// An OCI tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn is_tag(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// One blob to publish: its descriptor and the files whose bytes, one after another, it is
/// (a stored blob, then its dm-verity tree if it has one; or a compressed copy; or, once
/// fetched, a layer of the source).
#[derive(Debug, Clone)]
pub(crate) struct Blob {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// Empty for a layer of the source not fetched yet (see [`Composed::fetch`]).
    pub parts: Vec<PathBuf>,
    /// Where the source has the layer, for one that is not in the store (`--format oci`).
    pub from_source: Option<SourceLayer>,
}

/// A layer to take from the source the image was built from (`--format oci`).
#[derive(Debug, Clone)]
pub(crate) struct SourceLayer {
    /// The source's descriptor of it.
    pub layer: crate::source::LayerRef,
    /// The source repository, when it is on the destination's registry: a blob mount there
    /// copies no bytes.
    pub mount_from: Option<String>,
}

impl Blob {
    /// Checks that the bytes read from the blob (their digest and size) are the blob its
    /// descriptor names: a stored file that changed since its record was written fails here.
    pub fn check(&self, found: &Digest, found_size: u64) -> Result<(), PushError> {
        if *found == self.digest && found_size == self.size {
            return Ok(());
        }
        Err(PushError::StoredBlobChanged(Box::new(ChangedBlob {
            path: self.parts[0].clone(),
            expected: self.digest.clone(),
            expected_size: self.size,
            found: found.clone(),
            found_size,
        })))
    }

    /// The blob's bytes, read from its parts in order.
    pub fn open(&self) -> Result<Box<dyn io::Read>, PushError> {
        let mut reader: Box<dyn io::Read> = Box::new(io::empty());
        for part in &self.parts {
            let f = fs_err::File::open(part).map_err(io_at(part))?;
            reader = Box::new(io::Read::chain(reader, f));
        }
        Ok(reader)
    }
}

/// What a push published.
#[derive(Debug, Clone, Serialize)]
pub struct Pushed {
    /// The destination as given.
    pub destination: String,
    /// The manifest's digest (`sha256:…`).
    pub manifest_digest: String,
    /// The manifest's size in bytes.
    pub manifest_size: u64,
    /// The config's digest.
    pub config_digest: String,
    /// The layers, base first.
    pub layers: Vec<PushedLayer>,
}

/// One layer of a push.
#[derive(Debug, Clone, Serialize)]
pub struct PushedLayer {
    /// Its media type (the spelling of [`PushOptions::media_types`]).
    pub media_type: String,
    /// Its digest: of the blob, or of the compressed blob with `zstd`.
    pub digest: String,
    /// Its size in bytes, as sent.
    pub size: u64,
    /// Whether the destination had it already (nothing was sent).
    pub existed: bool,
    /// Whether the registry mounted it from the source repository (nothing was sent).
    pub mounted: bool,
}

/// The image to publish, composed: its layer blobs, config and manifest bytes.
pub(crate) struct Composed {
    pub layers: Vec<Blob>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
    /// The source manifest's descriptor when it is the manifest's `subject`.
    pub subject: Option<serde_json::Value>,
    /// The platform of an index entry naming the manifest, `erofs` in its `os.features`.
    pub platform: serde_json::Value,
    /// The source the image was built from, when layers are taken from it.
    pub source: Option<Box<dyn crate::source::ImageSource>>,
    /// Compressed and fetched layers live here until the push ends.
    _work: tempfile::TempDir,
}

impl Composed {
    /// Fetches each layer still to be taken from the source for which `needed` says so, into
    /// the work directory, checked against its digest and size before it is used.
    pub fn fetch(&mut self, needed: impl Fn(usize) -> bool) -> Result<(), PushError> {
        for (i, blob) in self.layers.iter_mut().enumerate() {
            if !blob.parts.is_empty() || !needed(i) {
                continue;
            }
            let source = self.source.as_deref().expect("a layer of the source comes with the source");
            oci_form::fetch_layer(source, blob, &self._work.path().join(format!("layer-{i}")))?;
        }
        Ok(())
    }
}

/// Publishes the image `tag` of `store` to `dest`.
pub fn push(store: &Store, tag: &str, dest: &str, opts: &PushOptions) -> Result<Pushed, PushError> {
    let dest_parsed = Destination::parse(dest)?;
    // Shared store lock: no gc while the blobs are read.
    let _lock = store.lock_shared()?;
    let record = store.get(tag)?;
    let mut composed = match opts.format {
        PushFormat::Erofs => {
            let media_types = opts.media_types.unwrap_or(MediaTypes::default_for(opts.zstd));
            compose(store, &record, opts.zstd, media_types)?
        }
        PushFormat::Oci if opts.zstd || opts.media_types.is_some() => {
            return Err(PushError::ErofsOptionWithOci);
        }
        PushFormat::Oci => oci_form::compose(store, &record, &dest_parsed, &opts.registry)?,
    };
    if !matches!(dest_parsed, Destination::Registry(_)) {
        composed.fetch(|_| true)?;
    }
    let layers = match &dest_parsed {
        Destination::Registry(reference) => registry::push(reference, &mut composed, &opts.registry)?,
        Destination::Layout { dir, tag } => layout::write_dir(dir, tag, &composed)?,
        Destination::Archive { file, tag } => layout::write_archive(file, tag, &composed)?,
    };
    Ok(Pushed {
        destination: dest.to_string(),
        manifest_digest: digest::sha256_of(&composed.manifest).to_string(),
        manifest_size: composed.manifest.len() as u64,
        config_digest: digest::sha256_of(&composed.config).to_string(),
        layers,
    })
}

/// The layer blobs, config and manifest of `record` in the EROFS image layer format, layers
/// spelled as `media_types` says.
pub(crate) fn compose(
    store: &Store,
    record: &ImageRecord,
    zstd: bool,
    media_types: MediaTypes,
) -> Result<Composed, PushError> {
    let (Some(raw_type), Some(layer_type)) = (media_types.layer(false), media_types.layer(zstd)) else {
        return Err(PushError::CompressedContainerd21);
    };
    if let Some(l) = record.lowers.iter().find(|l| l.fs != FsType::Erofs) {
        return Err(PushError::NotErofs { tag: record.tag.clone(), fs: l.fs });
    }
    let config_source = store.source_json(&record.config_digest)?.ok_or_else(|| {
        PushError::NoSourceConfig { tag: record.tag.clone(), digest: record.config_digest.clone() }
    })?;
    // Compressed layers and `blob ‖ tree` of dm-verity layers are made here.
    let work = store.scratch("push-")?;
    let mut blobs = Vec::new();
    let mut produced = Vec::new();
    for (i, lower) in record.lowers.iter().enumerate() {
        let id = lower.id().map_err(StoreError::from)?;
        let mut parts = vec![store.blob_path(&id)];
        let mut data_sha256 = lower.blob_sha256.clone();
        let mut data_size = lower.size;
        if let Some(v) = &lower.verity {
            // The layer is the blob with its tree appended (spec §3.5).
            parts.push(store.verity_tree_path(&id));
            (data_sha256, data_size) = (v.sha256.clone(), v.hash_offset + v.tree_size);
        }
        let diff_id = digest::parse_sha256("stored blob sha256", &format!("sha256:{data_sha256}"))
            .map_err(StoreError::from)?;
        let data = Blob {
            media_type: raw_type.into(),
            digest: diff_id.clone(),
            size: data_size,
            parts,
            from_source: None,
        };
        let blob = if zstd {
            let out = work.path().join(format!("layer-{i}.zst"));
            let (digest, size) = compress(&data, &out)?;
            Blob { media_type: layer_type.into(), digest, size, parts: vec![out], from_source: None }
        } else {
            data
        };
        produced.push(ProducedLayer {
            digest: blob.digest.clone(),
            size: blob.size,
            diff_id,
            zstd,
            source_chain_id: lower.chain_id.clone(),
            source_diff_id: lower.diff_id.clone(),
            source_digest: lower.digest.clone(),
            recipe: lower.recipe,
            tool: match store.layer_slot(&id)? {
                crate::store::LayerSlot::Published(r) => r.tool,
                _ => String::new(),
            },
            verity: lower.verity.as_ref().map(|v| (v.hash_offset, v.root_digest.to_string())),
        });
        blobs.push(blob);
    }
    let config = erofs_config(&config_source, &produced)
        .ok_or(PushError::BadSourceConfig { tag: record.tag.clone() })?;
    let subject = if record.source.starts_with("docker://") {
        store.source_json(&record.manifest_digest)?.map(|bytes| {
            let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("mediaType").and_then(|m| m.as_str()).map(str::to_string))
                .unwrap_or_else(|| MANIFEST_TYPE.to_string());
            serde_json::json!({
                "mediaType": media_type,
                "digest": record.manifest_digest.to_string(),
                "size": bytes.len(),
            })
        })
    } else {
        None
    };
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": digest::sha256_of(&config).to_string(), "size": config.len()},
        "layers": erofs_image::produce(&produced, media_types).ok_or(PushError::CompressedContainerd21)?,
        "annotations": {
            erofs_image::SOURCE_MANIFEST: record.manifest_digest.to_string(),
            erofs_image::RECIPE: produced.first().map(|p| p.recipe).unwrap_or(FsType::Erofs.recipe()).to_string(),
        },
    });
    if let Some(s) = &subject {
        manifest["subject"] = s.clone();
    }
    let manifest = serde_json::to_vec(&manifest).expect("a manifest serializes");
    let mut parts = record.platform.splitn(3, '/');
    let mut platform = serde_json::json!({
        "os": parts.next().unwrap_or_default(),
        "architecture": parts.next().unwrap_or_default(),
        "os.features": [erofs_image::OS_FEATURE],
    });
    if let Some(variant) = parts.next() {
        platform["variant"] = variant.into();
    }
    Ok(Composed { layers: blobs, config, manifest, subject, platform, source: None, _work: work })
}

/// The source config with the EROFS layers' DiffIDs and `erofs` in `os.features`.
fn erofs_config(source: &[u8], layers: &[ProducedLayer]) -> Option<Vec<u8>> {
    let mut config: serde_json::Value = serde_json::from_slice(source).ok()?;
    let obj = config.as_object_mut()?;
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.to_string()).collect();
    obj.insert("rootfs".into(), serde_json::json!({"type": "layers", "diff_ids": diff_ids}));
    let features = obj.entry("os.features").or_insert_with(|| serde_json::json!([]));
    let list = features.as_array_mut()?;
    if !list.iter().any(|f| f == erofs_image::OS_FEATURE) {
        list.push(erofs_image::OS_FEATURE.into());
    }
    Some(serde_json::to_vec(&config).expect("a config serializes"))
}

/// zstd-compresses the blob `from` into `to`; the compressed digest and size.
/// The uncompressed bytes are hashed on the way and checked against `from`'s digest.
fn compress(from: &Blob, to: &Path) -> Result<(Digest, u64), PushError> {
    let mut input = digest::HashingReader::new(io::BufReader::with_capacity(1 << 20, from.open()?));
    let out = fs_err::File::create(to).map_err(io_at(to))?;
    let mut hashing = digest::HashingWriter::new(io::BufWriter::with_capacity(1 << 20, out));
    let mut encoder = zstd::stream::Encoder::new(&mut hashing, ZSTD_LEVEL).map_err(io_at(to))?;
    io::copy(&mut input, &mut encoder).map_err(io_at(to))?;
    encoder.finish().map_err(io_at(to))?;
    let (read, read_size, _) = input.finish().map_err(io_at(&from.parts[0]))?;
    from.check(&read, read_size)?;
    let (d, n, mut w) = hashing.finish();
    w.flush().map_err(io_at(to))?;
    Ok((d, n))
}

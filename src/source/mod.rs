//! Image sources: where manifests, configs and layer blobs come from.
//!
//! | spelling                   | source                                      |
//! |----------------------------|---------------------------------------------|
//! | `oci:DIR[:TAG]`            | OCI image layout directory ([`oci`])        |
//! | `oci-archive:FILE[:TAG]`   | tar of an OCI image layout ([`oci`])        |
//! | `docker-archive:FILE[:REF]`| `docker save` tar ([`docker_archive`])      |

mod archive;
pub(crate) mod auth;
pub mod docker_archive;
pub mod http;
pub mod oci;
pub mod reference;
pub mod registry;

pub use registry::RegistryOptions;

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use oci_spec::image::{Digest, ImageConfiguration};

use crate::digest::{DigestMismatch, InvalidDigest};
use crate::erofs_image::{self, ErofsLayer};
use crate::platform::Platform;

/// Largest manifest, index or config accepted (they are read into memory).
pub const MAX_JSON: u64 = 16 << 20;

/// Most layers an image may have. OCI sets no limit; Docker stops at 127 (overlay2 stacks no
/// more) and the kernel's overlayfs at 500 lower directories. 1000 leaves room for every image
/// those tools can make or stack, and for stacks only `--merge` or `--squash` can present,
/// while a manifest of tens of thousands of layers — hours of conversion into an image no VM
/// can attach — is refused before any layer is fetched.
pub const MAX_LAYERS: usize = 1000;

/// Indexes followed from a reference before the manifest (an index of indexes is allowed by
/// OCI but rare; deeper nesting is refused rather than followed).
pub const MAX_INDEX_DEPTH: usize = 3;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    #[error(
        "unknown source {0:?}: expected oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker-archive:FILE[:REF]"
    )]
    UnknownTransport(String),
    #[error("bad image reference {0}")]
    BadReference(String),
    #[error(
        "registry {registry} refused access: give credentials with --creds USER:PASS or `docker login {registry}` (config.json)"
    )]
    Unauthorized { registry: String },
    #[error("registry {registry} denied pulling {repository} with the credentials given")]
    Denied { registry: String, repository: String },
    #[error("the token server {realm} refused {who} for registry {registry} (HTTP {status}): {detail}")]
    TokenRefused { realm: String, registry: String, who: String, status: u16, detail: String },
    #[error("the token server {realm} of registry {registry} failed (HTTP {status}): {detail}")]
    TokenServerFailed { realm: String, registry: String, status: u16, detail: String },
    #[error(
        "registry {registry} is spoken to over HTTPS but asks for a token from {realm}, over plain HTTP: no credentials or tokens are sent in cleartext (use --insecure-registry {registry} if the registry is plain HTTP too)"
    )]
    PlainHttpTokenServer { registry: String, realm: String },
    #[error("registry {registry} asks for a token from {realm:?}, which is not an http(s) URL")]
    BadTokenServer { registry: String, realm: String },
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error("reading {what}")]
    Read {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{manifest} has {layers} layers, more than the {MAX_LAYERS} vmrootfs takes")]
    TooManyLayers { manifest: String, layers: usize },
    #[error("{reference} is an index nested more than {MAX_INDEX_DEPTH} deep")]
    IndexTooDeep { reference: String },
    #[error(
        "registry {registry} has no token server (its /v2/ asks for no bearer token), so the identity token from config.json cannot be used there; give credentials with --creds USER:PASS"
    )]
    IdentityTokenWithoutTokenServer { registry: String },
    #[error("credential helper {helper} failed for registry {registry}: {detail}")]
    CredentialHelper { registry: String, helper: String, detail: String },
    #[error("reading the credentials for registry {registry} from {path}: {detail}")]
    Credentials { path: PathBuf, registry: String, detail: String },
    #[error("{0} not found in the registry")]
    NotFound(String),
    #[error("registry error for {what}: {detail}")]
    Registry { what: String, detail: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} is not valid JSON of its kind")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what} is larger than {MAX_JSON} bytes")]
    TooLarge { what: String },
    #[error("{path} is compressed; decompress it first (vmrootfs reads uncompressed archives)")]
    CompressedArchive { path: PathBuf },
    #[error("no image named {wanted:?} in {source_name}; it has: {available}")]
    NoSuchImage { wanted: String, source_name: String, available: String },
    #[error("{source_name} holds several images ({available}); name one, e.g. {example}")]
    Ambiguous { source_name: String, available: String, example: String },
    #[error("{source_name} holds an image for {found}, not {wanted}; build it with --platform {found}")]
    WrongPlatform { source_name: String, wanted: String, found: String },
    #[error("no image for platform {wanted} in the index; it has: {available}")]
    NoPlatform { wanted: String, available: String },
    #[error("unsupported manifest media type {0:?} (schema 1 and other formats are refused)")]
    UnsupportedManifest(String),
    #[error("blob {0} is missing from the source")]
    MissingBlob(String),
    #[error("the config lists {diff_ids} diff_ids but the manifest has {layers} layers")]
    LayerCountMismatch { diff_ids: usize, layers: usize },
    #[error("bad digest {0:?}")]
    BadDigest(String),
    #[error(transparent)]
    InvalidDigest(#[from] InvalidDigest),
    #[error(transparent)]
    Digest(#[from] DigestMismatch),
    #[error("EROFS image")]
    ErofsFormat(#[from] erofs_image::FormatError),
}

pub(crate) fn io_at(path: &Path) -> impl FnOnce(io::Error) -> SourceError + '_ {
    move |source| SourceError::Io { path: path.to_owned(), source }
}

/// One layer as the source describes it.
#[derive(Debug, Clone)]
pub struct LayerRef {
    pub media_type: String,
    /// Digest of the (possibly compressed) blob; checked while streaming.
    pub digest: Digest,
    pub size: Option<u64>,
    /// The descriptor's annotations (EROFS images carry DiffIDs and dm-verity data here).
    pub annotations: BTreeMap<String, String>,
    /// Where the source finds the blob (a path inside its directory or archive).
    pub(crate) location: String,
}

impl LayerRef {
    /// A layer known by its descriptor alone; where a source finds it is for
    /// [`ImageSource::locate_by_digest`] to say.
    pub(crate) fn described(media_type: String, digest: Digest, size: u64) -> LayerRef {
        LayerRef {
            media_type,
            digest,
            size: Some(size),
            annotations: BTreeMap::new(),
            location: String::new(),
        }
    }
}

/// A manifest resolved to one platform, with its parsed config.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub config: ImageConfiguration,
    pub platform: String,
    pub layers: Vec<LayerRef>,
    /// Diff IDs from the config, one per layer (for an EROFS image, per the format's rules).
    pub diff_ids: Vec<Digest>,
    /// The manifest as the source served it (none for a docker archive, which has none).
    pub manifest_bytes: Option<Vec<u8>>,
    /// The config as the source served it.
    pub config_bytes: Vec<u8>,
    /// For an image of EROFS layers (already converted, by vmrootfs or another producer):
    /// each layer's classification. `None` for tar layers.
    pub erofs: Option<Vec<ErofsLayer>>,
}

impl ResolvedImage {
    /// The image a manifest describes; `location` says where the source finds a layer blob.
    pub(crate) fn from_manifest(
        manifest_digest: Digest,
        manifest_bytes: Vec<u8>,
        manifest: &oci_spec::image::ImageManifest,
        (config, config_bytes): (ImageConfiguration, Vec<u8>),
        location: impl Fn(&Digest) -> String,
    ) -> Result<ResolvedImage, SourceError> {
        // Only sha256 digests go on: they are what every check and store name is made of.
        crate::digest::require_sha256("manifest digest", &manifest_digest)?;
        if manifest.layers().len() > MAX_LAYERS {
            return Err(SourceError::TooManyLayers {
                manifest: format!("manifest {manifest_digest}"),
                layers: manifest.layers().len(),
            });
        }
        crate::digest::require_sha256("manifest config.digest", manifest.config().digest())?;
        for (i, l) in manifest.layers().iter().enumerate() {
            crate::digest::require_sha256(&format!("manifest layers[{i}].digest"), l.digest())?;
        }
        let layers: Vec<LayerRef> = manifest
            .layers()
            .iter()
            .map(|l| LayerRef {
                media_type: l.media_type().to_string(),
                digest: l.digest().clone(),
                size: Some(l.size()),
                annotations: l.annotations().clone().unwrap_or_default().into_iter().collect(),
                location: location(l.digest()),
            })
            .collect();
        let media_types: Vec<&str> = layers.iter().map(|l| l.media_type.as_str()).collect();
        let (diff_ids, erofs) = if erofs_image::is_erofs_manifest(&media_types) {
            let configured: Vec<Digest> = config
                .rootfs()
                .diff_ids()
                .iter()
                .enumerate()
                .map(|(i, d)| crate::digest::parse_sha256(&format!("config rootfs.diff_ids[{i}]"), d))
                .collect::<Result<_, _>>()?;
            let descriptors: Vec<erofs_image::Descriptor<'_>> = layers
                .iter()
                .map(|l| erofs_image::Descriptor {
                    media_type: &l.media_type,
                    digest: &l.digest,
                    annotations: &l.annotations,
                })
                .collect();
            let features = config.os_features().clone().unwrap_or_default();
            let classified = erofs_image::classify(&descriptors, Some(&configured), &features)?;
            (classified.iter().map(|l| l.diff_id.clone()).collect(), Some(classified))
        } else {
            (diff_ids(&config, layers.len())?, None)
        };
        Ok(ResolvedImage {
            manifest_digest,
            config_digest: manifest.config().digest().clone(),
            platform: oci::config_platform(&config),
            diff_ids,
            config,
            config_bytes,
            manifest_bytes: Some(manifest_bytes),
            layers,
            erofs,
        })
    }
}

/// A manifest reached without an index must be for `platform`, as an index entry of another
/// platform would not be taken either. A config that names no platform is taken as it is.
pub(crate) fn check_config_platform(
    config: &ImageConfiguration,
    platform: &Platform,
    source_name: &str,
) -> Result<(), SourceError> {
    let (os, arch) = (config.os().to_string(), config.architecture().to_string());
    if os.is_empty() || arch.is_empty() || platform.matches(&os, &arch, config.variant().as_deref()) {
        return Ok(());
    }
    Err(SourceError::WrongPlatform {
        source_name: source_name.to_string(),
        wanted: platform.to_string(),
        found: oci::config_platform(config),
    })
}

/// Somewhere images come from.
pub trait ImageSource: Send + Sync {
    /// The canonical spelling, recorded in image records.
    fn describe(&self) -> String;
    /// Finds the image (following an index to `platform`) and reads its config.
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, SourceError>;
    /// Opens a layer blob's raw bytes; the caller checks them against `layer.digest`.
    fn open_layer(&self, layer: &LayerRef) -> Result<Box<dyn Read + Send + '_>, SourceError>;
    /// The blob `layer` describes, found by its digest alone, not through a manifest: as
    /// registries and OCI layouts are content-addressed (`push --format oci` of a committed
    /// image, whose manifest the source never had, takes its base layers so). `None` from a
    /// source that cannot (a docker archive, whose members are named by the archive).
    fn locate_by_digest(&self, _layer: LayerRef) -> Option<LayerRef> {
        None
    }
    /// An EROFS image `vmrootfs push` made from the manifest `manifest` with recipe `recipe`,
    /// published beside it (a referrer), as a source spelling; `None` if there is none or the
    /// source cannot tell (only registries can).
    fn converted(&self, _manifest: &Digest, _recipe: u32) -> Result<Option<String>, SourceError> {
        Ok(None)
    }
}

/// Parses a source spelling (see the module table); anything else is a registry reference.
pub fn open(spec: &str, registry: &RegistryOptions) -> Result<Box<dyn ImageSource>, SourceError> {
    if let Some(rest) = spec.strip_prefix("oci:") {
        let (path, tag) = split_path_ref(rest, Path::is_dir);
        return Ok(Box::new(oci::OciSource::dir(path, tag)?));
    }
    if let Some(rest) = spec.strip_prefix("oci-archive:") {
        let (path, tag) = split_path_ref(rest, Path::is_file);
        return Ok(Box::new(oci::OciSource::archive(path, tag)?));
    }
    if let Some(rest) = spec.strip_prefix("docker-archive:") {
        let (path, reference) = split_path_ref(rest, Path::is_file);
        return Ok(Box::new(docker_archive::DockerArchive::open(path, reference)?));
    }
    if spec.starts_with("docker://") || !spec.contains(':') || looks_like_registry_ref(spec) {
        return Ok(Box::new(registry::RegistrySource::new(spec, registry)?));
    }
    Err(SourceError::UnknownTransport(spec.to_string()))
}

fn looks_like_registry_ref(spec: &str) -> bool {
    let transport = spec.split(':').next().unwrap_or_default();
    !["oci", "oci-archive", "docker-archive", "dir", "containers-storage", "docker-daemon"]
        .contains(&transport)
        && !spec.starts_with('/')
}

/// `PATH[:REF]`, where both may contain `:` and REF may contain `/` (`app.tar:lab/app:v1`):
/// the path is the longest prefix before a `:` that `is_path` accepts (the whole string
/// first), the rest the reference. When no prefix names a path, the path ends at the first
/// `:` (so the error that follows names a path, not a path with a reference glued on).
fn split_path_ref(rest: &str, is_path: impl Fn(&Path) -> bool) -> (PathBuf, Option<String>) {
    let split = |i: usize| {
        let r = &rest[i + 1..];
        (PathBuf::from(&rest[..i]), (!r.is_empty()).then(|| r.to_string()))
    };
    if is_path(Path::new(rest)) {
        return (PathBuf::from(rest), None);
    }
    if let Some((i, _)) = rest.rmatch_indices(':').find(|&(i, _)| i > 0 && is_path(Path::new(&rest[..i]))) {
        return split(i);
    }
    match rest.find(':') {
        Some(i) if i > 0 => split(i),
        _ => (PathBuf::from(rest), None),
    }
}

/// An image config as the sources read it: one without `rootfs` (the EROFS image layer format
/// allows that) reads as one with no diff_ids, which the rules for its layers then judge.
pub(crate) struct ConfigJson(pub ImageConfiguration);

impl<'de> serde::Deserialize<'de> for ConfigJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut value = serde_json::Value::deserialize(d)?;
        if let Some(config) = value.as_object_mut() {
            config.entry("rootfs").or_insert_with(|| serde_json::json!({"type": "layers", "diff_ids": []}));
        }
        serde_json::from_value(value).map(ConfigJson).map_err(serde::de::Error::custom)
    }
}

/// Reads a small JSON document, refusing more than [`MAX_JSON`] bytes.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    mut r: impl Read,
    what: &str,
) -> Result<(T, Vec<u8>), SourceError> {
    let mut bytes = Vec::new();
    r.by_ref()
        .take(MAX_JSON + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| SourceError::Io { path: what.into(), source })?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(SourceError::TooLarge { what: what.to_string() });
    }
    let value = serde_json::from_slice(&bytes)
        .map_err(|source| SourceError::Json { what: what.to_string(), source })?;
    Ok((value, bytes))
}

/// Diff IDs of a config, each a well-formed sha256 digest, checked against the layer count.
pub(crate) fn diff_ids(config: &ImageConfiguration, layers: usize) -> Result<Vec<Digest>, SourceError> {
    let ids = config
        .rootfs()
        .diff_ids()
        .iter()
        .enumerate()
        .map(|(i, d)| crate::digest::parse_sha256(&format!("config rootfs.diff_ids[{i}]"), d))
        .collect::<Result<Vec<_>, _>>()?;
    if ids.len() != layers {
        return Err(SourceError::LayerCountMismatch { diff_ids: ids.len(), layers });
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_path_ref_table() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        for name in ["app.tar", "a:b.tar", "a"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let cases = [
            // Nothing exists: the path ends at the first `:`.
            ("/nonexistent/img:latest".to_string(), ("/nonexistent/img".to_string(), Some("latest"))),
            ("/nonexistent/img".into(), ("/nonexistent/img".into(), None)),
            ("/nonexistent/x.tar:lab/base:v1".into(), ("/nonexistent/x.tar".into(), Some("lab/base:v1"))),
            ("img.tar:".into(), ("img.tar".into(), None)),
            // The longest existing prefix is the path.
            (format!("{d}/app.tar"), (format!("{d}/app.tar"), None)),
            (format!("{d}/app.tar:"), (format!("{d}/app.tar"), None)),
            (format!("{d}/app.tar:app:latest"), (format!("{d}/app.tar"), Some("app:latest"))),
            (format!("{d}/app.tar:lab/base"), (format!("{d}/app.tar"), Some("lab/base"))),
            (format!("{d}/a:b.tar:lab/base:v1"), (format!("{d}/a:b.tar"), Some("lab/base:v1"))),
            (format!("{d}/a:b.tar"), (format!("{d}/a:b.tar"), None)),
            (format!("{d}/a:c.tar"), (format!("{d}/a"), Some("c.tar"))),
        ];
        for (input, (path, tag)) in cases {
            let (p, t) = split_path_ref(&input, Path::is_file);
            assert_eq!((p.to_str().unwrap(), t.as_deref()), (path.as_str(), tag), "{input}");
        }
    }

    #[test]
    fn open_tells_transports_apart() {
        let r = RegistryOptions::default();
        for registry_ref in ["alpine:3.20", "docker://alpine", "alpine", "127.0.0.1:5000/a/b:c"] {
            assert!(open(registry_ref, &r).unwrap().describe().starts_with("docker://"), "{registry_ref}");
        }
        assert!(matches!(open("dir:/x", &r), Err(SourceError::UnknownTransport(_))));
        assert!(matches!(open("oci:/nonexistent/dir:tag", &r), Err(SourceError::Io { .. })));
    }

    /// Item 25: an EROFS-format error's text appears once in the printed chain.
    #[test]
    fn an_erofs_format_error_prints_its_text_once() {
        let err = anyhow::Error::from(SourceError::from(erofs_image::FormatError::NoLayers));
        let text = format!("{err:#}");
        assert_eq!(text.matches("the image has no layers").count(), 1, "{text}");
    }
}

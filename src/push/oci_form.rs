//! `push --format oci`: a stored image as a standard OCI image with tar layers, which docker,
//! podman and containerd run — the layers' original compressed blobs, not the EROFS ones.
//!
//! Where each byte comes from, every one checked against the digest the record names:
//!
//! - a layer: the store's OCI area when it holds the lower's `digest` (a committed layer),
//!   else the source the image was built from (`record.source`): found there by its digest
//!   when the recorded manifest describes it (registries and OCI layouts are
//!   content-addressed; the base layers of a committed image, whose manifest the source never
//!   had, are found so), else through the source's manifest, read at the record's manifest
//!   digest for a registry (not at its tag, which may have moved). To a registry
//!   destination on the source's own registry, a layer the destination lacks is first
//!   *mounted* from the source repository (`POST …/blobs/uploads/?mount=…&from=…`, no bytes
//!   move); otherwise, and when the registry declines, it is fetched — hashed on the way into
//!   the push's work directory and refused unless it is the digest and size the record names
//!   — and sent;
//! - the config: the store's OCI area, else the copy the build kept (`sources/`), else the
//!   source; checked against `config_digest`;
//! - the manifest: the one the record names (`manifest_digest`, from the OCI area or the kept
//!   source copy) pushed as it is when it is an OCI image manifest of exactly these config
//!   and layers — so a re-push of a source keeps its digest; else (a Docker schema 2
//!   manifest, a docker archive, which has none) an OCI manifest written from the same
//!   descriptors, Docker media types spelled as their OCI equivalents.
//!
//! Nothing unverified is published as complete: fetched bytes are checked before any upload
//! or layout write, stored ones as they are copied, and the manifest goes last.

use std::io::{self, Read};
use std::path::PathBuf;

use oci_spec::image::Digest;

use super::{Blob, CONFIG_TYPE, Composed, Destination, MANIFEST_TYPE, PushError, SourceLayer};
use crate::digest;
use crate::platform::Platform;
use crate::record::ImageRecord;
use crate::source::{self, ImageSource, LayerRef, RegistryOptions, ResolvedImage};
use crate::store::Store;

/// Docker media types and the OCI ones they are spelled as in an OCI manifest.
const DOCKER_TO_OCI: &[(&str, &str)] = &[
    ("application/vnd.docker.image.rootfs.diff.tar.gzip", "application/vnd.oci.image.layer.v1.tar+gzip"),
    ("application/vnd.docker.image.rootfs.diff.tar", "application/vnd.oci.image.layer.v1.tar"),
    (
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    ),
    ("application/vnd.docker.container.image.v1+json", CONFIG_TYPE),
];

/// The OCI spelling of a layer media type, if it is a tar layer (plain, gzip or zstd).
fn oci_layer_type(media_type: &str) -> Option<&str> {
    let oci = DOCKER_TO_OCI.iter().find(|(d, _)| *d == media_type).map_or(media_type, |(_, o)| *o);
    let tar_layer =
        ["application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.nondistributable.v1.tar"]
            .iter()
            .any(|t| oci.strip_prefix(t).is_some_and(|rest| ["", "+gzip", "+zstd"].contains(&rest)));
    tar_layer.then_some(oci)
}

/// The OCI layer media type of a stored blob without a descriptor, from its first bytes.
fn sniffed_layer_type(head: &[u8]) -> &'static str {
    match head {
        [0x1f, 0x8b, ..] => "application/vnd.oci.image.layer.v1.tar+gzip",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "application/vnd.oci.image.layer.v1.tar+zstd",
        _ => "application/vnd.oci.image.layer.v1.tar",
    }
}

/// The source the image was built from, opened when first needed, and its resolution at the
/// record's manifest when a layer or the config must be found through it.
struct Origin<'a> {
    record: &'a ImageRecord,
    registry: &'a RegistryOptions,
    source: Option<Box<dyn ImageSource>>,
    resolved: Option<ResolvedImage>,
}

impl Origin<'_> {
    /// The record's source as a spelling that reads the recorded manifest: a registry
    /// reference pinned to `manifest_digest`, any other source as recorded.
    fn pinned_spec(&self) -> String {
        let Some(text) = self.record.source.strip_prefix("docker://") else {
            return self.record.source.clone();
        };
        match source::reference::parse(text) {
            Ok(r) => {
                format!("docker://{}", r.clone_with_digest(self.record.manifest_digest.to_string()).whole())
            }
            Err(_) => self.record.source.clone(),
        }
    }

    fn failed(&self, e: source::SourceError) -> PushError {
        PushError::Origin { source_name: self.pinned_spec(), source: Box::new(e) }
    }

    fn source(&mut self) -> Result<&dyn ImageSource, PushError> {
        if self.source.is_none() {
            self.source = Some(source::open(&self.pinned_spec(), self.registry).map_err(|e| self.failed(e))?);
        }
        Ok(self.source.as_deref().expect("opened above"))
    }

    fn resolved(&mut self) -> Result<&ResolvedImage, PushError> {
        if self.resolved.is_none() {
            let platform: Platform =
                self.record.platform.parse().map_err(|_| PushError::BadRecordPlatform {
                    tag: self.record.tag.clone(),
                    platform: self.record.platform.clone(),
                })?;
            let resolved = self.source()?.resolve(&platform);
            self.resolved = Some(resolved.map_err(|e| self.failed(e))?);
        }
        Ok(self.resolved.as_ref().expect("resolved above"))
    }

    /// The source's layer `digest`: found by digest when its descriptor is known (the base
    /// layers of a committed image, whose manifest the source never had), else through the
    /// source's manifest.
    fn layer(&mut self, digest: &Digest, descriptor: Option<(String, u64)>) -> Result<LayerRef, PushError> {
        if let Some((media_type, size)) = descriptor {
            let described = LayerRef::described(media_type, digest.clone(), size);
            if let Some(found) = self.source()?.locate_by_digest(described) {
                return Ok(found);
            }
        }
        let found = self.resolved()?.layers.iter().find(|l| l.digest == *digest).cloned();
        found.ok_or_else(|| PushError::OriginLacks {
            source_name: self.pinned_spec(),
            what: format!("layer {digest}"),
        })
    }

    /// The source repository, when the source is a registry whose host is `registry` (where a
    /// blob mount can take its blobs from).
    fn repository_on(&self, dest: &Destination) -> Option<String> {
        let Destination::Registry(reference) = dest else { return None };
        let ours = source::reference::parse(self.record.source.strip_prefix("docker://")?).ok()?;
        let theirs = source::reference::parse(reference).ok()?;
        (ours.resolve_registry() == theirs.resolve_registry()).then(|| ours.repository().to_string())
    }
}

/// The config or manifest `digest` (at most [`source::MAX_JSON`] bytes): from the store's OCI
/// area, else the build's kept copy, checked against `digest`; `None` when the store has
/// neither.
fn stored_json(store: &Store, digest: &Digest, what: &'static str) -> Result<Option<Vec<u8>>, PushError> {
    if let Some(blob) = store.open_oci_blob(digest, None)? {
        let mut bytes = Vec::new();
        blob.take(source::MAX_JSON)
            .read_to_end(&mut bytes)
            .map_err(|e| PushError::Io { path: store.root().join("oci"), source: e })?;
        digest::check(what, digest, &digest::sha256_of(&bytes))?;
        return Ok(Some(bytes));
    }
    match store.source_json(digest)? {
        Some(bytes) => {
            digest::check(what, digest, &digest::sha256_of(&bytes))?;
            Ok(Some(bytes))
        }
        None => Ok(None),
    }
}

/// A manifest's layer descriptors, if `bytes` is an image manifest of exactly `config` and
/// `layers`, and whether it is an OCI one (pushable as it is).
fn matching_descriptors(
    bytes: &[u8],
    config: &Digest,
    layers: &[&Digest],
) -> Option<(Vec<(String, u64)>, bool)> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let media_type = v.get("mediaType").and_then(|m| m.as_str()).unwrap_or(MANIFEST_TYPE);
    if !source::oci::is_manifest_type(media_type) || v["config"]["digest"] != config.to_string() {
        return None;
    }
    let listed = v["layers"].as_array()?;
    if listed.len() != layers.len() || listed.iter().zip(layers).any(|(l, d)| l["digest"] != d.to_string()) {
        return None;
    }
    let descriptors: Option<Vec<(String, u64)>> =
        listed.iter().map(|l| Some((l["mediaType"].as_str()?.to_string(), l["size"].as_u64()?))).collect();
    let is_oci = media_type == MANIFEST_TYPE && v["config"]["mediaType"] == CONFIG_TYPE;
    Some((descriptors?, is_oci))
}

/// The image `record` of `store` in standard OCI form, for `dest`. Layers to be fetched from
/// the source are fetched by [`Composed::fetch`] (or mounted) when the destination lacks them.
pub(crate) fn compose(
    store: &Store,
    record: &ImageRecord,
    dest: &Destination,
    registry: &RegistryOptions,
) -> Result<Composed, PushError> {
    let mut origin = Origin { record, registry, source: None, resolved: None };
    let work = store.scratch("push-oci-")?;
    let digests: Vec<&Digest> = record.lowers.iter().map(|l| &l.digest).collect();
    let kept_manifest = stored_json(store, &record.manifest_digest, "manifest")?;
    let described =
        kept_manifest.as_deref().and_then(|m| matching_descriptors(m, &record.config_digest, &digests));
    let mount_from = origin.repository_on(dest);
    let mut layers = Vec::with_capacity(record.lowers.len());
    for (i, lower) in record.lowers.iter().enumerate() {
        let descriptor = described.as_ref().map(|(d, _)| d[i].clone());
        let blob = if let Some(stored) = store.oci_blob(&lower.digest)? {
            let path = store.oci_blob_path(&lower.digest)?;
            let media_type = match &descriptor {
                Some((t, _)) => t.clone(),
                None => {
                    let mut head = [0u8; 4];
                    let n = digest::read_full(
                        &mut fs_err::File::open(&path).map_err(super::io_at(&path))?,
                        &mut head,
                    )
                    .map_err(super::io_at(&path))?;
                    sniffed_layer_type(&head[..n]).to_string()
                }
            };
            Blob {
                media_type,
                digest: lower.digest.clone(),
                size: stored.size,
                parts: vec![path],
                from_source: None,
            }
        } else {
            let layer = origin.layer(&lower.digest, descriptor)?;
            let mut blob = Blob {
                media_type: layer.media_type.clone(),
                digest: lower.digest.clone(),
                size: layer.size.unwrap_or_default(),
                parts: Vec::new(),
                from_source: Some(SourceLayer { layer: layer.clone(), mount_from: mount_from.clone() }),
            };
            if layer.size.is_none() {
                // A docker archive gives no sizes: the manifest needs them now.
                fetch_layer(origin.source()?, &mut blob, &work.path().join(format!("layer-{i}")))?;
            }
            blob
        };
        let media_type = oci_layer_type(&blob.media_type).ok_or_else(|| PushError::NotTarLayer {
            tag: record.tag.clone(),
            digest: lower.digest.clone(),
            media_type: blob.media_type.clone(),
        })?;
        layers.push(Blob { media_type: media_type.to_string(), ..blob });
    }
    let config = match stored_json(store, &record.config_digest, "config")? {
        Some(bytes) => bytes,
        None => {
            let bytes = origin.resolved()?.config_bytes.clone();
            digest::check("config", &record.config_digest, &digest::sha256_of(&bytes))
                .map_err(|e| origin.failed(e.into()))?;
            bytes
        }
    };
    let manifest = match (kept_manifest, described) {
        (Some(bytes), Some((_, true))) => bytes,
        _ => {
            let layers: Vec<serde_json::Value> = layers
                .iter()
                .map(|l| serde_json::json!({"mediaType": l.media_type, "digest": l.digest.to_string(), "size": l.size}))
                .collect();
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": {"mediaType": CONFIG_TYPE, "digest": record.config_digest.to_string(), "size": config.len()},
                "layers": layers,
            });
            serde_json::to_vec(&manifest).expect("a manifest serializes")
        }
    };
    let mut parts = record.platform.splitn(3, '/');
    let mut platform = serde_json::json!({
        "os": parts.next().unwrap_or_default(),
        "architecture": parts.next().unwrap_or_default(),
    });
    if let Some(variant) = parts.next() {
        platform["variant"] = variant.into();
    }
    Ok(Composed { layers, config, manifest, subject: None, platform, source: origin.source, _work: work })
}

/// Fetches the source layer of `blob` into `to`, hashing it on the way, and makes `to` its
/// bytes once they are the digest (and the size, when known) it names.
pub(crate) fn fetch_layer(
    source: &dyn ImageSource,
    blob: &mut Blob,
    to: &std::path::Path,
) -> Result<(), PushError> {
    let Some(from) = &blob.from_source else { return Ok(()) };
    let failed = |e: source::SourceError| PushError::OriginLayer {
        source_name: source.describe(),
        digest: from.layer.digest.clone(),
        source: Box::new(e),
    };
    crate::progress::info(&format!("fetching layer {} from {}", blob.digest, source.describe()));
    let reader = source.open_layer(&from.layer).map_err(failed)?;
    let mut out = io::BufWriter::with_capacity(1 << 20, fs_err::File::create(to).map_err(super::io_at(to))?);
    let mut hashing = digest::HashingReader::new(reader);
    io::copy(&mut hashing, &mut out).map_err(|e| {
        failed(source::SourceError::Read { what: format!("layer {}", blob.digest), source: e })
    })?;
    io::Write::flush(&mut out).map_err(super::io_at(to))?;
    let (found, size, _) = hashing.finish().map_err(super::io_at(to))?;
    digest::check("layer blob", &blob.digest, &found).map_err(|e| failed(e.into()))?;
    if let Some(expected) = from.layer.size.filter(|want| *want != size) {
        return Err(PushError::OriginSize {
            source_name: source.describe(),
            digest: blob.digest.clone(),
            size,
            expected,
        });
    }
    blob.size = size;
    blob.parts = vec![PathBuf::from(to)];
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_types_are_spelled_as_oci_and_other_layers_are_refused() {
        let cases = [
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some("application/vnd.oci.image.layer.v1.tar+gzip"),
            ),
            ("application/vnd.docker.image.rootfs.diff.tar", Some("application/vnd.oci.image.layer.v1.tar")),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Some("application/vnd.oci.image.layer.v1.tar+zstd"),
            ),
            ("application/vnd.oci.image.layer.v1.tar", Some("application/vnd.oci.image.layer.v1.tar")),
            ("application/vnd.oci.image.layer.v1.erofs", None),
            ("application/vnd.erofs", None),
            ("application/vnd.oci.image.layer.v1.tar+lz4", None),
            ("application/vnd.docker.container.image.v1+json", None),
        ];
        for (given, want) in cases {
            assert_eq!(oci_layer_type(given), want, "{given}");
        }
        assert_eq!(sniffed_layer_type(&[0x1f, 0x8b, 8, 0]), "application/vnd.oci.image.layer.v1.tar+gzip");
        assert_eq!(
            sniffed_layer_type(&[0x28, 0xb5, 0x2f, 0xfd]),
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        assert_eq!(sniffed_layer_type(b"etc/"), "application/vnd.oci.image.layer.v1.tar");
    }

    #[test]
    fn only_a_manifest_of_exactly_the_recorded_config_and_layers_is_reused() {
        let (c, a, b) = (digest::sha256_of(b"c"), digest::sha256_of(b"a"), digest::sha256_of(b"b"));
        let manifest = |media_type: &str, config_type: &str, layers: &[&Digest]| {
            let layers: Vec<_> = layers
                .iter()
                .map(|d| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": 3}))
                .collect();
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2, "mediaType": media_type,
                "config": {"mediaType": config_type, "digest": c.to_string(), "size": 1},
                "layers": layers,
            }))
            .unwrap()
        };
        let oci = manifest(MANIFEST_TYPE, CONFIG_TYPE, &[&a, &b]);
        let (descriptors, is_oci) = matching_descriptors(&oci, &c, &[&a, &b]).unwrap();
        assert!(is_oci);
        assert_eq!(descriptors, vec![("application/vnd.oci.image.layer.v1.tar+gzip".to_string(), 3); 2]);
        let docker = manifest(
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.container.image.v1+json",
            &[&a, &b],
        );
        assert!(!matching_descriptors(&docker, &c, &[&a, &b]).unwrap().1, "docker: described, not reused");
        assert!(matching_descriptors(&oci, &c, &[&b, &a]).is_none(), "other order");
        assert!(matching_descriptors(&oci, &c, &[&a]).is_none(), "other layers");
        assert!(matching_descriptors(&oci, &a, &[&a, &b]).is_none(), "other config");
    }
}

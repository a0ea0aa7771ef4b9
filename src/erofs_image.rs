//! The EROFS image layer format (the draft spec `spec.md` of `erofs/erofs-image-spec`): its
//! media types and annotations, what a producer writes (§8.1, [`produce`]) and how a consumer
//! reads a manifest (§8.2, [`classify`]).
//!
//! vmrootfs produces one `application/vnd.erofs[+zstd]` layer per stored blob, the lower ones
//! with role `overlay-lower` and the top one role-less (the spec's multi-layer example, §11.1),
//! `os.features: ["erofs"]` in the config and `rootfs.diff_ids` of the EROFS layers. Its own
//! annotations (`dev.vmrootfs.*`) record what a consumer needs to reuse blobs safely: which
//! tar layer (chain ID, diff ID) a blob was made from, with which recipe and tool, and from
//! which source manifest.

use std::collections::BTreeMap;

use oci_spec::image::Digest;

pub const MEDIA_TYPE: &str = "application/vnd.erofs";
pub const MEDIA_TYPE_ZSTD: &str = "application/vnd.erofs+zstd";
pub const MEDIA_TYPE_CHUNK_INDEX: &str = "application/vnd.erofs.chunk-index.v1";
pub const OS_FEATURE: &str = "erofs";

pub const ROLE: &str = "org.erofs.role";
pub const UNCOMPRESSED_DIGEST: &str = "org.erofs.uncompressed-digest";
pub const VERITY_HASH_OFFSET: &str = "org.erofs.dmverity.hash_offset";
pub const VERITY_ROOT_DIGEST: &str = "org.erofs.dmverity.root_digest";
pub const VERITY_BLOCK_SIZE: &str = "org.erofs.dmverity.block_size";
pub const CHUNK_INDEX_TARGET: &str = "org.erofs.chunk-index.target";

/// The tar layer's chain ID a blob was converted from (its store key).
pub const SOURCE_CHAIN_ID: &str = "dev.vmrootfs.source.chain-id";
/// The tar layer's diff ID a blob was converted from.
pub const SOURCE_DIFF_ID: &str = "dev.vmrootfs.source.diff-id";
/// The tar layer's (compressed) digest in the source manifest.
pub const SOURCE_DIGEST: &str = "dev.vmrootfs.source.digest";
/// The manifest the image was converted from (also its `subject`, for registry sources).
pub const SOURCE_MANIFEST: &str = "dev.vmrootfs.source.manifest";
/// vmrootfs's recipe version of the blobs (`FsType::recipe`).
pub const RECIPE: &str = "dev.vmrootfs.recipe";
/// The tool that made a blob, e.g. `mkfs.erofs 1.8.6`.
pub const TOOL: &str = "dev.vmrootfs.tool";

/// How a layer takes part in composition (§2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Role-less or `overlay-lower`: an overlayfs lowerdir.
    Lower,
    /// A standalone chunk index: skipped (vmrootfs reads layers sequentially).
    ChunkIndex,
}

/// One manifest layer as the consumer rules classify it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErofsLayer {
    pub role: Role,
    /// Whether the blob is zstd-compressed (`+zstd`).
    pub zstd: bool,
    /// The layer's DiffID: the digest of its uncompressed image data.
    pub diff_id: Digest,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    #[error("layer {index} has media type {media_type:?}: an EROFS image holds only EROFS layers")]
    UnknownMediaType { index: usize, media_type: String },
    #[error(
        "layer {index} has role {role:?}: vmrootfs composes overlay stacks only (device and overlay-data layers are not supported)"
    )]
    UnsupportedRole { index: usize, role: String },
    #[error("layer {index} has an unknown role {role:?}")]
    UnknownRole { index: usize, role: String },
    #[error("layer {index} ({what}) is last: the last layer must be a mountable EROFS layer (spec §3.8)")]
    NotMountableLast { index: usize, what: String },
    #[error("layer {index}: a chunk-index layer cannot come first (spec §3.8)")]
    ChunkIndexFirst { index: usize },
    #[error("layer {index}: its chunk-index target {target} is not the layer before it ({before})")]
    ChunkIndexTarget { index: usize, target: String, before: String },
    #[error("layer {index} has no DiffID: neither {UNCOMPRESSED_DIGEST} nor a rootfs.diff_ids entry")]
    NoDiffId { index: usize },
    #[error(
        "layer {index}: its {UNCOMPRESSED_DIGEST} must equal its digest for a raw layer ({annotated} ≠ {digest})"
    )]
    RawDigestMismatch { index: usize, annotated: String, digest: String },
    #[error("layer {index}: annotation {key} = {value:?} is not {expected}")]
    BadAnnotation { index: usize, key: String, value: String, expected: String },
    #[error("the config's os.features lacks \"erofs\", but its layers are EROFS layers")]
    NoOsFeature,
    #[error("the image has no layers")]
    NoLayers,
}

/// Whether a manifest's layers are EROFS layers (its first layer's media type decides; a mix
/// is refused by [`classify`]).
pub fn is_erofs_manifest(layer_media_types: &[&str]) -> bool {
    layer_media_types.first().is_some_and(|m| m.starts_with(MEDIA_TYPE))
}

/// One layer descriptor as [`classify`] reads it.
pub struct Descriptor<'a> {
    pub media_type: &'a str,
    pub digest: &'a Digest,
    pub annotations: &'a BTreeMap<String, String>,
}

/// Classifies an EROFS manifest's layers by the consumer rules (§8.2): DiffIDs from
/// `org.erofs.uncompressed-digest`, else `rootfs.diff_ids`; unknown media types and roles
/// refused; ordering rules checked; standalone chunk-index layers kept (for the ChainID) but
/// marked to be skipped; unknown `org.erofs.*` annotations ignored.
pub fn classify(
    layers: &[Descriptor<'_>],
    config_diff_ids: Option<&[Digest]>,
    os_features: &[String],
) -> Result<Vec<ErofsLayer>, FormatError> {
    if layers.is_empty() {
        return Err(FormatError::NoLayers);
    }
    if !os_features.iter().any(|f| f == OS_FEATURE) {
        return Err(FormatError::NoOsFeature);
    }
    let last = layers.len() - 1;
    if layers[last].annotations.get(ROLE).is_some_and(|r| r == "device" || r == "overlay-data") {
        let role = &layers[last].annotations[ROLE];
        return Err(FormatError::NotMountableLast { index: last, what: format!("role {role}") });
    }
    let mut out = Vec::with_capacity(layers.len());
    for (index, l) in layers.iter().enumerate() {
        let role = match l.media_type {
            MEDIA_TYPE | MEDIA_TYPE_ZSTD => match l.annotations.get(ROLE).map(String::as_str) {
                None | Some("overlay-lower") => Role::Lower,
                Some(r @ ("device" | "overlay-data")) => {
                    return Err(FormatError::UnsupportedRole { index, role: r.to_string() });
                }
                Some(r) => return Err(FormatError::UnknownRole { index, role: r.to_string() }),
            },
            MEDIA_TYPE_CHUNK_INDEX => {
                if index == 0 {
                    return Err(FormatError::ChunkIndexFirst { index });
                }
                if let Some(target) = l.annotations.get(CHUNK_INDEX_TARGET) {
                    let before = layers[index - 1].digest.to_string();
                    if *target != before {
                        return Err(FormatError::ChunkIndexTarget { index, target: target.clone(), before });
                    }
                }
                Role::ChunkIndex
            }
            other if l.annotations.get(ROLE).is_some_and(|r| r == "device") => {
                return Err(FormatError::UnsupportedRole { index, role: format!("device ({other})") });
            }
            other => return Err(FormatError::UnknownMediaType { index, media_type: other.to_string() }),
        };
        let zstd = l.media_type == MEDIA_TYPE_ZSTD;
        let annotated = match l.annotations.get(UNCOMPRESSED_DIGEST) {
            Some(v) => Some(v.parse::<Digest>().map_err(|_| FormatError::BadAnnotation {
                index,
                key: UNCOMPRESSED_DIGEST.into(),
                value: v.clone(),
                expected: "a digest".into(),
            })?),
            None => None,
        };
        let diff_id = match (annotated, config_diff_ids.and_then(|d| d.get(index))) {
            (Some(d), _) => d,
            (None, Some(d)) => d.clone(),
            // A raw layer's DiffID is its digest (§5.2).
            (None, None) if !zstd => l.digest.clone(),
            (None, None) => return Err(FormatError::NoDiffId { index }),
        };
        if !zstd && role == Role::Lower && diff_id != *l.digest {
            return Err(FormatError::RawDigestMismatch {
                index,
                annotated: diff_id.to_string(),
                digest: l.digest.to_string(),
            });
        }
        for key in [VERITY_HASH_OFFSET, VERITY_BLOCK_SIZE] {
            if let Some(v) = l.annotations.get(key)
                && v.parse::<u64>().is_err()
            {
                return Err(FormatError::BadAnnotation {
                    index,
                    key: key.into(),
                    value: v.clone(),
                    expected: "a decimal integer".into(),
                });
            }
        }
        out.push(ErofsLayer { role, zstd, diff_id });
    }
    if out[last].role != Role::Lower {
        return Err(FormatError::NotMountableLast { index: last, what: layers[last].media_type.to_string() });
    }
    Ok(out)
}

/// What [`produce`] needs of one stored blob.
pub struct ProducedLayer {
    /// Digest and size of the blob as published (compressed for `+zstd`).
    pub digest: Digest,
    pub size: u64,
    /// sha256 of the uncompressed blob: its DiffID.
    pub diff_id: Digest,
    pub zstd: bool,
    /// The tar layer it was made from: chain ID, diff ID, digest.
    pub source_chain_id: Digest,
    pub source_diff_id: Digest,
    pub source_digest: Digest,
    pub recipe: u32,
    pub tool: String,
    /// `(hash_offset, root digest)` of an appended dm-verity tree.
    pub verity: Option<(u64, String)>,
}

/// The layer descriptors (§8.1): media type, role, uncompressed digest, dm-verity and
/// vmrootfs annotations, in manifest order.
pub fn produce(layers: &[ProducedLayer]) -> Vec<serde_json::Value> {
    let last = layers.len().saturating_sub(1);
    layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut a = BTreeMap::new();
            if i < last {
                a.insert(ROLE, "overlay-lower".to_string());
            }
            if l.zstd {
                a.insert(UNCOMPRESSED_DIGEST, l.diff_id.to_string());
            }
            if let Some((offset, root)) = &l.verity {
                a.insert(VERITY_HASH_OFFSET, offset.to_string());
                a.insert(VERITY_ROOT_DIGEST, root.clone());
                a.insert(VERITY_BLOCK_SIZE, "4096".to_string());
            }
            a.insert(SOURCE_CHAIN_ID, l.source_chain_id.to_string());
            a.insert(SOURCE_DIFF_ID, l.source_diff_id.to_string());
            a.insert(SOURCE_DIGEST, l.source_digest.to_string());
            a.insert(RECIPE, l.recipe.to_string());
            a.insert(TOOL, l.tool.clone());
            serde_json::json!({
                "mediaType": if l.zstd { MEDIA_TYPE_ZSTD } else { MEDIA_TYPE },
                "digest": l.digest.to_string(),
                "size": l.size,
                "annotations": a,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64)).parse().unwrap()
    }

    fn classify_one(media: &str, ann: &[(&str, &str)]) -> Result<Vec<ErofsLayer>, FormatError> {
        let a: BTreeMap<String, String> = ann.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let digest = d('a');
        classify(
            &[Descriptor { media_type: media, digest: &digest, annotations: &a }],
            None,
            &["erofs".into()],
        )
    }

    #[test]
    fn a_raw_layer_is_its_own_diff_id_and_zstd_needs_one() {
        let l = classify_one(MEDIA_TYPE, &[]).unwrap();
        assert_eq!(l[0].diff_id, d('a'));
        assert!(matches!(classify_one(MEDIA_TYPE_ZSTD, &[]), Err(FormatError::NoDiffId { index: 0 })));
        let b = d('b').to_string();
        let l = classify_one(MEDIA_TYPE_ZSTD, &[(UNCOMPRESSED_DIGEST, &b)]).unwrap();
        assert_eq!((l[0].diff_id.clone(), l[0].zstd), (d('b'), true));
        assert!(matches!(
            classify_one(MEDIA_TYPE, &[(UNCOMPRESSED_DIGEST, &b)]),
            Err(FormatError::RawDigestMismatch { .. })
        ));
    }

    #[test]
    fn unknown_annotations_pass_and_bad_values_do_not() {
        assert!(classify_one(MEDIA_TYPE, &[("org.erofs.future-thing", "x")]).is_ok());
        assert!(matches!(
            classify_one(MEDIA_TYPE, &[(VERITY_HASH_OFFSET, "12k")]),
            Err(FormatError::BadAnnotation { .. })
        ));
        assert!(matches!(
            classify_one(MEDIA_TYPE, &[(ROLE, "sidecar")]),
            Err(FormatError::UnknownRole { .. })
        ));
    }
}

//! The EROFS image layer format (the draft spec `spec.md` of `erofs/erofs-image-spec`): its
//! media types and annotations, what a producer writes (§8.1, [`produce`]) and how a consumer
//! reads a manifest (§8.2, [`classify`]).
//!
//! Three spellings of the layer media type are in use ([`MediaTypes`]): the draft's
//! `application/vnd.erofs[+zstd]`, containerd ≥ 2.3's `application/vnd.erofs.layer.v1[+zstd]`
//! (its converter, `core/images/converter/erofs`) and containerd 2.1's
//! `application/vnd.oci.image.layer.v1.erofs` (raw only: its differ takes a media type ending
//! in `.erofs` with no `+` suffix). [`classify`] reads all three by the draft's rules; the
//! containerd families have no roles, so a role-less layer below the top is an overlay lower,
//! as the draft says of its own role-less layers.
//!
//! vmrootfs produces one layer per stored blob in the spelling asked for, in the draft's the
//! lower ones with role `overlay-lower` and the top one role-less (the spec's multi-layer
//! example, §11.1), `os.features: ["erofs"]` in the config and `rootfs.diff_ids` of the EROFS
//! layers. Its own annotations (`dev.vmrootfs.*`) record what a consumer needs to reuse blobs
//! safely: which tar layer (chain ID, diff ID) a blob was made from, with which recipe and
//! tool, and from which source manifest.

use std::collections::BTreeMap;

use oci_spec::image::Digest;

pub const MEDIA_TYPE: &str = "application/vnd.erofs";
pub const MEDIA_TYPE_ZSTD: &str = "application/vnd.erofs+zstd";
/// containerd ≥ 2.3's spelling (`images.MediaTypeErofsLayer`), `+zstd` when compressed.
pub const MEDIA_TYPE_CONTAINERD: &str = "application/vnd.erofs.layer.v1";
pub const MEDIA_TYPE_CONTAINERD_ZSTD: &str = "application/vnd.erofs.layer.v1+zstd";
/// containerd 2.1's spelling: an OCI layer type ending in `.erofs`, raw only.
pub const MEDIA_TYPE_CONTAINERD_2_1: &str = "application/vnd.oci.image.layer.v1.erofs";
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

/// A spelling of the EROFS layer media types (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MediaTypes {
    /// The draft spec's `application/vnd.erofs[+zstd]`, with `org.erofs.role` annotations.
    Spec,
    /// containerd ≥ 2.3's `application/vnd.erofs.layer.v1[+zstd]`.
    Containerd,
    /// containerd 2.1's `application/vnd.oci.image.layer.v1.erofs` (raw layers only).
    #[value(name = "containerd-2.1")]
    Containerd21,
}

impl MediaTypes {
    /// The spelling `push` uses when none is asked for: the one the most consumers read
    /// (README, "Convert once, pull everywhere"). Raw layers: containerd 2.1's, which
    /// containerd 2.1 and 2.2 read (≥ 2.3 reads only its own); `+zstd`: containerd ≥ 2.3's,
    /// the only compressed spelling any containerd reads.
    pub fn default_for(zstd: bool) -> MediaTypes {
        if zstd { MediaTypes::Containerd } else { MediaTypes::Containerd21 }
    }

    /// The layer media type in this spelling; `None` for `+zstd` in containerd 2.1's.
    pub fn layer(self, zstd: bool) -> Option<&'static str> {
        match (self, zstd) {
            (MediaTypes::Spec, false) => Some(MEDIA_TYPE),
            (MediaTypes::Spec, true) => Some(MEDIA_TYPE_ZSTD),
            (MediaTypes::Containerd, false) => Some(MEDIA_TYPE_CONTAINERD),
            (MediaTypes::Containerd, true) => Some(MEDIA_TYPE_CONTAINERD_ZSTD),
            (MediaTypes::Containerd21, false) => Some(MEDIA_TYPE_CONTAINERD_2_1),
            (MediaTypes::Containerd21, true) => None,
        }
    }

    /// The spelling and compression of a mountable EROFS layer media type.
    pub fn of(media_type: &str) -> Option<(MediaTypes, bool)> {
        [MediaTypes::Spec, MediaTypes::Containerd, MediaTypes::Containerd21]
            .into_iter()
            .flat_map(|m| [false, true].map(|zstd| (m, zstd)))
            .find(|&(m, zstd)| m.layer(zstd) == Some(media_type))
    }
}

/// Whether `media_type` claims to be an EROFS layer, known spelling or not.
fn looks_erofs(media_type: &str) -> bool {
    media_type.starts_with(MEDIA_TYPE) || media_type.starts_with(MEDIA_TYPE_CONTAINERD_2_1)
}

/// The dm-verity block sizes the kernel takes: powers of two from 512 bytes to the page size
/// (`dm-verity-target.c`, `verity_ctr`).
fn kernel_takes_verity_block(size: u64) -> bool {
    size.is_power_of_two() && (512..=page_size()).contains(&size)
}

fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

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
    #[error(
        "layer {index} has media type {media_type:?}: not an EROFS layer type vmrootfs reads ({MEDIA_TYPE}[+zstd], {MEDIA_TYPE_CONTAINERD}[+zstd], {MEDIA_TYPE_CONTAINERD_2_1})"
    )]
    UnknownSubtype { index: usize, media_type: String },
    #[error(
        "layer {index} has media type {media_type:?}: containerd 2.1's spelling has no compressed form (compressed EROFS layers are {MEDIA_TYPE_ZSTD} or {MEDIA_TYPE_CONTAINERD_ZSTD})"
    )]
    CompressedContainerd21 { index: usize, media_type: String },
    #[error(
        "layer {index}: dm-verity block size {size} (org.erofs.dmverity.block_size) is one the kernel's dm-verity cannot take: a power of two from 512 bytes to the page size ({page} bytes here)"
    )]
    VerityBlockSize { index: usize, size: u64, page: u64 },
    #[error(
        "layer {index}: dm-verity block size {size} (org.erofs.dmverity.block_size): vmrootfs checks and opens trees of 4096-byte blocks only"
    )]
    VerityBlockSizeUnsupported { index: usize, size: u64 },
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

/// Whether a manifest's layers are EROFS layers, in any spelling (its first layer's media type
/// decides; a mix, and spellings vmrootfs does not know, are refused by [`classify`]).
pub fn is_erofs_manifest(layer_media_types: &[&str]) -> bool {
    layer_media_types.first().is_some_and(|m| looks_erofs(m))
}

/// One layer descriptor as [`classify`] reads it.
pub struct Descriptor<'a> {
    pub media_type: &'a str,
    pub digest: &'a Digest,
    pub annotations: &'a BTreeMap<String, String>,
}

/// Classifies an EROFS manifest's layers by the consumer rules (§8.2), in any of the three
/// spellings: DiffIDs from `org.erofs.uncompressed-digest`, else `rootfs.diff_ids` (a config
/// may have none: a raw layer's DiffID is then its digest); unknown media types, subtypes and
/// roles refused, a role-less layer being an overlay lower; ordering rules checked; standalone
/// chunk-index layers kept (for the ChainID) but marked to be skipped; a dm-verity block size
/// checked against what the kernel and vmrootfs take; unknown `org.erofs.*` annotations
/// ignored.
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
        let spelled = MediaTypes::of(l.media_type);
        let role = match (spelled, l.media_type) {
            (Some(_), _) => match l.annotations.get(ROLE).map(String::as_str) {
                None | Some("overlay-lower") => Role::Lower,
                Some(r @ ("device" | "overlay-data")) => {
                    return Err(FormatError::UnsupportedRole { index, role: r.to_string() });
                }
                Some(r) => return Err(FormatError::UnknownRole { index, role: r.to_string() }),
            },
            (None, MEDIA_TYPE_CHUNK_INDEX) => {
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
            (None, other) if l.annotations.get(ROLE).is_some_and(|r| r == "device") => {
                return Err(FormatError::UnsupportedRole { index, role: format!("device ({other})") });
            }
            (None, other) if other.starts_with(MEDIA_TYPE_CONTAINERD_2_1) && other.ends_with("+zstd") => {
                return Err(FormatError::CompressedContainerd21 { index, media_type: other.to_string() });
            }
            (None, other) if looks_erofs(other) => {
                return Err(FormatError::UnknownSubtype { index, media_type: other.to_string() });
            }
            (None, other) => {
                return Err(FormatError::UnknownMediaType { index, media_type: other.to_string() });
            }
        };
        let zstd = spelled.is_some_and(|(_, zstd)| zstd);
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
        if let Some(size) = l.annotations.get(VERITY_BLOCK_SIZE).and_then(|v| v.parse::<u64>().ok()) {
            if !kernel_takes_verity_block(size) {
                return Err(FormatError::VerityBlockSize { index, size, page: page_size() });
            }
            if size != crate::verity::BLOCK_SIZE {
                return Err(FormatError::VerityBlockSizeUnsupported { index, size });
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

/// The layer descriptors (§8.1) in the spelling `media_types`: media type, role (the draft's
/// spelling only: the containerd families have none), uncompressed digest, dm-verity and
/// vmrootfs annotations, in manifest order. `None` for `+zstd` layers in containerd 2.1's
/// spelling, which has no compressed form.
pub fn produce(layers: &[ProducedLayer], media_types: MediaTypes) -> Option<Vec<serde_json::Value>> {
    let last = layers.len().saturating_sub(1);
    layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut a = BTreeMap::new();
            if i < last && media_types == MediaTypes::Spec {
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
            Some(serde_json::json!({
                "mediaType": media_types.layer(l.zstd)?,
                "digest": l.digest.to_string(),
                "size": l.size,
                "annotations": a,
            }))
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

    #[test]
    fn every_spelling_reads_and_spells_back() {
        let table = [
            (MEDIA_TYPE, MediaTypes::Spec, false),
            (MEDIA_TYPE_ZSTD, MediaTypes::Spec, true),
            (MEDIA_TYPE_CONTAINERD, MediaTypes::Containerd, false),
            (MEDIA_TYPE_CONTAINERD_ZSTD, MediaTypes::Containerd, true),
            (MEDIA_TYPE_CONTAINERD_2_1, MediaTypes::Containerd21, false),
        ];
        let b = d('b').to_string();
        for (media, spelling, zstd) in table {
            assert_eq!(MediaTypes::of(media), Some((spelling, zstd)), "{media}");
            assert_eq!(spelling.layer(zstd), Some(media));
            let l = classify_one(
                media,
                &[(
                    UNCOMPRESSED_DIGEST,
                    if zstd {
                        &b
                    } else {
                        "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                    },
                )],
            )
            .unwrap_or_else(|e| panic!("{media}: {e}"));
            assert_eq!((l[0].role, l[0].zstd), (Role::Lower, zstd), "{media}");
        }
        assert_eq!(MediaTypes::Containerd21.layer(true), None);
        assert!(
            is_erofs_manifest(&[MEDIA_TYPE_CONTAINERD_2_1])
                && is_erofs_manifest(&["application/vnd.erofs.layer.v9"])
        );
        assert!(!is_erofs_manifest(&["application/vnd.oci.image.layer.v1.tar+gzip"]));
    }

    #[test]
    fn unknown_subtypes_and_compressed_containerd_2_1_are_refused() {
        for media in [
            "application/vnd.erofs.layer.v2",
            "application/vnd.erofs+gzip",
            "application/vnd.erofs.layer.v1+lz4",
            "application/vnd.oci.image.layer.v1.erofs.x",
        ] {
            assert!(matches!(classify_one(media, &[]), Err(FormatError::UnknownSubtype { .. })), "{media}");
        }
        assert!(matches!(
            classify_one("application/vnd.oci.image.layer.v1.erofs+zstd", &[]),
            Err(FormatError::CompressedContainerd21 { .. })
        ));
    }

    #[test]
    fn verity_block_sizes_the_kernel_cannot_take_are_refused() {
        for size in ["8192", "65536", "3000", "256", "0"] {
            assert!(
                matches!(
                    classify_one(MEDIA_TYPE, &[(VERITY_BLOCK_SIZE, size)]),
                    Err(FormatError::VerityBlockSize { .. })
                ),
                "{size}"
            );
        }
        assert!(matches!(
            classify_one(MEDIA_TYPE, &[(VERITY_BLOCK_SIZE, "512")]),
            Err(FormatError::VerityBlockSizeUnsupported { size: 512, .. })
        ));
        assert!(classify_one(MEDIA_TYPE, &[(VERITY_BLOCK_SIZE, "4096")]).is_ok());
    }
}

//! `docker save` archives (`docker-archive:FILE[:REF]`): `manifest.json` names a config and
//! layer tars per image.

use std::io::Read;
use std::path::PathBuf;

use oci_spec::image::Digest;
use serde::Deserialize;

use super::archive::TarArchive;
use super::oci::config_platform;
use super::{ImageSource, LayerRef, ResolvedImage, SourceError, diff_ids, read_json};
use crate::digest::{self, HashingReader};
use crate::platform::Platform;

#[derive(Debug, Deserialize)]
struct ManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

pub struct DockerArchive {
    archive: TarArchive,
    reference: Option<String>,
    spec: String,
}

/// The content digest a member name promises: `<hex>.tar`, `<hex>.json`,
/// `blobs/sha256/<hex>` (docker ≥ 25 writes OCI-style names).
fn digest_from_name(name: &str) -> Option<Digest> {
    let base = name.rsplit('/').next()?;
    let hex = base.strip_suffix(".tar").or_else(|| base.strip_suffix(".json")).unwrap_or(base);
    let is_blob_path = name.contains("blobs/sha256/") || base.len() != hex.len();
    (is_blob_path && hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("sha256:{}", hex.to_ascii_lowercase()).parse().ok())
        .flatten()
}

/// A reference as docker completes it (`app` → `docker.io/library/app:latest`).
fn canonical(reference: &str) -> Option<String> {
    super::reference::parse(reference).ok().map(|r| r.whole())
}

impl DockerArchive {
    pub fn open(path: PathBuf, reference: Option<String>) -> Result<Self, SourceError> {
        let archive = TarArchive::open(&path)?;
        let abs = std::path::absolute(&path).unwrap_or(path);
        let spec = match &reference {
            Some(r) => format!("docker-archive:{}:{r}", abs.display()),
            None => format!("docker-archive:{}", abs.display()),
        };
        Ok(DockerArchive { archive, reference, spec })
    }

    fn pick<'m>(&self, entries: &'m [ManifestEntry]) -> Result<&'m ManifestEntry, SourceError> {
        let tags: Vec<String> =
            entries.iter().flat_map(|e| e.repo_tags.clone().unwrap_or_default()).collect();
        match &self.reference {
            Some(r) => {
                if let Some(i) = r.strip_prefix('@').and_then(|i| i.parse::<usize>().ok())
                    && let Some(e) = entries.get(i)
                {
                    return Ok(e);
                }
                let with_latest = format!("{r}:latest");
                // `lab/base` and `docker.io/lab/base:latest` are one name, as docker spells them.
                let wanted = canonical(r);
                entries
                    .iter()
                    .find(|e| {
                        e.repo_tags.iter().flatten().any(|t| {
                            t == r
                                || *t == with_latest
                                || t.ends_with(&format!("/{r}"))
                                || wanted.is_some() && canonical(t) == wanted
                        })
                    })
                    .ok_or_else(|| SourceError::NoSuchImage {
                        wanted: r.clone(),
                        source_name: self.spec.clone(),
                        available: if tags.is_empty() {
                            "(untagged images; use @0, @1, …)".into()
                        } else {
                            tags.join(", ")
                        },
                    })
            }
            None if entries.len() == 1 => Ok(&entries[0]),
            None => Err(SourceError::Ambiguous {
                source_name: self.spec.clone(),
                available: tags.join(", "),
                example: format!("{}:{}", self.spec, tags.first().map(String::as_str).unwrap_or("@0")),
            }),
        }
    }
}

impl ImageSource for DockerArchive {
    fn describe(&self) -> String {
        self.spec.clone()
    }

    /// A docker archive holds one platform's image: it must be the one asked for (as an index
    /// entry of another platform would not be taken either).
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, SourceError> {
        let (entries, _): (Vec<ManifestEntry>, _) =
            read_json(self.archive.member("manifest.json")?, "manifest.json")?;
        let entry = self.pick(&entries)?;
        let (super::ConfigJson(config), bytes) =
            read_json(self.archive.member(&entry.config)?, &entry.config)?;
        let config_digest = digest::sha256_of(&bytes);
        if let Some(expected) = digest_from_name(&entry.config) {
            digest::check("config", &expected, &config_digest)?;
        }
        super::check_config_platform(&config, platform, &self.spec)?;
        let mut layers = Vec::with_capacity(entry.layers.len());
        for name in &entry.layers {
            let digest = match digest_from_name(name) {
                Some(d) => d,
                // Legacy `<id>/layer.tar` names say nothing about the content: hash it once.
                None => {
                    let mut r = HashingReader::new(self.archive.member(name)?);
                    std::io::copy(&mut r, &mut std::io::sink()).map_err(super::io_at(self.archive.path()))?;
                    r.finish().map_err(super::io_at(self.archive.path()))?.0
                }
            };
            layers.push(LayerRef {
                media_type: "application/vnd.docker.image.rootfs.diff.tar".to_string(),
                digest,
                size: None,
                annotations: Default::default(),
                location: name.clone(),
            });
        }
        let diff_ids = diff_ids(&config, layers.len())?;
        Ok(ResolvedImage {
            // A docker archive has no registry manifest; its image ID is the config digest.
            manifest_digest: config_digest.clone(),
            config_digest,
            platform: config_platform(&config),
            config,
            config_bytes: bytes,
            manifest_bytes: None,
            layers,
            diff_ids,
            erofs: None,
        })
    }

    fn open_layer(&self, layer: &LayerRef) -> Result<Box<dyn Read + Send + '_>, SourceError> {
        Ok(Box::new(self.archive.member(&layer.location)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_from_name_table() {
        let hex = "ab".repeat(32);
        assert!(digest_from_name(&format!("{hex}.tar")).is_some());
        assert!(digest_from_name(&format!("blobs/sha256/{hex}")).is_some());
        assert!(digest_from_name(&format!("{hex}/layer.tar")).is_none());
        assert!(digest_from_name("short.tar").is_none());
    }
}

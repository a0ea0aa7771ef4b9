//! OCI image layouts, as a directory (`oci:`) or a tar of one (`oci-archive:`).

use std::io::Read;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest};

use super::archive::TarArchive;
use super::{ImageSource, LayerRef, ResolvedImage, SourceError, io_at, read_json};
use crate::digest;
use crate::platform::Platform;

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const INDEX_TYPES: &[&str] =
    &["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];
const MANIFEST_TYPES: &[&str] =
    &["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"];

enum Layout {
    Dir(PathBuf),
    Archive(TarArchive),
}

impl Layout {
    fn open(&self, rel: &str) -> Result<Box<dyn Read + Send + '_>, SourceError> {
        match self {
            Layout::Dir(dir) => {
                let path = dir.join(rel);
                Ok(Box::new(std::io::BufReader::with_capacity(
                    256 * 1024,
                    fs_err::File::open(&path).map_err(io_at(&path))?,
                )))
            }
            Layout::Archive(a) => Ok(Box::new(a.member(rel)?)),
        }
    }

    fn exists(&self, rel: &str) -> bool {
        match self {
            Layout::Dir(dir) => dir.join(rel).is_file(),
            Layout::Archive(a) => a.contains(rel),
        }
    }
}

/// Path of a blob inside a layout, built from a validated digest only.
fn blob_path(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm(), d.digest())
}

/// An OCI image layout.
pub struct OciSource {
    layout: Layout,
    tag: Option<String>,
    spec: String,
}

impl OciSource {
    pub fn dir(path: PathBuf, tag: Option<String>) -> Result<Self, SourceError> {
        let index = path.join("index.json");
        fs_err::metadata(&index).map_err(io_at(&index))?;
        let spec = describe("oci", &path, &tag);
        Ok(OciSource { layout: Layout::Dir(path), tag, spec })
    }

    pub fn archive(path: PathBuf, tag: Option<String>) -> Result<Self, SourceError> {
        let archive = TarArchive::open(&path)?;
        let spec = describe("oci-archive", &path, &tag);
        Ok(OciSource { layout: Layout::Archive(archive), tag, spec })
    }

    /// Reads a small blob and checks it against its descriptor.
    fn read_blob<T: serde::de::DeserializeOwned>(
        &self,
        desc: &Descriptor,
        what: &str,
    ) -> Result<(T, Vec<u8>), SourceError> {
        let rel = blob_path(desc.digest());
        if !self.layout.exists(&rel) {
            return Err(SourceError::MissingBlob(desc.digest().to_string()));
        }
        let (value, bytes): (T, Vec<u8>) =
            read_json(self.layout.open(&rel)?, &format!("{what} {}", desc.digest()))?;
        digest::check("manifest/config", desc.digest(), &digest::sha256_of(&bytes))?;
        Ok((value, bytes))
    }

    fn pick_manifest(&self, index: &ImageIndex) -> Result<Descriptor, SourceError> {
        let name_of = |d: &Descriptor| d.annotations().as_ref().and_then(|a| a.get(REF_NAME).cloned());
        let names: Vec<String> = index.manifests().iter().filter_map(name_of).collect();
        match &self.tag {
            Some(tag) => {
                index.manifests().iter().find(|d| name_of(d).as_deref() == Some(tag)).cloned().ok_or_else(
                    || SourceError::NoSuchImage {
                        wanted: tag.clone(),
                        source_name: self.spec.clone(),
                        available: list(&names),
                    },
                )
            }
            None if index.manifests().len() == 1 => Ok(index.manifests()[0].clone()),
            None => Err(SourceError::Ambiguous {
                source_name: self.spec.clone(),
                available: list(&names),
                example: format!("{}:{}", self.spec, names.first().map(String::as_str).unwrap_or("TAG")),
            }),
        }
    }
}

fn describe(transport: &str, path: &Path, tag: &Option<String>) -> String {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    match tag {
        Some(t) => format!("{transport}:{}:{t}", abs.display()),
        None => format!("{transport}:{}", abs.display()),
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() { "(no named images)".to_string() } else { names.join(", ") }
}

impl ImageSource for OciSource {
    fn describe(&self) -> String {
        self.spec.clone()
    }

    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, SourceError> {
        let (index, _): (ImageIndex, _) = read_json(self.layout.open("index.json")?, "index.json")?;
        let mut desc = self.pick_manifest(&index)?;
        let mut via_index = false;
        for _ in 0..4 {
            let media_type = desc.media_type().to_string();
            if INDEX_TYPES.contains(&media_type.as_str()) {
                let (nested, _): (ImageIndex, _) = self.read_blob(&desc, "index")?;
                desc = select_platform(&nested, platform)?;
                via_index = true;
                continue;
            }
            if !MANIFEST_TYPES.contains(&media_type.as_str()) {
                return Err(SourceError::UnsupportedManifest(media_type));
            }
            let (manifest, manifest_bytes): (ImageManifest, _) = self.read_blob(&desc, "manifest")?;
            let (super::ConfigJson(config), config_bytes) = self.read_blob(manifest.config(), "config")?;
            if !via_index {
                super::check_config_platform(&config, platform, &self.describe())?;
            }
            return ResolvedImage::from_manifest(
                desc.digest().clone(),
                manifest_bytes,
                &manifest,
                (config, config_bytes),
                blob_path,
            );
        }
        Err(SourceError::UnsupportedManifest("index nested too deeply".to_string()))
    }

    fn locate_by_digest(&self, layer: LayerRef) -> Option<LayerRef> {
        let location = blob_path(&layer.digest);
        self.layout.exists(&location).then_some(LayerRef { location, ..layer })
    }

    fn open_layer(&self, layer: &LayerRef) -> Result<Box<dyn Read + Send + '_>, SourceError> {
        if !self.layout.exists(&layer.location) {
            return Err(SourceError::MissingBlob(layer.digest.to_string()));
        }
        self.layout.open(&layer.location)
    }
}

/// An OCI or Docker schema-2 image manifest media type.
pub(crate) fn is_manifest_type(media_type: &str) -> bool {
    MANIFEST_TYPES.contains(&media_type)
}

/// `os/arch[/variant]` of a config.
pub(crate) fn config_platform(config: &ImageConfiguration) -> String {
    match config.variant() {
        Some(v) => format!("{}/{}/{v}", config.os(), config.architecture()),
        None => format!("{}/{}", config.os(), config.architecture()),
    }
}

/// The index entry for `platform`; the error lists what the index has.
pub fn select_platform(index: &ImageIndex, platform: &Platform) -> Result<Descriptor, SourceError> {
    let mut available = Vec::new();
    for d in index.manifests() {
        let Some(p) = d.platform() else { continue };
        let (os, arch) = (p.os().to_string(), p.architecture().to_string());
        if platform.matches(&os, &arch, p.variant().as_deref()) {
            return Ok(d.clone());
        }
        available.push(match p.variant() {
            Some(v) => format!("{os}/{arch}/{v}"),
            None => format!("{os}/{arch}"),
        });
    }
    Err(SourceError::NoPlatform { wanted: platform.to_string(), available: list(&available) })
}

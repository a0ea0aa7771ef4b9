//! EROFS written by vmrootfs itself ([`crate::erofs::write`]), given the normalized layer's
//! entries as they come: the same bytes on every host, holes kept, no external tool.

use std::path::Path;

use oci_spec::image::Digest;

use super::BackendError;
use super::native::EntryWriter;
use crate::erofs::write::ImageWriter;
use crate::layer::meta::EntryMeta;
use crate::layer::normalize::EntryKind;

#[derive(Debug, Clone)]
pub struct ErofsNative;

impl ErofsNative {
    pub fn describe(&self) -> String {
        format!("vmrootfs {} erofs writer", env!("CARGO_PKG_VERSION"))
    }

    /// A writer of the image `out`, its UUID from `chain_id`.
    pub fn create(&self, chain_id: &Digest, out: &Path) -> Result<ImageWriter, BackendError> {
        ImageWriter::create(out, super::uuid_bytes(chain_id, 0))
            .map_err(|source| BackendError::Write { path: out.to_owned(), source })
    }
}

impl EntryWriter for ImageWriter {
    fn add(&mut self, path: &[u8], entry: EntryKind<'_>, meta: &EntryMeta) -> Result<(), BackendError> {
        Ok(ImageWriter::add(self, path, entry, meta)?)
    }

    fn finish(self) -> Result<(), BackendError> {
        Ok(ImageWriter::finish(self)?)
    }
}

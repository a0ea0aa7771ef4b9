//! ext4, written by vmrootfs itself: the normalized layer's entries go into the image as they
//! come ([`image::ImageWriter`]): file data straight to its final place, the metadata once the
//! stream ends. No external tool, no spool, no root, no second pass over the data; see
//! [`image`] for the layout and [`disk`] for the structures.

pub mod disk;
pub mod htree;
pub mod image;

use std::path::Path;

use oci_spec::image::Digest;

use super::BackendError;
use super::native::EntryWriter;
use crate::layer::meta::EntryMeta;
use crate::layer::normalize::EntryKind;
pub use image::Ext4Error;
use image::ImageWriter;

#[derive(Debug, Clone)]
pub struct Ext4;

impl Ext4 {
    pub fn describe(&self) -> String {
        format!("vmrootfs {} ext4 writer", env!("CARGO_PKG_VERSION"))
    }

    /// A writer of the image `out`, its UUID and directory hash seed from `chain_id`.
    pub fn create(&self, chain_id: &Digest, out: &Path) -> Result<ImageWriter, BackendError> {
        ImageWriter::create(out, super::uuid_bytes(chain_id, 0), super::uuid_bytes(chain_id, 16))
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

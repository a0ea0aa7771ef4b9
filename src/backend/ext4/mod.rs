//! ext4, written by vmrootfs itself: a thread reads the layer's normalized stream from the
//! builder as it is written ([`native`]) and puts each entry into the image
//! ([`image::ImageWriter`]): file data straight to its final place, the metadata once the
//! stream ends. No external tool, no spool, no root, no second pass over the data; see
//! [`image`] for the layout and [`disk`] for the structures.

pub mod disk;
pub mod htree;
pub mod image;

use std::path::Path;

use oci_spec::image::Digest;

use super::BackendError;
use super::native::{self, EntryWriter, Streaming};
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

    /// Starts writing `out` from the stream then written into the returned [`Streaming`].
    /// UUID and directory hash seed come from `chain_id`.
    pub fn start(&self, chain_id: &Digest, out: &Path) -> Streaming {
        let uuid = super::uuid_bytes(chain_id, 0);
        let hash_seed = super::uuid_bytes(chain_id, 16);
        native::start("ext4-writer", out, move |out| {
            ImageWriter::create(out, uuid, hash_seed)
                .map_err(|source| BackendError::Write { path: out.to_owned(), source })
        })
    }
}

impl EntryWriter for ImageWriter {
    fn add(&mut self, path: &[u8], entry: EntryKind<'_>, meta: &EntryMeta) -> Result<(), BackendError> {
        Ok(ImageWriter::add(self, path, entry, meta)?)
    }

    fn finish(self) -> Result<(), BackendError> {
        Ok(ImageWriter::finish(self)?)
    }

    fn refused(path: String, problem: String) -> BackendError {
        Ext4Error::Entry { path, problem }.into()
    }
}

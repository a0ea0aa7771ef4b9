//! EROFS written by vmrootfs itself ([`crate::erofs::write`]) from the normalized stream, on a
//! thread ([`native`]): the same bytes on every host, holes kept, no external tool.

use std::path::Path;

use oci_spec::image::Digest;

use super::BackendError;
use super::native::{self, EntryWriter, Streaming};
use crate::erofs::write::{ErofsError, ImageWriter};
use crate::layer::meta::EntryMeta;
use crate::layer::normalize::EntryKind;

#[derive(Debug, Clone)]
pub struct ErofsNative;

impl ErofsNative {
    pub fn describe(&self) -> String {
        format!("vmrootfs {} erofs writer", env!("CARGO_PKG_VERSION"))
    }

    /// Starts writing `out` from the stream then written into the returned [`Streaming`].
    /// The UUID comes from `chain_id`.
    pub fn start(&self, chain_id: &Digest, out: &Path) -> Streaming {
        let uuid = super::uuid_bytes(chain_id, 0);
        native::start("erofs-writer", out, move |out| {
            ImageWriter::create(out, uuid)
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
        ErofsError::Entry { path, problem }.into()
    }
}

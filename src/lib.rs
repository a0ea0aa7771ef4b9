//! vmrootfs: OCI container images → read-only filesystem blobs, one per layer, for microVMs.
//!
//! PLACEHOLDER-OVERVIEW

mod backend;
mod builder;
mod digest;
mod erofs;
mod erofs_image;
#[cfg(test)]
mod heap_meter;
mod layer;
mod lock;
mod merge;
mod mountns;
mod platform;
pub mod progress;
mod pull;
pub mod push;
mod record;
mod source;
mod squash;
pub mod store;
mod verity;
pub mod vm;
mod writeback;

pub use backend::FsType;
pub use builder::{BuildError, BuildOptions, Builder, LayerFailure};
pub use platform::{InvalidPlatform, Platform};
pub use record::{
    BlobId, BlobKind, BuildResult, ImageRecord, Located, LocatedRecord, Lower, MergedBlob, RuntimeConfig,
    SquashedBlob,
};
pub use source::RegistryOptions;
pub use store::Store;
pub use verity::VerityInfo;

/// One disk for the whole image (`vmrootfs export --single-disk`): the merged blob of a
/// `build --merge` image followed by its layer blobs, as a raw file or a VMDK descriptor over
/// the stored blobs.
pub mod export {
    pub use crate::merge::MergeError;
    pub use crate::merge::disk::{DiskFormat, Exported, export};
}

/// Internals the mutation fuzzer (`tests/fuzz.rs`) drives directly: it feeds layer streams
/// to the normalizer and the filesystem writers without a store or a source. Not part of the
/// API; may change in any release.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::backend::Backend;
    pub use crate::digest::sha256_of;
    pub use crate::layer::dirindex::DirIndex;
    pub use crate::layer::normalize::Normalizer;
    pub use crate::layer::stream;
}

/// The EROFS reader, the merged tree and the merged-blob writer, which `tests/merge.rs` feeds
/// blobs directly (made by `mkfs.erofs`, or damaged and forged ones) to check each ends in a
/// merged image or one error naming the blob, without a store around them. Not part of the
/// API; may change in any release.
#[doc(hidden)]
pub mod erofs_merge {
    /// On-disk constants the hostile-blob tests forge fields with.
    pub mod format {
        pub use crate::erofs::format::{DataLayout, FT_DIR, chunk_format};
    }
    /// The reader.
    pub mod read {
        pub use crate::erofs::read::{Image, ReadError};
    }
    /// The merged tree of a stack of images.
    pub mod tree {
        pub use crate::merge::tree::{MergedTree, TreeError};
    }
    /// The merged-blob writer.
    pub mod write {
        pub use crate::merge::write::write;
    }
}

//! vmrootfs: OCI container images → read-only filesystem blobs, one per layer.

pub mod backend;
pub mod builder;
pub mod digest;
pub mod erofs;
pub mod erofs_image;
#[cfg(test)]
mod heap_meter;
pub mod layer;
pub mod lock;
pub mod merge;
pub mod mountns;
pub mod platform;
pub mod progress;
pub mod pull;
pub mod push;
pub mod record;
pub mod source;
pub mod squash;
pub mod store;
pub mod verity;
pub mod vm;
pub mod writeback;

pub use backend::FsType;
pub use builder::{BuildError, BuildOptions, Builder};
pub use platform::Platform;
pub use record::{BlobId, BuildResult, ImageRecord, LocatedRecord, Lower};
pub use store::Store;

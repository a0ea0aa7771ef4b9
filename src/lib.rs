//! vmrootfs: OCI container images → read-only filesystem blobs, one per layer.

pub mod backend;
pub mod builder;
pub mod digest;
pub mod layer;
pub mod lock;
pub mod platform;
pub mod progress;
pub mod record;
pub mod source;
pub mod squash;
pub mod store;
pub mod verity;
pub mod vm;

pub use backend::FsType;
pub use builder::{BuildError, BuildOptions, Builder};
pub use platform::Platform;
pub use record::{BlobId, BuildResult, ImageRecord, LocatedRecord, Lower};
pub use store::Store;

//! vmrootfs: OCI container images → read-only filesystem blobs, one per layer, for microVMs.
//!
//! A microVM runtime (Firecracker, Cloud Hypervisor, QEMU, libkrun) cannot mount a container
//! image: it attaches block devices. vmrootfs turns each layer of an image into a filesystem
//! image — a **blob** — that the guest mounts read-only and stacks with overlayfs, and keeps the
//! blobs in a **store** shared by every image, so a layer common to many images is converted and
//! stored once. The `vmrootfs` command is a thin layer over this crate; a runtime written in
//! Rust embeds the crate instead.
//!
//! # The words
//!
//! - **Blob**: one layer as an EROFS or ext4 filesystem image ([`FsType`]), read-only, named
//!   in the store by what it is ([`BlobId`]: kind, filesystem, recipe and the layer's chain ID),
//!   never by where it came from. Besides the layer blobs an image may have a **squashed** blob
//!   (the whole stack flattened, [`BuildOptions::squash`]) and a **merged** blob (EROFS metadata
//!   over the layer blobs: one mount, or one disk with [`export`], [`BuildOptions::merge`]).
//!   A blob built with [`BuildOptions::verity`] has a dm-verity tree beside it ([`VerityInfo`]).
//! - **Recipe**: the version of the layer → blob conversion ([`FsType::recipe`]). Blobs made by
//!   another recipe are other bytes, so they are stored under another key and never mixed.
//! - **Record**: what the store keeps per tag ([`ImageRecord`]): the source, its manifest and
//!   config digests, the lowers base first ([`Lower`]) and how to start the image's process
//!   ([`RuntimeConfig`]). Records name blobs by identity; [`Store::locate`] adds each blob's
//!   path ([`LocatedRecord`]), which is what a runtime attaches.
//! - **Store**: a directory of blobs and records ([`Store`]; layout and lock protocol in
//!   [`store`]). [`Store::list`], [`Store::get`], [`Store::remove`], [`Store::gc`] and
//!   [`Store::verify`] are `vmrootfs ls`, `inspect`, `rm`, `gc` and `verify`.
//!
//! # Building, pulling and pushing
//!
//! [`Builder::build`] converts an image from a registry, an OCI layout or archive, or a
//! `docker save` archive, and records it. An image that is EROFS already (one [`push::push`]
//! published, or one containerd converted) is pulled as it is, with no conversion: pulling is
//! building such an image. [`push::push`] publishes a stored EROFS image to a registry or an
//! OCI layout, so that other hosts pull ready blobs.
//!
//! ```no_run
//! use vmrootfs::{BuildOptions, Builder, Store, progress::Reporter};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Store::open("/var/lib/vmrootfs")?;
//! let builder = Builder::new(store, BuildOptions::default())?;
//! let built = builder.build("oci-archive:testdata/busybox.oci.tar:busybox", Some("busybox"), &Reporter::new())?;
//! // overlayfs takes its lowers top first; the record lists them base first.
//! for (i, lower) in built.record.lowers.iter().enumerate().rev() {
//!     println!("lower {i}: {} ({} bytes, {})", lower.path.display(), lower.size, lower.fs);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Booting
//!
//! [`vm::kit::write`] writes what a runtime needs to boot a stored image (`vmrootfs kit`): an
//! uncompressed kernel, an initramfs whose `/init` finds the lowers by position and stacks
//! them, and QEMU, Firecracker and Cloud Hypervisor configurations naming the stored blobs.
//! [`vm::run`] boots that kit in a QEMU microVM and runs a command in it (`vmrootfs run`).
//! `examples/build_and_attach.rs` builds an image into a temporary store and prints what a
//! runtime attaches, kit included.
//!
//! [`serve::serve`] mounts an image's lowers as plain files (`vmrootfs serve`): a FUSE
//! filesystem whose paths a runtime that takes only files (Firecracker, Cloud Hypervisor) or a
//! loop device opens; [`serve::serve_lazy`] serves a registry image the same way as its blocks
//! arrive, each verified first ([`lazy`]).
//!
//! # Errors
//!
//! Each operation returns its own error enum ([`BuildError`], [`store::StoreError`],
//! [`push::PushError`], [`vm::VmError`], [`export::MergeError`]) whose variants name the file,
//! digest or tag involved. Deeper causes (a tool's exit status and stderr, a registry's reply)
//! are reached through [`std::error::Error::source`].
#![warn(missing_docs)]

mod backend;
mod builder;
pub mod commit;
mod digest;
mod erofs;
mod erofs_image;
#[cfg(test)]
mod heap_meter;
mod layer;
pub mod lazy;
mod lock;
mod merge;
mod mountns;
mod platform;
pub mod progress;
mod pull;
pub mod push;
mod record;
pub mod serve;
mod source;
mod squash;
pub mod store;
#[cfg(test)]
mod test_io;
pub mod upper;
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
/// to the normalizer and the filesystem writers without a store or a source, and gzip streams
/// to vmrootfs's gunzip (which `examples/inflate_floor.rs` inflates with too). Not part of
/// the API; may change in any release.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::backend::Backend;
    pub use crate::digest::sha256_of;
    pub use crate::layer::dirindex::DirIndex;
    pub use crate::layer::gunzip::Gunzip;
    pub use crate::layer::normalize::{Normalizer, Output};
    pub use crate::layer::stream;
    pub use oci_spec::image::Digest;
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

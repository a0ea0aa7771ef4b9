//! EROFS as vmrootfs writes and reads it: the on-disk layout ([`format`](mod@format)), the
//! layer writer ([`write`](mod@write)) and a reader of layer images ([`read`]).

pub mod format;
pub mod read;
pub mod write;

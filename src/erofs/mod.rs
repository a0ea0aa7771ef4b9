//! EROFS as vmrootfs writes and reads it: the on-disk layout ([`format`]).

pub mod format;
pub mod write;

//! EROFS as vmrootfs writes and reads it: the on-disk layout ([`format`]), the layer writer
//! ([`write`]) and a reader of layer images ([`read`]).

pub mod format;
pub mod read;
pub mod write;

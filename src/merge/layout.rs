//! The single-disk layout of a merged image: the merged blob, then each layer blob, each a
//! whole number of 4096-byte blocks, so device `i + 1` (layer `i`) starts at the block its
//! `mapped_blkaddr` names ([`super::write`] writes those addresses).

/// An image that cannot be one extent of a single disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    #[error("image of {bytes} bytes is not a whole number of 4096-byte blocks")]
    Unaligned { bytes: u64 },
}

/// Blocks of an image of `bytes` bytes, which must be whole blocks.
pub fn blocks_of(bytes: u64, block_size: u64) -> Result<u64, LayoutError> {
    if !bytes.is_multiple_of(block_size) {
        return Err(LayoutError::Unaligned { bytes });
    }
    Ok(bytes / block_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_of_whole_blocks_only() {
        assert_eq!(blocks_of(4097, 4096), Err(LayoutError::Unaligned { bytes: 4097 }));
        assert_eq!(blocks_of(8192, 4096), Ok(2));
    }
}

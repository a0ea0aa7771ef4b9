//! An image's sequential output: one buffer that file data is read straight into.
//!
//! Both of vmrootfs's writers put a file's data down as whole blocks, leaving out what is a
//! hole. Reading each piece of a file into a scratch buffer and then writing its blocks
//! through a `BufWriter` copied every byte twice before the kernel's copy into the page
//! cache. A [`BlockOut`] reads a piece into its buffer right after the bytes already queued
//! ([`BlockOut::read_piece`]); the writer keeps the runs it wants ([`BlockOut::keep`]), which
//! stay where they are unless a hole before them is left out. Other bytes (metadata) are
//! queued by [`Write`], as a `BufWriter` would.

use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::Range;

use crate::layer::normalize::read_piece;

/// Why [`BlockOut::read_piece`] failed.
#[derive(Debug)]
pub enum PieceError {
    /// Reading the file's data.
    Read(io::Error),
    /// Writing the output.
    Write(io::Error),
}

/// A file written from its current position on, through a buffer.
pub struct BlockOut {
    file: File,
    /// `buf[..queued]` goes to the file next; after it is room for a piece and more.
    buf: Vec<u8>,
    queued: usize,
    /// Where the piece last read starts in `buf`, and its padded length.
    piece_at: usize,
    piece_len: usize,
}

impl BlockOut {
    /// Output to `file` from its current position, in pieces of at most `piece` bytes; writes
    /// go to the file `piece` to `2 * piece` bytes at a time.
    pub fn new(file: File, piece: usize) -> BlockOut {
        BlockOut { file, buf: vec![0; 2 * piece], queued: 0, piece_at: 0, piece_len: 0 }
    }

    /// The most bytes one piece holds: half the buffer.
    fn most_in_piece(&self) -> usize {
        self.buf.len() / 2
    }

    /// Reads the next piece of a file's data into the buffer after what is queued: at most
    /// `piece` bytes of the `left` still to come from `data`, zero-padded to whole `block`s
    /// (see [`read_piece`]). Returns the bytes read and the padded length; none of the piece
    /// ([`BlockOut::piece`]) is queued until [`BlockOut::keep`]. Writing what is queued, to
    /// make room, may fail too.
    pub fn read_piece(
        &mut self,
        data: &mut dyn Read,
        left: u64,
        block: usize,
    ) -> Result<(usize, usize), PieceError> {
        let most = self.most_in_piece();
        if self.queued + most > self.buf.len() {
            self.write_queued().map_err(PieceError::Write)?;
        }
        let room = &mut self.buf[self.queued..self.queued + most];
        let (n, padded) = read_piece(data, room, left, block).map_err(PieceError::Read)?;
        (self.piece_at, self.piece_len) = (self.queued, padded);
        Ok((n, padded))
    }

    /// The piece last read, padded. Once a range of it is kept, the bytes before that range's
    /// end are no longer the piece's.
    pub fn piece(&self) -> &[u8] {
        &self.buf[self.piece_at..self.piece_at + self.piece_len]
    }

    /// Queues the bytes `range` of the piece last read. The ranges kept of one piece come in
    /// order and do not overlap; what lies between them is left out.
    pub fn keep(&mut self, range: Range<usize>) {
        assert!(range.end <= self.piece_len, "a range within the piece");
        let from = self.piece_at + range.start;
        assert!(from >= self.queued, "ranges of a piece kept in order");
        if from > self.queued {
            self.buf.copy_within(from..self.piece_at + range.end, self.queued);
        }
        self.queued += range.len();
    }

    fn write_queued(&mut self) -> io::Result<()> {
        let queued = std::mem::take(&mut self.queued);
        self.piece_len = 0;
        self.file.write_all(&self.buf[..queued])
    }
}

impl Write for BlockOut {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.write_all(bytes)?;
        Ok(bytes.len())
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        // Whatever is written now comes after the piece: nothing more of it can be kept.
        self.piece_len = 0;
        if self.queued + bytes.len() > self.buf.len() {
            self.write_queued()?;
        }
        if bytes.len() >= self.buf.len() {
            return self.file.write_all(bytes);
        }
        self.buf[self.queued..self.queued + bytes.len()].copy_from_slice(bytes);
        self.queued += bytes.len();
        Ok(())
    }

    /// Writes what is queued.
    fn flush(&mut self) -> io::Result<()> {
        self.write_queued()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom};

    use super::*;

    fn contents(mut f: &File) -> Vec<u8> {
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn kept_ranges_and_metadata_reach_the_file_in_order() {
        let file = tempfile::tempfile().unwrap();
        let mut out = BlockOut::new(file.try_clone().unwrap(), 8);
        // Two pieces of one 13-byte file in blocks of 4: "abcdefgh", then "ijklm" padded.
        let mut data: &[u8] = b"abcdefghijklm";
        assert_eq!(out.read_piece(&mut data, 13, 4).unwrap(), (8, 8));
        assert_eq!(out.piece(), b"abcdefgh");
        out.keep(4..8); // "abcd" left out, as a hole
        assert_eq!(out.read_piece(&mut data, 5, 4).unwrap(), (5, 8));
        assert_eq!(out.piece(), b"ijklm\0\0\0");
        out.keep(0..4);
        out.keep(4..8);
        out.write_all(b"META").unwrap();
        // A write larger than the buffer goes straight to the file, after what is queued.
        out.write_all(&[b'x'; 20]).unwrap();
        out.read_piece(&mut &b"tail"[..], 4, 4).unwrap();
        assert_eq!(out.piece(), b"tail");
        out.keep(0..4);
        out.flush().unwrap();
        let mut expected = b"efghijklm\0\0\0META".to_vec();
        expected.extend([b'x'; 20]);
        expected.extend(b"tail");
        assert_eq!(contents(&file), expected);
    }

    #[test]
    fn a_range_kept_out_of_order_is_refused() {
        let mut out = BlockOut::new(tempfile::tempfile().unwrap(), 8);
        out.read_piece(&mut &b"abcdefgh"[..], 8, 4).unwrap();
        out.keep(4..8);
        let back = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| out.keep(0..4)));
        assert!(back.is_err());
    }
}

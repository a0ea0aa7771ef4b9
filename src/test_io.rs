//! A reader for unit tests: it serves some bytes, then fails every read with one error.

use std::io::{self, Read};

/// Serves `data`, then fails every read with what `error` makes.
pub struct FailsAfter<'a> {
    pub data: &'a [u8],
    pub error: fn() -> io::Error,
}

impl Read for FailsAfter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.data.is_empty() {
            return Err((self.error)());
        }
        self.data.read(buf)
    }
}

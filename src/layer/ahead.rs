//! Reading on a thread of its own, ahead of the reader, hashing what it serves.
//!
//! Inflating a layer is the largest piece of its conversion, and reading the tar, normalizing
//! and hashing its bytes (the diff ID) the next ones: on one thread they were the test image's
//! critical path, the base layer streaming in ~0.5 s while the second core had room. A
//! [`ReadAhead`] moves a stream's producer onto a thread that fills owned chunks; the reader
//! serves them (by [`Read`], or without a copy by [`BufRead`]) and hands each one it has served
//! to a hashing thread without copying it ([`OffThread::update_owned`]); hashed, the chunk
//! goes back to be filled again. At most a few chunks are in flight: nothing is held beyond
//! them. A layer streams through two: one reads the blob (hashing it: the blob digest) for
//! the decompressor, which then has nothing to do but inflate; the other runs the
//! decompressor (hashing its output: the diff ID) ahead of the tar reader.

use std::io::{self, BufRead, Read};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::thread::{Scope, ScopedJoinHandle};

use oci_spec::image::Digest;

use crate::digest::{OffThread, read_full, sha256_digest};

/// Bytes in one chunk.
const CHUNK: usize = 256 << 10;
/// Filled chunks waiting for the reader.
const IN_FLIGHT: usize = 4;

/// The stream of `R`, read on a thread of its own and hashed (SHA-256) as it is served.
pub struct ReadAhead<'scope, R> {
    filled: Receiver<io::Result<Vec<u8>>>,
    empty: Sender<Vec<u8>>,
    /// The chunk being served, from `at`.
    current: Vec<u8>,
    at: usize,
    /// The stream ended (or failed, or the thread is gone): nothing more comes.
    ended: bool,
    hasher: OffThread,
    thread: ScopedJoinHandle<'scope, R>,
}

impl<'scope, R: Read + Send + 'scope> ReadAhead<'scope, R> {
    /// Starts reading `inner` on a thread of `scope` named `name`.
    pub fn start<'env>(scope: &'scope Scope<'scope, 'env>, name: &str, inner: R) -> Self {
        let (fill, filled) = sync_channel(IN_FLIGHT);
        let (empty, empties) = channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn_scoped(scope, move || fill_chunks(inner, &fill, &empties))
            .expect("spawning a thread");
        ReadAhead {
            filled,
            empty,
            current: Vec::new(),
            at: 0,
            ended: false,
            hasher: OffThread::new(),
            thread,
        }
    }

    /// Reads what is left to the end and returns the `sha256:` digest of the whole stream and
    /// the reader, with whatever it holds after the stream (a decompressor's trailing input).
    pub fn finish(mut self) -> io::Result<(Digest, R)> {
        io::copy(&mut self, &mut io::sink())?;
        let ReadAhead { filled, hasher, thread, .. } = self;
        drop(filled);
        let inner = thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok((sha256_digest(&hasher.finalize()), inner))
    }

    /// Takes the next chunk (the served one goes to the hash); false at the end.
    fn next_chunk(&mut self) -> io::Result<bool> {
        if self.ended {
            return Ok(false);
        }
        let next = match self.filled.recv() {
            Ok(Ok(chunk)) => chunk,
            Ok(Err(e)) => {
                self.ended = true;
                return Err(e);
            }
            Err(_) => Vec::new(),
        };
        self.ended = next.is_empty();
        let served = std::mem::replace(&mut self.current, next);
        self.at = 0;
        if !served.is_empty() {
            self.hasher.update_owned(served);
        }
        while let Some(spent) = self.hasher.spent() {
            // The thread may have ended (the stream did): the chunk is then dropped.
            let _ = self.empty.send(spent);
        }
        Ok(!self.ended)
    }
}

impl<'scope, R: Read + Send + 'scope> Read for ReadAhead<'scope, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let served = self.fill_buf()?;
        let n = buf.len().min(served.len());
        buf[..n].copy_from_slice(&served[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<'scope, R: Read + Send + 'scope> BufRead for ReadAhead<'scope, R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.at == self.current.len() {
            if !self.next_chunk()? {
                break;
            }
        }
        Ok(&self.current[self.at..])
    }

    fn consume(&mut self, n: usize) {
        self.at = (self.at + n).min(self.current.len());
    }
}

/// The thread: fills chunks (reused from `empties` when some came back) from `inner` and sends
/// them until the end (an empty chunk), a read error (sent too), or the reader is gone.
fn fill_chunks<R: Read>(
    mut inner: R,
    fill: &SyncSender<io::Result<Vec<u8>>>,
    empties: &Receiver<Vec<u8>>,
) -> R {
    loop {
        let mut chunk = empties.try_recv().unwrap_or_default();
        // A chunk back from the hash keeps the length it was hashed at: only the rest is zeroed.
        chunk.resize(CHUNK, 0);
        let (filled, end) = match read_full(&mut inner, &mut chunk) {
            Ok(n) => {
                chunk.truncate(n);
                (Ok(chunk), n == 0)
            }
            Err(e) => (Err(e), true),
        };
        if fill.send(filled).is_err() || end {
            return inner;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_io::FailsAfter;

    /// Bytes that differ from chunk to chunk, so a chunk served twice or skipped shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ (i / CHUNK) as u8).collect()
    }

    #[test]
    fn serves_every_byte_in_order_and_hashes_the_whole_stream() {
        let data = pattern(5 * CHUNK + 1234);
        let (served, digest, rest) = std::thread::scope(|s| {
            let mut ahead = ReadAhead::start(s, "test", &data[..]);
            // Reads of odd sizes, as a tar reader makes: headers, then data.
            let mut served = vec![0u8; 3 * CHUNK + 17];
            ahead.read_exact(&mut served).unwrap();
            let (digest, rest) = ahead.finish().unwrap();
            (served, digest, rest)
        });
        assert_eq!(served, data[..served.len()]);
        assert!(rest.is_empty(), "the thread read its input to the end");
        assert_eq!(digest, crate::digest::sha256_of(&data), "the unread tail is hashed too");
    }

    #[test]
    fn serves_by_bufread_every_byte_once() {
        let data = pattern(3 * CHUNK + 999);
        let (served, digest) = std::thread::scope(|s| {
            let mut ahead = ReadAhead::start(s, "test", &data[..]);
            let mut served = Vec::new();
            // Consumed in pieces that cross chunk edges, as a decompressor takes its input.
            for step in [1, 4095, CHUNK, 7, 3 * CHUNK].iter().cycle() {
                let buf = ahead.fill_buf().unwrap();
                if buf.is_empty() {
                    break;
                }
                let n = (*step).min(buf.len());
                served.extend_from_slice(&buf[..n]);
                ahead.consume(n);
            }
            (served, ahead.finish().unwrap().0)
        });
        assert!(served == data, "every byte served once, in order");
        assert_eq!(digest, crate::digest::sha256_of(&data));
    }

    #[test]
    fn a_read_error_reaches_the_reader_as_it_was() {
        let data = vec![7u8; CHUNK + 10];
        let corrupt = || io::Error::new(io::ErrorKind::InvalidData, "corrupt deflate stream");
        let err = std::thread::scope(|s| {
            let mut ahead = ReadAhead::start(s, "test", FailsAfter { data: &data, error: corrupt });
            io::copy(&mut ahead, &mut io::sink()).unwrap_err()
        });
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(err.to_string(), "corrupt deflate stream");
    }

    #[test]
    fn dropped_early_it_stops_its_thread() {
        let data = pattern(64 * CHUNK);
        // The scope joins the thread: this returns only if dropping the reader stopped it
        // (it would otherwise wait forever to hand over its next chunk).
        std::thread::scope(|s| {
            let mut ahead = ReadAhead::start(s, "test", &data[..]);
            let mut first = [0u8; 100];
            ahead.read_exact(&mut first).unwrap();
            assert_eq!(first[..], data[..100]);
        });
    }
}

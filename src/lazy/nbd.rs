//! A read-only NBD server on a unix socket, one export per [`BlockSource`]: what QEMU's
//! built-in NBD client (`-drive file=nbd+unix:///NAME?socket=PATH`) reads a lazy lower
//! through. The host needs no NBD driver: QEMU is the client.
//!
//! The protocol (NBD's `doc/proto.md`), the part served here:
//!
//! ```text
//! handshake   S: "NBDMAGIC" "IHAVEOPT" u16 flags (FIXED_NEWSTYLE | NO_ZEROES)
//!             C: u32 flags
//! options     C: "IHAVEOPT" u32 option u32 length data
//!             S: u64 REPLY_MAGIC u32 option u32 type u32 length data   (EXPORT_NAME: none)
//!             EXPORT_NAME, GO and INFO (the export's size, read-only, block sizes), LIST,
//!             ABORT; anything else NBD_REP_ERR_UNSUP (the client goes on without it)
//! transmission C: u32 REQUEST_MAGIC u16 flags u16 type u64 cookie u64 offset u32 length
//!             S: u32 SIMPLE_REPLY_MAGIC u32 error u64 cookie [data]
//!             READ (EIO when the source fails: a block that failed verification),
//!             DISC; WRITE and TRIM EPERM (read-only), others EINVAL
//! ```
//!
//! Requests of one connection are answered as they complete, each read on its own thread
//! (a read waiting on the registry holds up no other), replies written whole under a lock.
//! What a client sends is untrusted: lengths are capped, reads checked against the export's
//! size, and a malformed handshake or request closes the connection.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::BlockSource;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const FLAG_C_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags: HAS_FLAGS | READ_ONLY | CAN_MULTI_CONN (the bytes never change).
const TRANSMISSION_FLAGS: u16 = 1 | 2 | (1 << 8);

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_TRIM: u16 = 4;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;

/// Longest option data read from a client (a name and a few info requests).
const MAX_OPTION: u32 = 64 << 10;
/// Longest read answered (QEMU asks for at most 32 MiB, its max_transfer).
const MAX_READ: u32 = 32 << 20;
/// Preferred block size advertised: the verity block.
const PREFERRED_BLOCK: u32 = 4096;

/// One export: its name and what it reads.
#[derive(Clone)]
pub struct Export {
    /// The name a client asks for (`nbd+unix:///NAME?socket=…`).
    pub name: String,
    /// Its bytes.
    pub source: Arc<dyn BlockSource>,
}

/// A running server; stopped (and its socket removed) by [`NbdServer::stop`] or on drop.
pub struct NbdServer {
    socket: PathBuf,
    stopping: Arc<AtomicBool>,
    failed_reads: Arc<AtomicU64>,
    accept: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Listens on the new unix socket `socket` and serves `exports` to every client.
    pub fn start(socket: &Path, exports: Vec<Export>) -> io::Result<NbdServer> {
        let listener = UnixListener::bind(socket)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let failed_reads = Arc::new(AtomicU64::new(0));
        let exports = Arc::new(exports);
        let (stop, failed) = (stopping.clone(), failed_reads.clone());
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (exports, failed) = (exports.clone(), failed.clone());
                std::thread::spawn(move || {
                    if let Err(e) = serve(conn, &exports, &failed) {
                        crate::progress::debug(&format!("nbd: connection ended: {e}"));
                    }
                });
            }
        });
        Ok(NbdServer { socket: socket.to_owned(), stopping, failed_reads, accept: Some(accept) })
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Reads answered with EIO so far.
    pub fn failed_reads(&self) -> u64 {
        self.failed_reads.load(Ordering::SeqCst)
    }

    /// Stops accepting connections and removes the socket (open connections end with their
    /// client).
    pub fn stop(&mut self) {
        let Some(accept) = self.accept.take() else { return };
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees `stopping`; a failure means it is gone.
        let _ = UnixStream::connect(&self.socket);
        let _ = accept.join();
        // A socket already removed is what stopping wants.
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// One option reply.
fn option_reply(w: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    w.write_all(&out)
}

/// The handshake, the option haggling, then the transmission phase of one connection.
fn serve(mut conn: UnixStream, exports: &[Export], failed: &AtomicU64) -> io::Result<()> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    conn.write_all(&hello)?;
    let client_flags = read_u32(&mut conn)?;
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let export = loop {
        if read_u64(&mut conn)? != IHAVEOPT {
            return Err(invalid("an option without IHAVEOPT"));
        }
        let option = read_u32(&mut conn)?;
        let len = read_u32(&mut conn)?;
        if len > MAX_OPTION {
            return Err(invalid("an option longer than 64 KiB"));
        }
        let mut data = vec![0u8; len as usize];
        conn.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                // The protocol's answer to an unknown name here is to close the connection.
                let export =
                    exports.iter().find(|e| e.name == name).ok_or_else(|| invalid("unknown export"))?;
                let mut out = Vec::new();
                out.extend_from_slice(&export.source.len().to_be_bytes());
                out.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                conn.write_all(&out)?;
                break export.clone();
            }
            OPT_GO | OPT_INFO => match go_name(&data) {
                None => option_reply(&mut conn, option, REP_ERR_INVALID, b"")?,
                Some(name) => match exports.iter().find(|e| e.name == name) {
                    None => option_reply(&mut conn, option, REP_ERR_UNKNOWN, b"")?,
                    Some(export) => {
                        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                        info.extend_from_slice(&export.source.len().to_be_bytes());
                        info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                        option_reply(&mut conn, option, REP_INFO, &info)?;
                        let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        for n in [1, PREFERRED_BLOCK, MAX_READ] {
                            sizes.extend_from_slice(&n.to_be_bytes());
                        }
                        option_reply(&mut conn, option, REP_INFO, &sizes)?;
                        option_reply(&mut conn, option, REP_ACK, b"")?;
                        if option == OPT_GO {
                            break export.clone();
                        }
                    }
                },
            },
            OPT_LIST => {
                for e in exports {
                    let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    option_reply(&mut conn, option, REP_SERVER, &d)?;
                }
                option_reply(&mut conn, option, REP_ACK, b"")?;
            }
            OPT_ABORT => {
                option_reply(&mut conn, option, REP_ACK, b"")?;
                return Ok(());
            }
            _ => option_reply(&mut conn, option, REP_ERR_UNSUP, b"")?,
        }
    };
    transmit(conn, export, failed)
}

/// The export name of a GO or INFO option's data (u32 length, name, u16 count, u16 infos).
fn go_name(data: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + len)?;
    let count = u16::from_be_bytes(data.get(4 + len..6 + len)?.try_into().ok()?) as usize;
    (data.len() == 6 + len + 2 * count).then(|| String::from_utf8_lossy(name).into_owned())
}

/// A simple reply (header and, for a successful read, its data) written whole.
fn reply(conn: &Mutex<UnixStream>, cookie: u64, error: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(data);
    conn.lock().expect("reply lock").write_all(&out)
}

/// The transmission phase: requests until DISC or the client goes away.
fn transmit(conn: UnixStream, export: Export, failed: &AtomicU64) -> io::Result<()> {
    let mut requests = conn.try_clone()?;
    let replies = Arc::new(Mutex::new(conn));
    let result = std::thread::scope(|scope| -> io::Result<()> {
        loop {
            if read_u32(&mut requests)? != REQUEST_MAGIC {
                return Err(invalid("a request without its magic"));
            }
            let _flags = read_u16(&mut requests)?;
            let kind = read_u16(&mut requests)?;
            let cookie = read_u64(&mut requests)?;
            let offset = read_u64(&mut requests)?;
            let len = read_u32(&mut requests)?;
            match kind {
                CMD_READ => {
                    let within = offset.checked_add(u64::from(len)).is_some_and(|e| e <= export.source.len());
                    if !within || len > MAX_READ {
                        reply(&replies, cookie, EINVAL, b"")?;
                        continue;
                    }
                    let (replies, source) = (replies.clone(), export.source.clone());
                    scope.spawn(move || {
                        let mut buf = vec![0u8; len as usize];
                        let sent = match source.read_at(&mut buf, offset) {
                            Ok(()) => reply(&replies, cookie, 0, &buf),
                            Err(e) => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                crate::progress::debug(&format!(
                                    "nbd: read of {len} bytes at {offset} failed: {}",
                                    crate::progress::error_chain(&e)
                                ));
                                reply(&replies, cookie, EIO, b"")
                            }
                        };
                        // A client gone before its answer: the request loop sees it too.
                        let _ = sent;
                    });
                }
                CMD_WRITE => {
                    // Read-only: the payload is read and dropped, the write refused.
                    io::copy(&mut (&mut requests).take(u64::from(len)), &mut io::sink())?;
                    reply(&replies, cookie, EPERM, b"")?;
                }
                CMD_DISC => return Ok(()),
                CMD_TRIM => reply(&replies, cookie, EPERM, b"")?,
                _ => reply(&replies, cookie, EINVAL, b"")?,
            }
        }
    });
    match result {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_option_data_names_the_export() {
        let mut d = 5u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"lower");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(go_name(&d).as_deref(), Some("lower"));
        assert_eq!(go_name(&d[..d.len() - 1]), None, "a cut info list");
        assert_eq!(go_name(&[0, 0, 0, 9, b'x']), None, "a name longer than the data");
    }
}

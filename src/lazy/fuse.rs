//! A read-only FUSE filesystem whose files are [`BlockSource`]s: the plain paths that runtimes
//! taking only files (Firecracker, Cloud Hypervisor, a loop device) open (`vmrootfs serve`).
//!
//! ```text
//! DIR/            the mount root, 0555, flat: no subdirectories
//! DIR/<name>      one regular file per source, 0444, its size the source's length;
//!                 read(2) → BlockSource::read_at; a failed read → EIO
//! ```
//!
//! vmrootfs speaks the FUSE protocol over `/dev/fuse` itself rather than through a crate:
//! a flat read-only directory needs a dozen requests (`INIT`, `LOOKUP`, `GETATTR`, `OPEN`,
//! `READ`, `OPENDIR`, `READDIR`, `STATFS`, the releases and forgets; everything else is
//! `ENOSYS`, and the mount is read-only, so nothing writes), mounting is one `mount(2)` (the
//! caller is root; `fuser` without libfuse would need `fusermount3`, which this host lacks,
//! and with libfuse a C library and its headers), and the answer to each request is a pure
//! function of the request bytes ([`Filesystem::answer`]), tested without a mount.
//!
//! Threads: every worker reads requests from the one `/dev/fuse` descriptor (the kernel hands
//! each request to one waiting reader) and answers it itself, so a read that waits on a slow
//! fetch holds one worker while the others go on answering. `FUSE_ASYNC_READ` lets the
//! kernel send reads of one file concurrently.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::io::Errno;

use super::BlockSource;

/// A file of the mount: its name in the root and where its bytes come from.
pub(crate) struct ServedFile {
    /// File name in the mount root (no `/`, not `.` or `..`).
    pub name: String,
    /// Its bytes.
    pub source: Arc<dyn BlockSource>,
}

/// A failure to mount or unmount the filesystem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FuseError {
    /// `/dev/fuse` could not be opened (no FUSE in the kernel, or no permission).
    #[error("opening /dev/fuse (FUSE is needed to serve files)")]
    Device(#[source] std::io::Error),
    /// mount(2) failed.
    #[error("mounting a FUSE filesystem on {} (serving needs root)", dir.display())]
    Mount {
        /// The mount point.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// umount(2) failed for another reason than files still open.
    #[error("unmounting {}", dir.display())]
    Unmount {
        /// The mount point.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A worker thread could not be started.
    #[error("starting a FUSE worker thread")]
    Thread(#[source] std::io::Error),
}

/// How unmounting ended (`vmrootfs::serve::Server::stop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Unmounted; the workers have ended.
    Clean,
    /// A served file was still open (a loop device, a VM): the mount was detached from the
    /// directory, and its current users are served until they close it
    /// (`vmrootfs::serve::Server::finished`).
    Detached,
}

/// A mounted filesystem and its worker threads. Dropped while mounted, it is detached (the
/// directory is free again; open files keep being served until the process exits).
pub(crate) struct FuseMount {
    dir: PathBuf,
    workers: Vec<JoinHandle<()>>,
    mounted: bool,
}

impl FuseMount {
    /// Mounts `files` read-only on `dir` (an existing directory), answered by `threads`
    /// workers.
    pub fn mount(dir: &Path, files: Vec<ServedFile>, threads: usize) -> Result<FuseMount, FuseError> {
        use rustix::fs::{Mode, OFlags};
        use rustix::mount::MountFlags;
        let dev = rustix::fs::open("/dev/fuse", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| FuseError::Device(e.into()))?;
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&dev);
        // allow_other: a runtime running as another user opens the files too;
        // default_permissions: the kernel checks the modes (0444 files, 0555 root).
        let data =
            format!("fd={fd},rootmode=40000,user_id={uid},group_id={gid},allow_other,default_permissions");
        let data = std::ffi::CString::new(data).expect("mount options have no NUL");
        let flags = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        rustix::mount::mount("vmrootfs", dir, "fuse.vmrootfs", flags, data.as_c_str())
            .map_err(|e| FuseError::Mount { dir: dir.to_owned(), source: e.into() })?;
        let mut mount = FuseMount { dir: dir.to_owned(), workers: Vec::new(), mounted: true };
        let dev = Arc::new(dev);
        let fs = Arc::new(Filesystem::new(files));
        for i in 0..threads.max(1) {
            let (dev, fs) = (dev.clone(), fs.clone());
            let worker = std::thread::Builder::new()
                .name(format!("fuse{i}"))
                .spawn(move || serve_requests(&dev, &fs))
                .map_err(FuseError::Thread)?; // the mount is detached by drop
            mount.workers.push(worker);
        }
        Ok(mount)
    }

    /// Unmounts the filesystem; a served file still open (a loop device, a running VM) makes
    /// it detach the mount instead and go on serving that file's users.
    pub fn unmount(&mut self) -> Result<Unmounted, FuseError> {
        use rustix::mount::UnmountFlags;
        match rustix::mount::unmount(&self.dir, UnmountFlags::empty()) {
            Ok(()) => {
                self.mounted = false;
                // Unmounting ends the connection: every worker's read fails with ENODEV.
                for w in self.workers.drain(..) {
                    w.join().expect("a FUSE worker does not panic");
                }
                Ok(Unmounted::Clean)
            }
            Err(Errno::BUSY) => {
                rustix::mount::unmount(&self.dir, UnmountFlags::DETACH)
                    .map_err(|e| FuseError::Unmount { dir: self.dir.clone(), source: e.into() })?;
                self.mounted = false;
                Ok(Unmounted::Detached)
            }
            Err(e) => Err(FuseError::Unmount { dir: self.dir.clone(), source: e.into() }),
        }
    }

    /// Whether every worker has ended: the filesystem is unmounted and nothing uses it.
    pub fn finished(&self) -> bool {
        self.workers.iter().all(JoinHandle::is_finished)
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if self.mounted {
            // Dropped on an error path or a panic: free the directory; there is nothing better
            // to do with a failure here than say so.
            if let Err(e) = rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::DETACH) {
                eprintln!("warning: could not detach the FUSE mount on {}: {e}", self.dir.display());
            }
        }
    }
}

/// A worker: reads a request, answers it, until the connection ends.
fn serve_requests(dev: &OwnedFd, fs: &Filesystem) {
    let mut buf = vec![0u8; REQUEST_BUFFER];
    loop {
        let n = match rustix::io::read(dev, &mut buf) {
            Ok(n) => n,
            // ENOENT: the request was interrupted before it was read.
            Err(Errno::NOENT | Errno::INTR | Errno::AGAIN) => continue,
            // Unmounted (or aborted): the connection is gone.
            Err(Errno::NODEV) => return,
            Err(e) => {
                eprintln!("warning: reading a FUSE request: {e}; this worker stops");
                return;
            }
        };
        if let Some(reply) = fs.answer(&buf[..n]) {
            match rustix::io::write(dev.as_fd(), &reply) {
                // ENOENT: the request was interrupted meanwhile; the kernel no longer waits.
                Ok(_) | Err(Errno::NOENT) => {}
                Err(Errno::NODEV) => return,
                Err(e) => eprintln!("warning: answering a FUSE request: {e}"),
            }
        }
    }
}

/// Bytes of the buffer a request is read into: the kernel wants at least 8 KiB
/// (`FUSE_MIN_READ_BUFFER`) and room for a write of `MAX_WRITE` (none comes: read-only).
const REQUEST_BUFFER: usize = 64 << 10;
/// The protocol version spoken (7.31: `FUSE_MAX_PAGES`; Linux ≥ 5.2 speaks it).
const MAJOR: u32 = 7;
const MINOR: u32 = 31;
/// Largest read asked for, in pages (`FUSE_MAX_PAGES`): 1 MiB.
const MAX_PAGES: u16 = 256;
const MAX_WRITE: u32 = 4096;
/// Seconds the kernel may cache names and attributes: they never change while mounted.
const CACHE_SECONDS: u64 = 3600;
const ROOT: u64 = 1;
const BLOCK: u64 = 4096;

/// Request opcodes (`include/uapi/linux/fuse.h`).
mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
}

/// `FUSE_INIT` flags asked for, each taken only if the kernel offers it.
const ASYNC_READ: u32 = 1 << 0;
const INIT_MAX_PAGES: u32 = 1 << 22;
/// `FOPEN_KEEP_CACHE`: the bytes never change, the page cache stays valid across opens.
const KEEP_CACHE: u32 = 1 << 1;

const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;

/// The filesystem: a root directory (node 1) and the files (node 2 + index).
pub(crate) struct Filesystem {
    files: Vec<ServedFile>,
    /// The files' and the root's times: when the filesystem was made.
    time: u64,
}

/// Little-endian fields appended to a reply.
#[derive(Default)]
struct Out(Vec<u8>);

impl Out {
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn zeros(mut self, n: usize) -> Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl Filesystem {
    /// The filesystem of `files`, in that order.
    pub fn new(files: Vec<ServedFile>) -> Filesystem {
        let time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Filesystem { files, time }
    }

    /// The reply to one request (`fuse_in_header` and its arguments), or `None` for the
    /// requests that get none (forgets, interrupts).
    pub fn answer(&self, request: &[u8]) -> Option<Vec<u8>> {
        let (Some(opcode), Some(unique), Some(node)) =
            (le_u32(request, 4), le_u64(request, 8), le_u64(request, 16))
        else {
            return None; // shorter than a header: nothing to answer to
        };
        if matches!(opcode, op::FORGET | op::BATCH_FORGET | op::INTERRUPT) {
            return None;
        }
        let args = request.get(IN_HEADER..).unwrap_or_default();
        let (error, body) = match self.reply(opcode, node, args) {
            Ok(body) => (0, body),
            Err(e) => (-e.raw_os_error(), Vec::new()),
        };
        let len = (OUT_HEADER + body.len()) as u32;
        let mut out = Out::default().u32(len).u32(error as u32).u64(unique).0;
        out.extend_from_slice(&body);
        Some(out)
    }

    /// The body of the reply to `opcode` on `node` with `args`.
    fn reply(&self, opcode: u32, node: u64, args: &[u8]) -> Result<Vec<u8>, Errno> {
        match opcode {
            op::INIT => init(args),
            op::LOOKUP => {
                let name = args.split(|&b| b == 0).next().unwrap_or_default();
                let i = self.files.iter().position(|f| f.name.as_bytes() == name);
                match i {
                    Some(i) if node == ROOT => Ok(self.entry(file_node(i))?.0),
                    _ => Err(Errno::NOENT),
                }
            }
            op::GETATTR => {
                let attr = self.attr(node)?;
                Ok(Out::default().u64(CACHE_SECONDS).u32(0).u32(0).0.into_iter().chain(attr.0).collect())
            }
            op::OPEN => {
                self.file(node)?;
                let flags = le_u32(args, 0).ok_or(Errno::INVAL)?;
                if flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
                    return Err(Errno::ROFS);
                }
                Ok(Out::default().u64(0).u32(KEEP_CACHE).u32(0).0)
            }
            op::OPENDIR if node == ROOT => Ok(Out::default().u64(0).u32(0).u32(0).0),
            op::OPENDIR => Err(Errno::NOTDIR),
            op::READ => {
                let file = self.file(node)?;
                let (offset, size) =
                    (le_u64(args, 8).ok_or(Errno::INVAL)?, le_u32(args, 16).ok_or(Errno::INVAL)?);
                let len = file.source.len();
                let n = len.saturating_sub(offset).min(u64::from(size)) as usize;
                let mut data = vec![0u8; n];
                if n > 0 {
                    file.source.read_at(&mut data, offset).map_err(|e| {
                        eprintln!(
                            "error: serving {} (bytes {offset}..{}): {e}",
                            file.name,
                            offset + n as u64
                        );
                        Errno::IO
                    })?;
                }
                Ok(data)
            }
            op::READDIR if node == ROOT => {
                let (start, size) =
                    (le_u64(args, 8).ok_or(Errno::INVAL)?, le_u32(args, 16).ok_or(Errno::INVAL)?);
                Ok(self.dirents(start, size as usize))
            }
            op::READDIR => Err(Errno::NOTDIR),
            op::STATFS => {
                let blocks = self.files.iter().map(|f| f.source.len().div_ceil(BLOCK)).sum();
                let files = self.files.len() as u64 + 1;
                let out = Out::default().u64(blocks).u64(0).u64(0).u64(files).u64(0);
                Ok(out.u32(BLOCK as u32).u32(255).u32(BLOCK as u32).u32(0).zeros(24).0)
            }
            op::RELEASE | op::RELEASEDIR | op::FLUSH | op::DESTROY => Ok(Vec::new()),
            _ => Err(Errno::NOSYS),
        }
    }

    /// The served file of node `node`.
    fn file(&self, node: u64) -> Result<&ServedFile, Errno> {
        let i = node.checked_sub(2).ok_or(if node == ROOT { Errno::ISDIR } else { Errno::NOENT })?;
        self.files.get(i as usize).ok_or(Errno::NOENT)
    }

    /// `fuse_attr` of node `node`.
    fn attr(&self, node: u64) -> Result<Out, Errno> {
        let (mode, size, nlink) = if node == ROOT {
            (libc::S_IFDIR | 0o555, 0, 2)
        } else {
            (libc::S_IFREG | 0o444, self.file(node)?.source.len(), 1)
        };
        let t = self.time;
        let out = Out::default().u64(node).u64(size).u64(size.div_ceil(512)).u64(t).u64(t).u64(t);
        // nsecs, mode, nlink, uid, gid (root's), rdev, blksize, flags
        Ok(out.u32(0).u32(0).u32(0).u32(mode).u32(nlink).u32(0).u32(0).u32(0).u32(BLOCK as u32).u32(0))
    }

    /// `fuse_entry_out` of node `node`.
    fn entry(&self, node: u64) -> Result<Out, Errno> {
        let attr = self.attr(node)?;
        let mut out = Out::default().u64(node).u64(0).u64(CACHE_SECONDS).u64(CACHE_SECONDS).u32(0).u32(0);
        out.0.extend_from_slice(&attr.0);
        Ok(out)
    }

    /// Directory entries of the root from position `start`, as many as fit in `size` bytes.
    fn dirents(&self, start: u64, size: usize) -> Vec<u8> {
        let names = [(ROOT, ".", libc::DT_DIR), (ROOT, "..", libc::DT_DIR)]
            .into_iter()
            .chain(self.files.iter().enumerate().map(|(i, f)| (file_node(i), f.name.as_str(), libc::DT_REG)));
        let mut out = Vec::new();
        for (pos, (ino, name, kind)) in names.enumerate().skip(start as usize) {
            let entry =
                Out::default().u64(ino).u64(pos as u64 + 1).u32(name.len() as u32).u32(u32::from(kind));
            let mut entry = entry.0;
            entry.extend_from_slice(name.as_bytes());
            entry.resize(entry.len().next_multiple_of(8), 0);
            if out.len() + entry.len() > size {
                break;
            }
            out.extend_from_slice(&entry);
        }
        out
    }
}

fn file_node(i: usize) -> u64 {
    i as u64 + 2
}

/// `fuse_init_out` for the kernel's `fuse_init_in` in `args`.
fn init(args: &[u8]) -> Result<Vec<u8>, Errno> {
    let (major, max_readahead, offered) = (
        le_u32(args, 0).ok_or(Errno::INVAL)?,
        le_u32(args, 8).ok_or(Errno::INVAL)?,
        le_u32(args, 12).ok_or(Errno::INVAL)?,
    );
    if major < MAJOR {
        return Err(Errno::PROTO);
    }
    if major > MAJOR {
        // The kernel asks again with our major version.
        return Ok(Out::default().u32(MAJOR).u32(MINOR).zeros(56).0);
    }
    let flags = offered & (ASYNC_READ | INIT_MAX_PAGES);
    let out = Out::default().u32(MAJOR).u32(MINOR).u32(max_readahead).u32(flags);
    // max_background, congestion_threshold, max_write, time_gran, max_pages, map_alignment,
    // flags2, unused
    Ok(out.u16(16).u16(12).u32(MAX_WRITE).u32(1).u16(MAX_PAGES).u16(0).u32(0).zeros(28).0)
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    use super::*;

    /// Bytes in memory.
    struct Bytes(Vec<u8>);

    impl BlockSource for Bytes {
        fn len(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    /// A source whose every read fails verification.
    struct Failing;

    impl BlockSource for Failing {
        fn len(&self) -> u64 {
            8192
        }
        fn read_at(&self, _: &mut [u8], offset: u64) -> io::Result<()> {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("block at {offset} does not match its hash"),
            ))
        }
    }

    /// Bytes whose reads wait until the gate opens (a fetch that stalls), at most a minute.
    struct Gate {
        bytes: Bytes,
        open: Mutex<bool>,
        opened: Condvar,
    }

    impl BlockSource for Gate {
        fn len(&self) -> u64 {
            self.bytes.len()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let open = self.open.lock().unwrap();
            let (open, _) =
                self.opened.wait_timeout_while(open, Duration::from_secs(60), |open| !*open).unwrap();
            if !*open {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the gate stayed shut"));
            }
            self.bytes.read_at(buf, offset)
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    fn files(sources: Vec<(&str, Arc<dyn BlockSource>)>) -> Vec<ServedFile> {
        sources.into_iter().map(|(name, source)| ServedFile { name: name.into(), source }).collect()
    }

    /// A request: `fuse_in_header` (unique 7) and `args`.
    fn request(opcode: u32, node: u64, args: &[u8]) -> Vec<u8> {
        let len = (IN_HEADER + args.len()) as u32;
        let mut r = Out::default().u32(len).u32(opcode).u64(7).u64(node).u32(0).u32(0).u32(0).u32(0).0;
        r.extend_from_slice(args);
        r
    }

    /// `fuse_read_in` at `offset` for `size` bytes.
    fn read_in(offset: u64, size: u32) -> Vec<u8> {
        Out::default().u64(0).u64(offset).u32(size).u32(0).u64(0).u32(0).u32(0).0
    }

    /// The reply's error (0 or -errno) and body, checking its header.
    fn answer(fs: &Filesystem, request: &[u8]) -> (i32, Vec<u8>) {
        let reply = fs.answer(request).expect("a reply");
        assert_eq!(le_u32(&reply, 0), Some(reply.len() as u32), "the reply's length");
        assert_eq!(le_u64(&reply, 8), Some(7), "the reply's unique");
        (le_u32(&reply, 4).unwrap() as i32, reply[OUT_HEADER..].to_vec())
    }

    /// The names in a READDIR reply.
    fn names(mut dirents: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        while !dirents.is_empty() {
            let len = le_u32(dirents, 16).unwrap() as usize;
            names.push(String::from_utf8(dirents[24..24 + len].to_vec()).unwrap());
            dirents = &dirents[(24 + len).next_multiple_of(8)..];
        }
        names
    }

    #[test]
    fn requests_are_answered_from_the_sources() {
        let data = pattern(10_000, 0);
        let fs = Filesystem::new(files(vec![
            ("lower0", Arc::new(Bytes(data.clone()))),
            ("lower1", Arc::new(Failing)),
        ]));
        let eno = |e: Errno| -e.raw_os_error();

        let (error, entry) = answer(&fs, &request(op::LOOKUP, ROOT, b"lower0\0"));
        assert_eq!((error, le_u64(&entry, 0), le_u64(&entry, 40 + 8)), (0, Some(2), Some(10_000)));
        let mode = le_u32(&entry, 40 + 60).unwrap();
        assert_eq!(mode, libc::S_IFREG | 0o444);
        assert_eq!(answer(&fs, &request(op::LOOKUP, ROOT, b"lower2\0")).0, eno(Errno::NOENT));
        assert_eq!(answer(&fs, &request(op::LOOKUP, 2, b"lower0\0")).0, eno(Errno::NOENT));

        let (error, attr) = answer(&fs, &request(op::GETATTR, ROOT, &[0; 16]));
        assert_eq!((error, le_u32(&attr, 16 + 60)), (0, Some(libc::S_IFDIR | 0o555)));

        // Reads: within, across and past the end.
        assert_eq!(answer(&fs, &request(op::READ, 2, &read_in(100, 4096))), (0, data[100..4196].to_vec()));
        assert_eq!(answer(&fs, &request(op::READ, 2, &read_in(9000, 4096))), (0, data[9000..].to_vec()));
        assert_eq!(answer(&fs, &request(op::READ, 2, &read_in(20_000, 4096))), (0, Vec::new()));
        // A source whose read fails: EIO, no bytes.
        assert_eq!(answer(&fs, &request(op::READ, 3, &read_in(0, 4096))), (eno(Errno::IO), Vec::new()));

        let (error, dirents) = answer(&fs, &request(op::READDIR, ROOT, &read_in(0, 4096)));
        assert_eq!(
            (error, names(&dirents)),
            (0, vec![".".into(), "..".into(), "lower0".into(), "lower1".into()])
        );
        let (_, dirents) = answer(&fs, &request(op::READDIR, ROOT, &read_in(3, 4096)));
        assert_eq!(names(&dirents), ["lower1"]);
        // Only what fits: one entry of 32 bytes.
        let (_, dirents) = answer(&fs, &request(op::READDIR, ROOT, &read_in(2, 40)));
        assert_eq!(names(&dirents), ["lower0"]);

        let open = |flags: i32| Out::default().u32(flags as u32).u32(0).0;
        assert_eq!(answer(&fs, &request(op::OPEN, 2, &open(libc::O_RDONLY))).0, 0);
        assert_eq!(answer(&fs, &request(op::OPEN, 2, &open(libc::O_RDWR))).0, eno(Errno::ROFS));
        assert_eq!(answer(&fs, &request(op::OPEN, ROOT, &open(libc::O_RDONLY))).0, eno(Errno::ISDIR));
        const MKDIR: u32 = 9;
        assert_eq!(answer(&fs, &request(MKDIR, ROOT, b"d\0")).0, eno(Errno::NOSYS));
        assert!(fs.answer(&request(op::FORGET, 2, &[0; 8])).is_none());
    }

    #[test]
    fn init_takes_only_the_offered_flags_and_asks_a_newer_kernel_again() {
        let init_in = |major: u32, flags: u32| Out::default().u32(major).u32(37).u32(128 << 10).u32(flags).0;
        let out = init(&init_in(7, ASYNC_READ | 1 << 5)).unwrap();
        assert_eq!(out.len(), 64);
        assert_eq!(
            (le_u32(&out, 0), le_u32(&out, 4), le_u32(&out, 12)),
            (Some(7), Some(MINOR), Some(ASYNC_READ))
        );
        let out = init(&init_in(8, 0)).unwrap();
        assert_eq!((le_u32(&out, 0), out.len()), (Some(7), 64));
        assert_eq!(init(&init_in(6, 0)), Err(Errno::PROTO));
    }

    /// Whether `dir` is a mount point (of this process's namespace).
    fn mounted(dir: &Path) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines().any(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap()))
    }

    /// Mounted for real (as root): a read waiting on a stalled source holds one worker while
    /// another file is read; a failed read is EIO; unmounting leaves no mount.
    #[test]
    fn a_stalled_read_does_not_stall_the_others_and_a_failed_read_is_eio() {
        use std::os::unix::fs::FileExt;
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        let dir = tempfile::tempdir_in(&base).unwrap();
        let (fast, slow) = (pattern(1 << 20, 1), pattern(1 << 20, 2));
        let gate =
            Arc::new(Gate { bytes: Bytes(slow.clone()), open: Mutex::new(false), opened: Condvar::new() });
        let sources: Vec<(&str, Arc<dyn BlockSource>)> =
            vec![("fast", Arc::new(Bytes(fast.clone()))), ("slow", gate.clone()), ("bad", Arc::new(Failing))];
        let mut mount =
            FuseMount::mount(dir.path(), files(sources), 4).expect("mount (the tests run as root)");
        assert!(mounted(dir.path()));

        let slow_path = dir.path().join("slow");
        let stalled = std::thread::spawn(move || std::fs::read(slow_path));
        // Another file, while the stalled read holds its worker.
        let mut buf = vec![0u8; 8192];
        std::fs::File::open(dir.path().join("fast")).unwrap().read_exact_at(&mut buf, 512 << 10).unwrap();
        assert_eq!(buf, fast[512 << 10..(512 << 10) + 8192]);
        assert!(!stalled.is_finished(), "the stalled read ended before the gate opened");
        *gate.open.lock().unwrap() = true;
        gate.opened.notify_all();
        assert!(stalled.join().unwrap().unwrap() == slow, "the stalled file's bytes");

        let err = std::fs::read(dir.path().join("bad")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        assert_eq!(std::fs::metadata(dir.path().join("fast")).unwrap().len(), 1 << 20);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["bad", "fast", "slow"]);
        assert!(std::fs::write(dir.path().join("fast"), b"x").is_err(), "a served file is read-only");

        assert_eq!(mount.unmount().unwrap(), Unmounted::Clean);
        assert!(mount.finished());
        assert!(!mounted(dir.path()));
    }
}

//! ext4 via `mke2fs -d` reading the layer's normalized stream from a spool file (e2fsprogs ≥
//! 1.47.1 reads tars), then debugfs for the xattrs its tar reader skips, then the inode fix-up.
//! No root needed: every owner, device and xattr is written into the image, not onto a host
//! filesystem.
//!
//! mke2fs needs the image size up front; the stream's counts ([`TreeStats`]) give it once the
//! stream has ended, hence the spool (sparse: runs of zeros are holes, see
//! [`super::SparseSpool`]). mke2fs makes files, directories, links, devices and holes (it
//! skips zero blocks), and keeps `security.capability` only; `debugfs ea_set` adds every other
//! xattr (`trusted.overlay.opaque` among them) and removes the `lost+found` mke2fs adds unless
//! the layer has its own; [`super::ext4_fixup`] then writes owners, permission bits and times
//! exactly as the stream has them.
//!
//! Reproducible: built-in defaults instead of the host's mke2fs.conf, `E2FSPROGS_FAKE_TIME`
//! for superblock and creation times, UUID and directory hash seed from the chain ID.

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Write};
use std::path::Path;

use oci_spec::image::Digest;

use super::BackendError;
use super::ext4_fixup::{self, Image};
use super::tool::{self, Tool, ToolError};
use crate::layer::dirindex::DirMeta;
use crate::layer::meta::{BLOCK, EntryMeta, TreeStats};

/// Fixed "now" for mke2fs and debugfs (superblock times, reserved inodes). Not 0: e2fsprogs
/// reads 0 as "unset" and takes the clock.
const FAKE_TIME: &str = "1";
const INODE_SIZE: u64 = 256;
const BLOCKS_PER_GROUP: u64 = 32768;
/// The xattr mke2fs's tar reader copies itself.
const COPIED_BY_MKE2FS: &[u8] = b"security.capability";

#[derive(Debug, Clone)]
pub struct Ext4 {
    mkfs: Tool,
    debugfs: Tool,
}

impl Ext4 {
    pub fn detect() -> Result<Self, ToolError> {
        Ok(Ext4 {
            mkfs: Tool::find("mkfs.ext4", "e2fsprogs", &["-V"], "1.47.1")?,
            debugfs: Tool::find("debugfs", "e2fsprogs", &["-V"], "1.47.1")?,
        })
    }

    pub fn describe(&self) -> String {
        format!("mkfs.ext4 {}", self.mkfs.version)
    }

    /// Makes `out` from the normalized stream spooled at `tar` (whose counts are `stats`);
    /// `work` is a private scratch directory.
    pub fn make_from_tar(
        &self,
        tar: &Path,
        stats: &TreeStats,
        chain_id: &Digest,
        out: &Path,
        work: &Path,
    ) -> Result<(), BackendError> {
        let started = std::time::Instant::now();
        let spool_err = |source| BackendError::Spool { path: tar.to_owned(), source };
        let wanted = final_metadata(tar).map_err(spool_err)?;
        let read_at = std::time::Instant::now();
        let root = wanted.get(&b""[..]).cloned().unwrap_or_else(DirMeta::fallback);
        let (blocks, inodes) = size_blocks(stats);
        let mut cmd = self.mkfs.command();
        cmd.env("MKE2FS_CONFIG", "/nonexistent")
            .env("E2FSPROGS_FAKE_TIME", FAKE_TIME)
            .env("LC_ALL", "C")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0"])
            .args(["-O", "^has_journal,^resize_inode"])
            .arg("-E")
            .arg(format!(
                "root_owner={}:{},hash_seed={},lazy_itable_init=0,nodiscard",
                root.uid,
                root.gid,
                super::uuid_from(chain_id, 16)
            ))
            .arg("-U")
            .arg(super::uuid_from(chain_id, 0))
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-d")
            .arg(tar)
            .arg(out)
            .arg(blocks.to_string());
        tool::run("mkfs.ext4", &mut cmd)?;
        let mkfs_at = std::time::Instant::now();

        let fixup_err = |source| BackendError::Fixup { path: out.to_owned(), source };
        // One handle for the walk and the fix-up: debugfs's writes in between reach it
        // through the page cache.
        let image = Image::open(out).map_err(fixup_err)?;
        let paths = image.walk().map_err(fixup_err)?;
        self.add_xattrs_and_drop_lost_found(out, work, &paths, &wanted)?;
        for (path, ino) in &paths {
            let Some(meta) = wanted.get(path) else {
                continue; // mke2fs's own lost+found, removed above
            };
            let mut inode = image.read_inode(*ino).map_err(fixup_err)?;
            ext4_fixup::set_fields(&mut inode, meta);
            image.write_inode(*ino, &mut inode).map_err(fixup_err)?;
        }
        crate::progress::debug(&format!(
            "ext4: spool read in {:.2}s, mke2fs {:.2}s, debugfs and fix-up {:.2}s",
            (read_at - started).as_secs_f64(),
            (mkfs_at - read_at).as_secs_f64(),
            mkfs_at.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// One debugfs run: `ea_set` for each xattr mke2fs did not copy (values passed through
    /// files, so any bytes go), `rmdir lost+found` unless the layer lists one. debugfs exits 0
    /// when a request fails, so anything it says on stderr besides its banner is a failure.
    fn add_xattrs_and_drop_lost_found(
        &self,
        out: &Path,
        work: &Path,
        paths: &[(Vec<u8>, u32)],
        wanted: &HashMap<Vec<u8>, EntryMeta>,
    ) -> Result<(), BackendError> {
        let mut script = Vec::new();
        if !wanted.contains_key(&b"lost+found"[..]) {
            script.extend_from_slice(b"rmdir lost+found\n");
        }
        let values = work.join("xattr-values");
        let write_err = |path: &Path| {
            let path = path.to_owned();
            move |source| BackendError::Spool { path, source }
        };
        fs_err::create_dir_all(&values).map_err(write_err(&values))?;
        let mut done = HashSet::new();
        let mut n = 0;
        for (path, ino) in paths {
            let Some(meta) = wanted.get(path) else { continue };
            if !done.insert(*ino) {
                continue; // another name of a hardlinked inode
            }
            for (name, value) in meta.xattrs.iter().filter(|(k, _)| k != COPIED_BY_MKE2FS) {
                if name.iter().any(|&b| b <= b' ' || b == b'"' || b == b'\\' || b >= 0x7f) {
                    return Err(BackendError::XattrName { name: String::from_utf8_lossy(name).into_owned() });
                }
                let file = values.join(n.to_string());
                n += 1;
                fs_err::write(&file, value).map_err(write_err(&file))?;
                writeln!(
                    script,
                    "ea_set -f \"{}\" <{ino}> {}",
                    file.display(),
                    String::from_utf8_lossy(name)
                )
                .expect("writing to a Vec");
            }
        }
        if script.is_empty() {
            return Ok(());
        }
        let cmds = work.join("debugfs.cmds");
        fs_err::write(&cmds, &script).map_err(write_err(&cmds))?;
        let mut cmd = self.debugfs.command();
        cmd.env("E2FSPROGS_FAKE_TIME", FAKE_TIME).arg("-w").arg("-f").arg(&cmds).arg(out);
        let output = tool::run("debugfs", &mut cmd)?;
        let complaints: Vec<String> = String::from_utf8_lossy(&output.stderr)
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
            .map(str::to_string)
            .collect();
        if !complaints.is_empty() {
            return Err(ToolError::Failed {
                tool: "debugfs".into(),
                status: output.status,
                stderr_tail: complaints.join(" | "),
            }
            .into());
        }
        Ok(())
    }
}

/// What each path of the stream ends up as: the last entry for a path wins (the normalizer
/// repeats directories with their final metadata); a hardlink's names share its target's.
fn final_metadata(tar: &Path) -> std::io::Result<HashMap<Vec<u8>, EntryMeta>> {
    let file = fs_err::File::open(tar)?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 16, file.into_parts().0));
    let mut wanted: HashMap<Vec<u8>, EntryMeta> = HashMap::new();
    for entry in archive.entries_with_seek()? {
        let mut entry = entry?;
        let meta = crate::layer::entry::entry_meta(&mut entry).map_err(std::io::Error::other)?;
        let path = stream_path(&entry.path_bytes());
        if entry.header().entry_type() == tar::EntryType::Link {
            let target = stream_path(&entry.link_name_bytes().unwrap_or_default());
            if let Some(shared) = wanted.get(&target).cloned() {
                wanted.insert(path, shared);
            }
        } else {
            wanted.insert(path, meta);
        }
    }
    Ok(wanted)
}

/// A path as the normalized stream writes it (`./`, `dir/`, `file`) → layer path bytes.
fn stream_path(raw: &[u8]) -> Vec<u8> {
    let p = raw.strip_suffix(b"/").unwrap_or(raw);
    if p == b"." { Vec::new() } else { p.to_vec() }
}

/// Blocks and inodes for an ext4 image of a layer: everything the content needs plus the
/// metadata mke2fs lays out for that size, with a small margin — never short, little waste.
pub fn size_blocks(s: &TreeStats) -> (u64, u64) {
    let inodes = s.inodes + 16;
    let dir_blocks = s.dirs + (s.dirent_bytes * 5 / 4).div_ceil(BLOCK);
    // Extent tree blocks for big files (fragmentation is low in a fresh image).
    let extent_blocks = s.file_bytes / (64 << 20) + 1;
    let content = s.data_blocks + s.extra_blocks + dir_blocks + extent_blocks + 4; // + lost+found
    let inode_table = (inodes * INODE_SIZE).div_ceil(BLOCK);
    let mut total = content + inode_table + 64;
    // Per group: block and inode bitmaps, superblock backup and descriptors, inode table slack.
    let groups = total.div_ceil(BLOCKS_PER_GROUP);
    total += groups * 4 + groups * 2;
    total += total / 50;
    (total.max(256), inodes)
}

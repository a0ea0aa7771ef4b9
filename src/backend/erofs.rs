//! EROFS via `mkfs.erofs` from a staging tree.
//!
//! Reproducible with erofs-utils 1.5: every inode is extended (`-E force-inode-extended`), so
//! each keeps its own mtime, including times before 1970, and none depends on the build time
//! (a compact inode has no mtime and shows the superblock's build time). The build time is
//! then zeroed in the superblock and its checksum recomputed ([`fix_build_time`]).
//! `SOURCE_DATE_EPOCH` cannot do this: 1.5 clamps every newer mtime to it, and compares
//! them unsigned, so negative mtimes would be clamped. `-T` overwrites every file's mtime.
//! The UUID comes from the chain ID; directory entries are sorted by name, so the staging
//! tree's readdir order does not matter.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use oci_spec::image::Digest;

use super::BackendError;
use super::tool::{self, Tool, ToolError};

const SB_OFFSET: usize = 1024;
const SB_BLOCK: usize = 4096;
const MAGIC: u32 = 0xE0F5_E1E2;
const COMPAT_SB_CHKSUM: u32 = 0x1;

#[derive(Debug, Clone)]
pub struct Erofs {
    mkfs: Tool,
}

impl Erofs {
    pub fn detect() -> Result<Self, ToolError> {
        // erofs-utils 1.5's mkfs.erofs has no version flag; fsck.erofs from the same package does.
        let mkfs = Tool::find("mkfs.erofs", "erofs-utils", &["--version"], "1.5").or_else(|e| match e {
            ToolError::UnknownVersion { .. } => {
                let fsck = Tool::find("fsck.erofs", "erofs-utils", &["-V"], "1.5")?;
                let path = tool::locate("mkfs.erofs")
                    .ok_or(ToolError::NotFound { tool: "mkfs.erofs", package: "erofs-utils" })?;
                Ok(Tool { name: "mkfs.erofs", path, version: fsck.version })
            }
            e => Err(e),
        })?;
        Ok(Erofs { mkfs })
    }

    pub fn describe(&self) -> String {
        format!("mkfs.erofs {}", self.mkfs.version)
    }

    pub fn make(&self, staging: &Path, chain_id: &Digest, out: &Path) -> Result<(), BackendError> {
        let mut cmd = self.mkfs.command();
        cmd.env("LC_ALL", "C")
            .env_remove("SOURCE_DATE_EPOCH")
            .arg("--quiet")
            .arg("-Eforce-inode-extended")
            .arg(format!("-U{}", super::uuid_from(chain_id, 0)))
            .arg(out)
            .arg(staging);
        tool::run("mkfs.erofs", &mut cmd)?;
        fix_build_time(out).map_err(|source| BackendError::Fixup { path: out.to_owned(), source })
    }
}

/// Sets the superblock's build time to 0 and recomputes the superblock checksum.
pub fn fix_build_time(image: &Path) -> io::Result<()> {
    let f = File::options().read(true).write(true).open(image)?;
    let mut block = vec![0u8; SB_BLOCK];
    f.read_exact_at(&mut block, 0)?;
    let sb = &mut block[SB_OFFSET..];
    if u32::from_le_bytes(sb[0..4].try_into().unwrap()) != MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not an EROFS image (bad superblock magic)"));
    }
    sb[0x18..0x24].fill(0); // build_time (u64), build_time_nsec (u32)
    if u32::from_le_bytes(sb[8..12].try_into().unwrap()) & COMPAT_SB_CHKSUM != 0 {
        sb[4..8].fill(0);
        // Linux `crc32c(~0, …)`: no final inversion.
        let crc = !crc32c::crc32c_append(0, sb);
        sb[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    f.write_all_at(&block, 0)?;
    f.sync_all()
}

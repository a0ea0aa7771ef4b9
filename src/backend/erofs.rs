//! EROFS via `mkfs.erofs` from a staging tree.
//!
//! Reproducible with erofs-utils 1.5: `SOURCE_DATE_EPOCH` fixes the superblock build time
//! without touching file mtimes as long as it is later than all of them (1.5 clamps newer
//! mtimes to it, so it is set to 9999-12-31); the UUID comes from the chain ID; directory
//! entries are sorted by name, so readdir order of the staging tree does not matter. `-T`
//! is not used: it overwrites every file's mtime.

use std::path::Path;

use oci_spec::image::Digest;

use super::BackendError;
use super::tool::{self, Tool, ToolError};

/// Later than any mtime a layer will carry: 9999-12-31T23:59:59Z.
const BUILD_TIME: &str = "253402300799";

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
                let path = which::which("mkfs.erofs")
                    .map_err(|_| ToolError::NotFound { tool: "mkfs.erofs", package: "erofs-utils" })?;
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
        cmd.env("SOURCE_DATE_EPOCH", BUILD_TIME)
            .env("LC_ALL", "C")
            .arg("--quiet")
            .arg(format!("-U{}", super::uuid_from(chain_id, 0)))
            .arg(out)
            .arg(staging);
        tool::run("mkfs.erofs", &mut cmd)?;
        Ok(())
    }
}

//! External tools (mkfs.erofs, mkfs.ext4, debugfs, fsck): found up front, version-checked,
//! run with stdin closed, their stderr tail kept for errors.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// A tool is missing, too old, or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ToolError {
    #[error(
        "{tool} not found on PATH: install it with `apt-get install {package}` (Debian) or your distribution's {package} package"
    )]
    NotFound { tool: &'static str, package: &'static str },
    #[error("{tool} {found} is too old: vmrootfs needs {package} {required} or newer")]
    TooOld { tool: &'static str, package: &'static str, found: String, required: String },
    #[error("could not tell the version of {tool} from its output {output:?}")]
    UnknownVersion { tool: &'static str, output: String },
    #[error("could not run {tool}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr_tail}")]
    Failed { tool: String, status: std::process::ExitStatus, stderr_tail: String },
}

/// A located, version-checked tool.
#[derive(Debug, Clone)]
pub struct Tool {
    pub name: &'static str,
    pub path: PathBuf,
    pub version: String,
}

impl Tool {
    /// Finds `name` — the path in `VMROOTFS_TOOL_<NAME>` (e.g. `VMROOTFS_TOOL_MKFS_EROFS` for a
    /// newer erofs-utils built elsewhere), else on PATH, else in /sbin and /usr/sbin, which
    /// non-root PATHs often lack — asks it for its version with `version_args` and checks it
    /// against `required`.
    pub fn find(
        name: &'static str,
        package: &'static str,
        version_args: &[&str],
        required: &str,
    ) -> Result<Tool, ToolError> {
        let path = locate(name).ok_or(ToolError::NotFound { tool: name, package })?;
        let out = Command::new(&path)
            .args(version_args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ToolError::Spawn { tool: name.to_string(), source })?;
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let version = parse_version(&text).ok_or_else(|| ToolError::UnknownVersion {
            tool: name,
            output: text.chars().take(200).collect(),
        })?;
        if version_key(&version) < version_key(required) {
            return Err(ToolError::TooOld {
                tool: name,
                package,
                found: version,
                required: required.to_string(),
            });
        }
        Ok(Tool { name, path, version })
    }

    /// A command for this tool; run it with [`run`].
    pub fn command(&self) -> Command {
        Command::new(&self.path)
    }
}

/// Where `name` is: `VMROOTFS_TOOL_<NAME>`, PATH, /usr/sbin, /sbin.
pub fn locate(name: &str) -> Option<PathBuf> {
    let var = format!("VMROOTFS_TOOL_{}", name.to_ascii_uppercase().replace(['.', '-'], "_"));
    if let Some(p) = std::env::var_os(&var).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    which::which(name).or_else(|_| which::which_in(name, Some("/usr/sbin:/sbin"), "/")).ok()
}

/// Runs a tool to completion: stdin closed, output captured; a failure carries the exit status
/// and the last KiB of stderr.
pub fn run(tool: &str, cmd: &mut Command) -> Result<Output, ToolError> {
    crate::progress::debug(&format!("running {cmd:?}"));
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| ToolError::Spawn { tool: tool.to_string(), source })?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(if out.stderr.is_empty() { &out.stdout } else { &out.stderr })
            .into_owned();
        let start = text.len().saturating_sub(1024);
        let start = (start..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
        return Err(ToolError::Failed {
            tool: tool.to_string(),
            status: out.status,
            stderr_tail: text[start..].trim().replace('\n', " | "),
        });
    }
    Ok(out)
}

/// The first `N.N[.N]` in a tool's version banner.
fn parse_version(text: &str) -> Option<String> {
    text.split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == ',')
        .map(|w| w.trim_start_matches('v'))
        .find(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() >= 2 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_string)
}

fn version_key(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_banners() {
        let cases = [
            ("mke2fs 1.47.0 (5-Feb-2023)\n\tUsing EXT2FS Library version 1.47.0", Some("1.47.0")),
            ("fsck.erofs 1.5", Some("1.5")),
            ("mkfs.erofs (erofs-utils) 1.8.5", Some("1.8.5")),
            ("no version here", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_version(text).as_deref(), want, "{text}");
        }
        assert!(version_key("1.47.0") > version_key("1.46.6"));
        assert!(version_key("1.10") > version_key("1.5"));
    }
}

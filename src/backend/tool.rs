//! External tools (mkfs.erofs, fsck.erofs, e2fsck): found up front, version-checked,
//! run with stdin closed — or, in streaming mode, fed through a pipe — the tail of what they
//! printed (stdout and stderr) kept for errors.

use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};

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
    #[error("{}={value:?}: expected \"vmrootfs\" (the default) or \"mkfs\"", super::EROFS_WRITER_ENV)]
    UnknownErofsWriter { value: String },
}

/// A located, version-checked tool.
#[derive(Debug, Clone)]
pub struct Tool {
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
        Ok(Tool { path, version })
    }

    /// A command for this tool; run it with [`run`]. The tool dies with the thread that
    /// starts it, so a vmrootfs killed outright (SIGKILL, OOM) leaves no mkfs or QEMU behind
    /// still writing into the store.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.path);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (prctl, getppid, _exit).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::_exit(1); // the parent died before prctl took effect
                }
                Ok(())
            });
        }
        cmd
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
/// and the last KiB of what the tool printed (stdout, then stderr: mkfs.erofs and e2fsck say
/// why on either).
pub fn run(tool: &str, cmd: &mut Command) -> Result<Output, ToolError> {
    crate::progress::debug(&format!("running {cmd:?}"));
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| ToolError::Spawn { tool: tool.to_string(), source })?;
    if !out.status.success() {
        let said = [out.stdout.as_slice(), out.stderr.as_slice()].concat();
        return Err(failed(tool, out.status, &said));
    }
    Ok(out)
}

/// A failure carrying the last KiB of what the tool said.
fn failed(tool: &str, status: ExitStatus, said: &[u8]) -> ToolError {
    let text = String::from_utf8_lossy(said);
    let text = if text.trim().is_empty() { "(it printed nothing)".into() } else { text };
    let start = text.len().saturating_sub(1024);
    let start = (start..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
    ToolError::Failed {
        tool: tool.to_string(),
        status,
        stderr_tail: text[start..].trim().replace('\n', " | "),
    }
}

/// A tool reading its input from a pipe the caller writes (streaming mode). Its stdout and
/// stderr go to one unnamed temp file (mkfs.erofs prints some errors on stdout), so a chatty
/// tool can never block on a full pipe and a failure carries the tool's own words. Dropped without
/// [`Streaming::finish`], the tool is killed and reaped.
pub struct Streaming {
    tool: String,
    child: Child,
    stdin: Option<ChildStdin>,
    /// Where the tool's stdout and stderr go.
    said: std::fs::File,
}

impl Streaming {
    pub fn spawn(tool: &str, cmd: &mut Command) -> Result<Streaming, ToolError> {
        crate::progress::debug(&format!("running {cmd:?} (input streamed)"));
        let spawn_err = |source| ToolError::Spawn { tool: tool.to_string(), source };
        let said = tempfile::tempfile().map_err(spawn_err)?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(said.try_clone().map_err(spawn_err)?)
            .stderr(said.try_clone().map_err(spawn_err)?)
            .spawn()
            .map_err(spawn_err)?;
        let stdin = child.stdin.take();
        if let Some(s) = &stdin {
            // A 1 MiB pipe (the unprivileged maximum) instead of 64 KiB: 16 times fewer
            // switches between the stream and the tool. Best effort; the default works too.
            // SAFETY: a valid pipe descriptor; F_SETPIPE_SZ only resizes its buffer.
            unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(s), libc::F_SETPIPE_SZ, 1 << 20) };
        }
        Ok(Streaming { tool: tool.to_string(), child, stdin, said })
    }

    /// Ends the input and waits for the tool; a failure carries the tail of what it printed.
    pub fn finish(mut self) -> Result<(), ToolError> {
        drop(self.stdin.take());
        let status =
            self.child.wait().map_err(|source| ToolError::Spawn { tool: self.tool.clone(), source })?;
        if status.success() {
            return Ok(());
        }
        let mut said = Vec::new();
        let _ = self.said.rewind().and_then(|_| self.said.read_to_end(&mut said));
        Err(failed(&self.tool, status, &said))
    }
}

impl Write for Streaming {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.stdin {
            Some(s) => s.write(buf),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stdin.as_mut().map_or(Ok(()), |s| s.flush())
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
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
    fn a_streaming_failure_carries_what_the_tool_printed_on_stdout_and_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cat >/dev/null; echo said-on-stdout; echo said-on-stderr >&2; exit 3"]);
        let mut s = Streaming::spawn("sh", &mut cmd).unwrap();
        s.write_all(b"input").unwrap();
        let err = s.finish().unwrap_err().to_string();
        assert!(err.contains("said-on-stdout") && err.contains("said-on-stderr"), "{err}");
        let err = run("sh", Command::new("sh").args(["-c", "echo only-stdout; exit 1"])).unwrap_err();
        assert!(err.to_string().contains("only-stdout"), "{err}");
        let err = run("false", &mut Command::new("false")).unwrap_err();
        assert!(err.to_string().contains("printed nothing"), "{err}");
    }

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

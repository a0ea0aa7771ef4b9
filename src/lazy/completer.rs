//! Completion after the command: `run --lazy` exits with the command's status and a detached
//! process of its own binary (`vmrootfs lazy-complete REF`) fetches the rest of the image,
//! publishes the blobs and records it, as [`super::LazyImage::complete`] would have in the run.
//!
//! The hand-over leaves no moment in which nobody holds the image: the completer takes the
//! store's shared lock (so `gc` cannot clear the caches) and says `ready` on its stdout before
//! the run lets go of the caches; it then waits for their locks, reopens them (what is cached
//! stays: a completion resumes like any rerun) and completes. A run of the same reference
//! meanwhile waits for those locks too, then boots the recorded image. The registry options
//! (credentials among them) go to the completer on its stdin, never on its command line.
//! What it says goes to `lazy/complete-<reference hash>.log` in the store, removed once the
//! image is recorded (a failed completion's stays, until `gc`). A completer that cannot
//! start leaves the run to complete the image itself, saying so.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{LazyError, LazyImage};
use crate::progress::Reporter;
use crate::record::BuildResult;
use crate::source::RegistryOptions;
use crate::store::Store;

/// What the completer prints once it holds the store lock.
const READY: &str = "ready";

/// Where the completer of the image recorded as `tag` writes what it says.
pub fn log_path(store: &Store, tag: &str) -> PathBuf {
    let hex = crate::digest::sha256_of(tag.as_bytes()).digest()[..16].to_string();
    store.root().join("lazy").join(format!("complete-{hex}.log"))
}

/// Hands `image` (the run's, its command exited; to be recorded as `tag`) to a detached
/// `program lazy-complete` and returns its pid once it holds the store; if it cannot start,
/// completes `image` here.
pub fn hand_over(
    store: &Store,
    tag: &str,
    registry: &RegistryOptions,
    program: &Path,
    image: LazyImage,
) -> Result<Option<u32>, LazyError> {
    match spawn(store, image.pinned(), tag, registry, program) {
        Ok(pid) => {
            // The completer waits for the caches' locks, which go with the image.
            drop(image);
            Ok(Some(pid))
        }
        Err(why) => {
            eprintln!(
                "warning: the background completion of {tag} could not start ({why}): completing it before exiting"
            );
            image.complete(store, Some(tag), &Reporter::new())?;
            Ok(None)
        }
    }
}

/// Starts the completer of the image `pinned` (`host/repo@digest`), to be recorded as `tag`,
/// and waits for its `ready`.
fn spawn(
    store: &Store,
    pinned: &str,
    tag: &str,
    registry: &RegistryOptions,
    program: &Path,
) -> Result<u32, String> {
    let log_path = log_path(store, tag);
    let log = fs_err::File::create(&log_path).map_err(|e| e.to_string())?.into_parts().0;
    let mut cmd = Command::new(program);
    cmd.arg("--store").arg(store.root()).args(["lazy-complete", pinned, "--tag", tag]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(log);
    // Its own process group: a Ctrl-C to the run's does not end the completion.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", program.display()))?;
    let options = serde_json::to_vec(registry).expect("registry options serialize");
    let mut stdin = child.stdin.take().expect("piped");
    let sent = stdin.write_all(&options);
    drop(stdin);
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
    let read = std::io::BufReader::new(stdout).read_line(&mut line);
    if sent.is_ok() && read.is_ok() && line.trim() == READY {
        return Ok(child.id());
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(format!("it ended before taking over; see {}", log_path.display()))
}

/// `vmrootfs lazy-complete REF --tag TAG`: the registry options from `options` (the run's
/// stdin), the store's shared lock, `ready` on stdout, then the caches of `reference` (the
/// run's image, pinned) reopened once the run has let go of them, completed, published and
/// recorded as `tag`. An image recorded meanwhile is left as it is.
pub fn run(
    store: &Store,
    reference: &str,
    tag: &str,
    options: impl std::io::Read,
    reporter: &Reporter,
) -> Result<Option<BuildResult>, LazyError> {
    let registry: RegistryOptions = serde_json::from_reader(options)
        .map_err(|e| LazyError::Completer(format!("no registry options on stdin: {e}")))?;
    let _store_lock = store.lock_shared()?;
    let mut out = std::io::stdout();
    let told = writeln!(out, "{READY}").and_then(|()| out.flush());
    told.map_err(|e| LazyError::Completer(format!("stdout: {e}")))?;
    reporter.line(&format!("completing {reference} as {tag} (pid {})", std::process::id()));
    let image = super::open(store, reference, &registry, &crate::Platform::host())?;
    if store.get(tag).is_ok() {
        reporter.line(&format!("{tag} was recorded meanwhile"));
        image.discard()?;
        return Ok(None);
    }
    let built = image.complete(store, Some(tag), reporter)?;
    // Done: the log goes too (a failed completion's stays, for the user and for gc).
    let _ = fs_err::remove_file(log_path(store, tag));
    Ok(Some(built))
}

//! Mounts that cannot outlive their maker: work done in a private mount namespace of a thread
//! of its own. Everything mounted there (and the loop devices under it, which are
//! auto-cleared) goes when the thread ends, even when the process is SIGKILLed mid-way: the
//! kernel drops a namespace with its last task. No other thread, and no other process, ever
//! sees those mounts.

/// Setting up the private mount namespace failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountNsError {
    #[error("unshare(CLONE_NEWNS) for a private mount namespace (needs CAP_SYS_ADMIN)")]
    Unshare(#[source] std::io::Error),
    #[error("making every mount private in the new mount namespace (mount --make-rprivate /)")]
    MakePrivate(#[source] std::io::Error),
}

/// Runs `work` on a new thread in a mount namespace of its own, whose mounts propagate
/// nowhere; they are gone when it returns. Commands `work` spawns start in that namespace.
pub fn in_private_namespace<T, E>(work: impl FnOnce() -> Result<T, E> + Send) -> Result<T, E>
where
    T: Send,
    E: From<MountNsError> + Send,
{
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            // SAFETY: NEWNS (with the CLONE_FS it implies) gives this thread its own mount
            // table, root and working directory; file descriptor tables stay shared.
            unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }
                .map_err(|e| MountNsError::Unshare(e.into()))?;
            // A copy of a shared mount would pass our mounts on to its peers outside.
            use rustix::mount::MountPropagationFlags as P;
            rustix::mount::mount_change("/", P::PRIVATE | P::REC)
                .map_err(|e| MountNsError::MakePrivate(e.into()))?;
            work()
        });
        thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

//! Progress and log output on stderr: bars on a terminal, plain lines otherwise.

use std::sync::atomic::{AtomicU8, Ordering};

static VERBOSITY: AtomicU8 = AtomicU8::new(1);

/// 0 = quiet, 1 = normal, 2 = verbose (debug lines, tool command lines).
pub fn set_verbosity(level: u8) {
    VERBOSITY.store(level, Ordering::Relaxed);
}

pub(crate) fn verbosity() -> u8 {
    VERBOSITY.load(Ordering::Relaxed)
}

/// A debug line (only with `-v`).
pub(crate) fn debug(msg: &str) {
    if verbosity() >= 2 {
        eprintln!("debug: {msg}");
    }
}

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use oci_spec::image::Digest;

/// Reports a build's layers: a bar per layer on a terminal, a line per event otherwise.
pub struct Reporter {
    bars: Option<MultiProgress>,
}

impl Default for Reporter {
    fn default() -> Self {
        Self::new()
    }
}

fn short(d: &Digest) -> String {
    format!("{}:{}", d.algorithm(), &d.digest()[..12.min(d.digest().len())])
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

impl Reporter {
    /// Bars when stderr is a terminal (and not quiet), else plain lines.
    pub fn new() -> Self {
        let bars = (verbosity() >= 1 && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Reporter { bars }
    }

    /// Prints a line above the bars (or plainly), unless quiet.
    pub(crate) fn line(&self, msg: &str) {
        match &self.bars {
            Some(m) => {
                let _ = m.println(msg);
            }
            None if verbosity() >= 1 => eprintln!("{msg}"),
            None => {}
        }
    }

    /// A layer that is already in the store.
    pub(crate) fn cached(&self, index: usize, total: usize, digest: &Digest) {
        self.line(&format!("layer {}/{total} {}: stored, skipped", index + 1, short(digest)));
    }

    /// A layer whose conversion starts now.
    pub(crate) fn layer(
        &self,
        index: usize,
        total: usize,
        digest: &Digest,
        size: Option<u64>,
    ) -> LayerProgress {
        self.start(index, total, digest, size, ("unpacking", "converting", "converted"))
    }

    /// A ready-made layer blob (an EROFS image's) whose download starts now.
    pub(crate) fn fetch(
        &self,
        index: usize,
        total: usize,
        digest: &Digest,
        size: Option<u64>,
    ) -> LayerProgress {
        self.start(index, total, digest, size, ("fetching", "fetching", "fetched, no conversion,"))
    }

    /// `words`: the bar's first message, the line's "…ing", the line's "…ed".
    fn start(
        &self,
        index: usize,
        total: usize,
        digest: &Digest,
        size: Option<u64>,
        words: (&'static str, &'static str, &'static str),
    ) -> LayerProgress {
        let label = format!("layer {}/{total} {}", index + 1, short(digest));
        let bar = self.bars.as_ref().map(|m| {
            let bar = m.add(match size {
                Some(s) => ProgressBar::new(s),
                None => ProgressBar::no_length(),
            });
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label.clone());
            bar.set_message(words.0);
            bar
        });
        if bar.is_none() {
            self.line(&format!("{label}: {}", words.1));
        }
        LayerProgress { bar, label, start: Instant::now(), quiet: verbosity() == 0, done: words.2 }
    }
}

/// Progress of one layer's conversion.
pub(crate) struct LayerProgress {
    bar: Option<ProgressBar>,
    label: String,
    start: Instant,
    quiet: bool,
    /// What the last line says happened ("converted").
    done: &'static str,
}

impl LayerProgress {
    /// Compressed bytes read.
    pub(crate) fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// The step now running ("mkfs", …).
    pub(crate) fn step(&self, step: &str) {
        if let Some(b) = &self.bar {
            b.set_message(step.to_string());
        }
    }

    pub(crate) fn done(&self, blob_size: u64) {
        let msg = format!(
            "{}: {} in {:.1}s, blob {}",
            self.label,
            self.done,
            self.start.elapsed().as_secs_f64(),
            mib(blob_size)
        );
        match &self.bar {
            Some(b) => b.finish_with_message(format!(
                "done in {:.1}s, blob {}",
                self.start.elapsed().as_secs_f64(),
                mib(blob_size)
            )),
            None if !self.quiet => eprintln!("{msg}"),
            None => {}
        }
    }

    pub(crate) fn failed(&self) {
        if let Some(b) = &self.bar {
            b.abandon_with_message("failed");
        }
    }
}

/// A line of information on stderr (not with `-q`).
pub fn info(msg: &str) {
    if verbosity() >= 1 {
        eprintln!("{msg}");
    }
}

/// `e` with its causes, `: `-separated (for a line that reports an error and goes on).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        msg += &format!(": {c}");
        cause = c.source();
    }
    msg
}

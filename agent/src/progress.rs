//! Progress bars for long transfers, shown only on a terminal and never with `--quiet`.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress(Option<ProgressBar>);

/// A byte counter shown on a bar while the returned guard lives.
pub fn track(total: u64, what: &str, quiet: bool) -> (Progress, Arc<AtomicU64>) {
    let counter = Arc::new(AtomicU64::new(0));
    let p = Progress::bytes(total, what, quiet);
    if let Some(bar) = p.0.clone() {
        let c = counter.clone();
        tokio::spawn(async move {
            while !bar.is_finished() {
                bar.set_position(c.load(Ordering::Relaxed));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        });
    }
    (p, counter)
}

impl Progress {
    /// A byte-count bar for `total` bytes, or nothing when output is not a terminal or is quiet.
    pub fn bytes(total: u64, what: &str, quiet: bool) -> Progress {
        if quiet || !std::io::stderr().is_terminal() || total < 1024 * 1024 {
            return Progress(None);
        }
        let bar = ProgressBar::new(total).with_message(what.to_string());
        if let Ok(style) =
            ProgressStyle::with_template("{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Progress(Some(bar))
    }

    /// A spinner with a message, for scans and syncs of unknown size.
    pub fn spinner(what: &str, quiet: bool) -> Progress {
        if quiet || !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let bar = ProgressBar::new_spinner().with_message(what.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Progress(Some(bar))
    }

    pub fn set_message(&self, msg: String) {
        if let Some(b) = &self.0 {
            b.set_message(msg);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

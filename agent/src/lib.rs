//! The Shoal device agent: configuration, the coordinator client, the internal database, the
//! scanner, the pure sync planner, the executor that applies plans to disk, the uploader, the
//! daemon loop and the command line behind the `shoal` binary.

pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod engine;
pub mod limit;
pub mod oneshot;
pub mod own;
pub mod peer;
pub mod planner;
pub mod progress;
pub mod relay;
pub mod scan;
pub mod signals;
pub mod store;
pub mod transfer;
pub mod watch;

/// Flushes the whole file system holding `f`: one call makes a batch of written files durable.
pub(crate) fn syncfs(f: &std::fs::File) -> std::io::Result<()> {
    rustix::fs::syncfs(f)?;
    Ok(())
}

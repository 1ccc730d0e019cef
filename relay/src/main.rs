use std::path::PathBuf;

use clap::{Parser, Subcommand};
use shoal_relay::config;

/// A Shoal relay: caches chunks near the user, serving only what a coordinator's ticket covers.
#[derive(Parser)]
#[command(name = "shoal-relay", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Register with the coordinator and serve until Ctrl-C or SIGTERM.
    Serve {
        /// Config file (TOML) with the same settings as these flags; a flag overrides its key.
        #[arg(long, env = "SHOAL_RELAY_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        flags: config::Flags,
    },
}

fn main() -> anyhow::Result<()> {
    // Two arenas: every other arena would keep free memory the rest cannot reuse.
    shoal_sys::allocator::limit_arenas(2);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".parse().expect("a filter")),
        )
        .with_writer(std::io::stderr)
        .init();
    shoal_sys::failpoints::setup().map_err(anyhow::Error::msg)?;
    let Cli { cmd: Cmd::Serve { config, flags } } = Cli::parse();
    let file = match config {
        Some(path) => config::FileConfig::load(&path)?,
        None => config::FileConfig::default(),
    };
    let opts = config::options(flags, file)?;
    // Blocking threads read the cache: a few suffice, and each would hold an allocator arena.
    tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(8).build()?.block_on(async move {
        let server = shoal_relay::start(opts).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        server.shutdown();
        server.wait().await;
        Ok(())
    })
}

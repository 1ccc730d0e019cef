//! `shoal-coordinator`: serve the API, or administer users and devices. Thin: parse, then call the
//! library.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use shoal_coordinator::admin::{self, Request};
use shoal_coordinator::config;

#[derive(Parser)]
#[command(
    name = "shoal-coordinator",
    version,
    about = "Shoal's coordinator: metadata, journal and chunk store over HTTPS"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: the size of `Serve` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run the server until Ctrl-C or SIGTERM.
    Serve {
        /// Config file (TOML) with the same settings as these flags; a flag overrides its key.
        #[arg(long, env = "SHOAL_COORDINATOR_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        flags: config::Flags,
    },
    /// Collect garbage now: delete what no retained version references (see --keep-versions).
    Gc {
        /// Report what would be reclaimed; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, env = "SHOAL_COORDINATOR_DATA")]
        data: PathBuf,
    },
    /// Manage users.
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Manage a user's devices.
    Device {
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// Manage the regional relays that cache chunks near users.
    Relay {
        #[command(subcommand)]
        cmd: RelayCmd,
    },
}

#[derive(Subcommand)]
enum RelayCmd {
    /// Add a relay serving `region` and print its token (last line of output).
    Add {
        name: String,
        #[arg(long)]
        region: String,
        #[arg(long, env = "SHOAL_COORDINATOR_DATA")]
        data: PathBuf,
    },
    /// List relays with their regions and whether each is live (registered lately).
    List {
        #[arg(long, env = "SHOAL_COORDINATOR_DATA")]
        data: PathBuf,
    },
    /// Remove a relay: its token stops working and devices stop using it.
    Remove {
        name: String,
        #[arg(long, env = "SHOAL_COORDINATOR_DATA")]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// List users with their storage used and quota.
    List {
        #[arg(long, env = "SHOAL_COORDINATOR_DATA")]
        data: PathBuf,
    },
    /// Limit the storage a user's files may take ("10GiB", "500MB"), or `none`. Counts the
    /// distinct chunk bytes stored for the user (expired versions once collected) and what its
    /// pending versions await; an upload or commit that would pass it is refused.
    SetQuota {
        name: String,
        size: String,
        #[arg(long, env = "SHOAL_COORDINATOR_DATA")]
        data: PathBuf,
    },
    /// Create a user and print an invite for its first device (last line of output).
    Add {
        name: String,
        #[arg(long, env = "SHOAL_COORDINATOR_DATA")]
        data: PathBuf,
        /// How long the invite stays valid ("7d", "12h", "30m").
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        expires: Duration,
    },
    /// Print a new one-time invite to enroll another device of an existing user.
    Invite {
        name: String,
        #[arg(long, env = "SHOAL_COORDINATOR_DATA")]
        data: PathBuf,
        /// How long the invite stays valid ("7d", "12h", "30m").
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        expires: Duration,
    },
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// List a user's devices: id, name, journal cursor, state, last seen.
    List {
        user: String,
        #[arg(long, env = "SHOAL_COORDINATOR_DATA")]
        data: PathBuf,
    },
    /// Revoke a device (by id, or by name when only one device has it): its token stops working
    /// at once and its open push subscription is closed.
    Revoke {
        user: String,
        device: String,
        #[arg(long, env = "SHOAL_COORDINATOR_DATA")]
        data: PathBuf,
    },
    /// Undo a revocation made by mistake: the device's token and certificate work again, and it
    /// syncs on its next try.
    Reinstate {
        user: String,
        device: String,
        #[arg(long, env = "SHOAL_COORDINATOR_DATA")]
        data: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    // Everything the coordinator creates (database, packs, keys, sockets) is for its own account
    // only, whatever umask it was started with.
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
    // Before any other thread exists: a thread's first allocation picks its arena, so the
    // runtime's workers would otherwise each start one of their own past the cap. One arena: a
    // second one held ~60 MiB of free memory during a 100,000-file sync, for no CPU saved.
    shoal_sys::allocator::tune(1);
    tokio::runtime::Runtime::new().map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file (or `shoal demo`'s output) gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().cmd {
        Cmd::Serve { config, flags } => {
            let file = match config {
                Some(path) => config::FileConfig::load(&path)?,
                None => config::FileConfig::default(),
            };
            let opts = config::serve_options(file, flags)?;
            let server = shoal_coordinator::start(opts).await?;
            shutdown_signal().await;
            tracing::info!("shutting down");
            server.shutdown().await;
        }
        Cmd::Gc { dry_run, data } => println!("{}", admin::request(&data, &Request::Gc { dry_run }).await?),
        Cmd::User { cmd: UserCmd::List { data } } => println!("{}", admin::request(&data, &Request::UserList).await?),
        Cmd::User { cmd: UserCmd::SetQuota { name, size, data } } => {
            let quota = match size.as_str() {
                "none" => None,
                s => Some(shoal_protocol::size::parse_bytes(s).map_err(|e| anyhow::anyhow!("{e}, or `none`"))?),
            };
            println!("{}", admin::request(&data, &Request::SetQuota { user: name, quota }).await?);
        }
        Cmd::User { cmd: UserCmd::Add { name, data, expires } } => print_invite(&data, &name, true, expires).await?,
        Cmd::User { cmd: UserCmd::Invite { name, data, expires } } => {
            print_invite(&data, &name, false, expires).await?
        }
        Cmd::Relay { cmd: RelayCmd::Add { name, region, data } } => {
            println!("{}", admin::request(&data, &Request::RelayAdd { name, region }).await?)
        }
        Cmd::Relay { cmd: RelayCmd::List { data } } => {
            println!("{}", admin::request(&data, &Request::RelayList).await?)
        }
        Cmd::Relay { cmd: RelayCmd::Remove { name, data } } => {
            println!("{}", admin::request(&data, &Request::RelayRemove { name }).await?)
        }
        Cmd::Device { cmd: DeviceCmd::List { user, data } } => {
            println!("{}", admin::request(&data, &Request::DeviceList { user }).await?);
        }
        Cmd::Device { cmd: DeviceCmd::Revoke { user, device, data } } => {
            println!("{}", admin::request(&data, &Request::DeviceRevoke { user, device }).await?);
        }
        Cmd::Device { cmd: DeviceCmd::Reinstate { user, device, data } } => {
            println!("{}", admin::request(&data, &Request::DeviceReinstate { user, device }).await?);
        }
    }
    Ok(())
}

async fn print_invite(data: &std::path::Path, name: &str, create: bool, expires: Duration) -> anyhow::Result<()> {
    anyhow::ensure!(expires >= Duration::from_secs(1), "--expires must be at least 1s");
    let req = Request::Invite { user: name.to_string(), create, expires_secs: expires.as_secs() };
    let invite = admin::request(data, &req).await?;
    if create {
        println!("created user {name}");
    }
    println!(
        "enroll a device with: shoal init --invite '<invite>' --dir <folder> (valid for {})",
        humantime::format_duration(expires)
    );
    println!("{invite}");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler succeeds on Unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

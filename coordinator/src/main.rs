//! `shoal-coordinator`: serve the API, or administer users. Thin: parse, then call the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

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

#[derive(Subcommand)]
enum Cmd {
    /// Run the server until Ctrl-C or SIGTERM.
    Serve {
        /// Data directory (metadata, chunks, TLS identity).
        #[arg(long, env = "SHOAL_COORDINATOR_DATA")]
        data: PathBuf,
        /// Address to listen on (port 0 picks one; see DATA/server.json).
        #[arg(long, default_value = shoal_coordinator::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Address devices should dial, written into invites (default: the bound address).
        #[arg(long)]
        public_addr: Option<String>,
    },
    /// Manage users.
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create a user and print an invite for its first device (last line of output).
    Add {
        name: String,
        #[arg(long, env = "SHOAL_COORDINATOR_DATA")]
        data: PathBuf,
    },
    /// Print a new one-time invite to enroll another device of an existing user.
    Invite {
        name: String,
        #[arg(long, env = "SHOAL_COORDINATOR_DATA")]
        data: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shoal_coordinator::trim::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Serve { data, listen, public_addr } => {
            let server =
                shoal_coordinator::start(shoal_coordinator::ServeOptions { data, listen, public_addr }).await?;
            shutdown_signal().await;
            tracing::info!("shutting down");
            server.shutdown().await;
        }
        Cmd::User { cmd: UserCmd::Add { name, data } } => print_invite(&data, &name, true).await?,
        Cmd::User { cmd: UserCmd::Invite { name, data } } => print_invite(&data, &name, false).await?,
    }
    Ok(())
}

async fn print_invite(data: &std::path::Path, name: &str, create: bool) -> anyhow::Result<()> {
    let invite = shoal_coordinator::admin::request_invite(data, name, create).await?;
    if create {
        println!("created user {name}");
    }
    println!("enroll a device with: shoal init --invite '<invite>' --dir <folder>");
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

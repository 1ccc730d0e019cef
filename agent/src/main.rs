//! `shoal`: the device agent's command line. Thin: parse, set up logging, call `cli::run`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Two arenas: hashing and peer transfers allocate on several threads at once, and one shared
    // arena measured 0.1-0.3 CPU-s slower per GiB; the agent's memory is within its targets.
    shoal_sys::allocator::tune(2);
    if let Err(e) = shoal_sys::failpoints::setup() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let cli = shoal_agent::cli::Cli::parse();
    let default_level = if cli.wants_info_logs() { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(shoal_agent::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // Line breaks stay (a config file's parse error quotes the line at fault); every
            // other control character is escaped.
            eprintln!("error: {}", shoal_protocol::path::EscapedText(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

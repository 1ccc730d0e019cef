//! `shoal demo`: a coordinator and two devices in one process, syncing `DIR/laptop` and
//! `DIR/desktop` until Ctrl-C. State stays under `DIR/.state`, so a second run resumes.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

pub async fn run(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let data = dir.join(".state").join("coordinator");
    let listen: SocketAddr = std::fs::read(data.join("server.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<shoal_coordinator::ServerInfo>(&b).ok())
        .and_then(|i| i.addr.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let server = shoal_coordinator::start(shoal_coordinator::ServeOptions {
        data,
        listen,
        public_addr: None,
        metrics_listen: None,
    })
    .await?;
    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    for name in ["laptop", "desktop"] {
        let home = dir.join(".state").join(name);
        if !Config::path(&home).exists() {
            let invite = match server.invite("demo", true) {
                Ok(i) => i,
                Err(_) => server.invite("demo", false)?,
            };
            crate::cli::init(&home, &invite.to_string(), &dir.join(name), Some(name.to_string())).await?;
        }
        let cfg = Config::load(&home)?;
        let cancel = cancel.clone();
        tasks.push(tokio::spawn(async move { crate::daemon::run(&home, cfg, cancel).await }));
    }
    println!();
    println!("Shoal demo: coordinator on {} (data in {}/.state)", server.addr, dir.display());
    println!("  {}/laptop and {}/desktop are kept identical.", dir.display(), dir.display());
    println!("  Drop, edit, rename or delete files in either; press Ctrl-C to stop.");
    tokio::signal::ctrl_c().await?;
    cancel.cancel();
    for t in tasks {
        if let Ok(Err(e)) = t.await {
            eprintln!("error: {e:#}");
        }
    }
    server.shutdown().await;
    Ok(())
}

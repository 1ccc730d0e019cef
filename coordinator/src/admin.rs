//! Local administration while the server runs: a Unix socket in the data directory (mode 0600, so
//! only the operator's account can use it) that mints invites. sled allows one process per
//! database, so `user add` talks to the running server here and opens the store itself only when
//! no server is running.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use shoal_protocol::ChunkId;
use shoal_protocol::api::Invite;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::store::Store;

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    user: String,
    create: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    invite: Option<String>,
    error: Option<String>,
}

/// Longest request line the socket reads.
const MAX_LINE: u64 = 4096;

fn socket_path(data: &Path) -> std::path::PathBuf {
    data.join("admin.sock")
}

pub(crate) fn spawn(
    data: &Path,
    store: Store,
    addr: String,
    fingerprint: ChunkId,
    cancel: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(data);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        loop {
            let sock = tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            };
            let (store, addr) = (store.clone(), addr.clone());
            tokio::spawn(async move {
                let (rd, mut wr) = sock.into_split();
                let mut line = String::new();
                let mut rd = BufReader::new(tokio::io::AsyncReadExt::take(rd, MAX_LINE));
                if rd.read_line(&mut line).await.is_err() {
                    return;
                }
                let reply = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => match crate::invite(&store, &req.user, req.create, &addr, fingerprint) {
                        Ok(inv) => {
                            let _ = store.flush().await;
                            Reply { invite: Some(inv.to_string()), error: None }
                        }
                        Err(e) => Reply { invite: None, error: Some(format!("{e:#}")) },
                    },
                    Err(e) => Reply { invite: None, error: Some(format!("bad admin request: {e}")) },
                };
                let mut out = serde_json::to_vec(&reply).unwrap_or_default();
                out.push(b'\n');
                let _ = wr.write_all(&out).await;
            });
        }
    }))
}

/// Mints an invite through the running server's admin socket, or directly in the data directory
/// when no server is running.
pub async fn request_invite(data: &Path, user: &str, create: bool) -> anyhow::Result<Invite> {
    match tokio::net::UnixStream::connect(socket_path(data)).await {
        Ok(sock) => {
            let (rd, mut wr) = sock.into_split();
            let mut req = serde_json::to_vec(&Request { user: user.to_string(), create })?;
            req.push(b'\n');
            wr.write_all(&req).await?;
            let mut line = String::new();
            BufReader::new(rd).read_line(&mut line).await?;
            let reply: Reply = serde_json::from_str(&line).context("bad reply from the admin socket")?;
            match (reply.invite, reply.error) {
                (Some(inv), _) => Ok(inv.parse()?),
                (None, Some(e)) => anyhow::bail!(e),
                (None, None) => anyhow::bail!("empty reply from the admin socket"),
            }
        }
        Err(_) => {
            let identity = crate::tls::Identity::load_or_create(data)?;
            let addr = std::fs::read(data.join("server.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<crate::ServerInfo>(&b).ok())
                .map_or_else(|| crate::DEFAULT_LISTEN.to_string(), |i| i.public_addr);
            let store = Store::open(&data.join("meta"))
                .context("the server is not answering on its admin socket and its database is locked")?;
            let inv = crate::invite(&store, user, create, &addr, identity.fingerprint())?;
            store.flush().await?;
            Ok(inv)
        }
    }
}

//! This device's peer endpoint: one quinn endpoint that accepts the user's other devices and
//! dials the ones the coordinator hints at (or mDNS finds). A connection starts with the
//! introduction (`intro`), which authenticates both devices; the caller also checks the called
//! device is the one it meant. Connection attempts are held to what an unauthenticated sender
//! cannot fill: an address must answer a Retry first (so a spoofed source holds nothing), and
//! each source address (an IPv6 /64) may have only a few introductions in progress. Connections
//! are kept open (keep-alives), one per device (two devices calling each other at once keep the
//! one the lower id opened; a device that restarted replaces its old connection), and the peers
//! found are saved to `peers.json` for `shoal peers`: how each was found, its address and
//! round-trip time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use shoal_protocol::api::PeerHint;
use shoal_protocol::{ChunkId, DeviceId};

use super::intro::{self, IntroError, Introduced};
use super::serve::ChunkServer;
use super::tls::{Identity, Refusal, Roster, SERVER_NAME};

/// Where the peers found are listed, in the agent's home.
pub const PEERS_FILE: &str = "peers.json";

/// How a peer was found: named by the coordinator, seen on the LAN by mDNS, or it called.
pub const HINT: &str = "hint";
pub const MDNS: &str = "mdns";
pub const INCOMING: &str = "incoming";

/// How long a connection attempt and its introduction may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Incoming connections being set up (handshake and introduction) at once, in all and per
/// source address: a sender on the LAN can hold only a few, after a Retry (address validation)
/// it cannot pretend to be many, and one that does not prove it holds the LAN key within a
/// second of its handshake is dropped (`intro::PROOF_WAIT`).
const MAX_HANDSHAKES: usize = 64;
const MAX_HANDSHAKES_PER_SOURCE: usize = 4;

pub use shoal_protocol::status::PeerStatus;

struct Peer {
    conn: quinn::Connection,
    found: &'static str,
    name: String,
    /// Its certificate: the connection stays while the roster lists it unrevoked.
    fingerprint: ChunkId,
    /// The run it belongs to: a new session from the same device means it restarted.
    session: [u8; 16],
    /// The connection's binding (see `Introduced::binding`).
    binding: [u8; 32],
}

/// The endpoint and the peers it is connected to. Cheap to clone.
#[derive(Clone)]
pub struct PeerNode {
    endpoint: quinn::Endpoint,
    identity: Arc<Identity>,
    /// This run's session id, sent in every introduction.
    session: [u8; 16],
    /// Devices being dialled now.
    dialing: Arc<Mutex<std::collections::HashSet<DeviceId>>>,
    roster: Roster,
    me: DeviceId,
    peers: Arc<Mutex<BTreeMap<DeviceId, Peer>>>,
    home: PathBuf,
    /// Answers the chunk requests of every connected peer.
    chunks: ChunkServer,
    /// `lan_limit`: what this device receives from peers (what it sends waits in `chunks`).
    lan: crate::limit::Limiter,
    /// Signalled when a caller with a certificate of this user's CA is not in the roster: a
    /// device enrolled since the last refresh, most likely, so the roster is fetched at once.
    pub unknown_caller: Arc<tokio::sync::Notify>,
}

/// Socket buffer asked for on the peer endpoint, each way. The kernel's default (208 KiB here)
/// overflows during a bulk transfer: a datagram dropped on arrival reads as congestion to QUIC,
/// which then slows the sender down. The kernel caps it at `net.core.rmem_max` / `wmem_max`.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

fn widen_buffers(socket: &std::net::UdpSocket) {
    use rustix::net::sockopt;
    if let Err(e) = sockopt::set_socket_recv_buffer_size(socket, SOCKET_BUFFER)
        .and_then(|()| sockopt::set_socket_send_buffer_size(socket, SOCKET_BUFFER))
    {
        tracing::debug!(error = %e, "cannot widen the peer socket's buffers");
    }
}

impl PeerNode {
    /// Listens on `listen` (UDP) and accepts the user's devices from then on; every connected
    /// peer may ask for the chunks `chunks` serves.
    pub fn start(
        identity: Identity,
        listen: SocketAddr,
        roster: Roster,
        me: DeviceId,
        home: &Path,
        chunks: ChunkServer,
        lan: crate::limit::Limiter,
    ) -> anyhow::Result<PeerNode> {
        let socket = std::net::UdpSocket::bind(listen)
            .with_context(|| format!("listening for peers on {listen} (choose another with peer_listen)"))?;
        widen_buffers(&socket);
        let runtime = quinn::default_runtime().context("no async runtime for the peer endpoint")?;
        let mut endpoint =
            quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(identity.server_config()?), socket, runtime)
                .with_context(|| format!("listening for peers on {listen}"))?;
        endpoint.set_default_client_config(identity.client_config()?);
        let mut session = [0u8; 16];
        getrandom::fill(&mut session).context("no randomness for the session id")?;
        let node = PeerNode {
            endpoint,
            identity: Arc::new(identity),
            session,
            dialing: Arc::default(),
            roster,
            me,
            peers: Arc::default(),
            home: home.to_path_buf(),
            chunks,
            lan,
            unknown_caller: Arc::default(),
        };
        tokio::spawn(node.clone().accept_loop());
        Ok(node)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The peers connected now.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.retain(|_, p| p.conn.close_reason().is_none());
        peers
            .iter()
            .map(|(id, p)| {
                let stats = p.conn.stats();
                PeerStatus {
                    device: *id,
                    name: p.name.clone(),
                    found: p.found.to_string(),
                    addr: p.conn.remote_address().to_string(),
                    rtt_ms: p.conn.rtt().as_secs_f64() * 1000.0,
                    bytes_sent: stats.udp_tx.bytes,
                    bytes_received: stats.udp_rx.bytes,
                    mtu: stats.path.current_mtu,
                }
            })
            .collect()
    }

    /// Writes `peers.json` (atomically; losing it costs nothing).
    pub fn save(&self) {
        let path = self.home.join(PEERS_FILE);
        if let Ok(json) = serde_json::to_vec_pretty(&self.peers()) {
            let _ = shoal_sys::fs::write_atomic(&path, &json, shoal_sys::fs::Durability::Unsynced);
        }
    }

    /// The open connections, by device.
    pub fn connections(&self) -> Vec<(DeviceId, quinn::Connection)> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.iter().filter(|(_, p)| p.conn.close_reason().is_none()).map(|(id, p)| (*id, p.conn.clone())).collect()
    }

    /// The limit on bytes received from peers.
    pub fn lan_limit(&self) -> &crate::limit::Limiter {
        &self.lan
    }

    /// A peer as logs name it: its device name and id.
    pub fn describe(&self, id: &DeviceId) -> String {
        match self.roster.name(id) {
            Some(name) => format!("{name} ({id})"),
            None => id.to_string(),
        }
    }

    fn connected(&self, id: &DeviceId) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(id).is_some_and(|p| p.conn.close_reason().is_none())
    }

    /// Records a connection to the device `met` introduced. Two devices that dial each other at
    /// once end up with two connections; both keep the one whose binding is lower (both ends
    /// hold the same bindings) and close the other. A connection from a new run of a device (it
    /// restarted, and its old connection may not have timed out yet) replaces the old one.
    fn add(&self, met: Introduced, conn: quinn::Connection, found: &'static str) {
        let id = met.device;
        let name = self.roster.name(&id).unwrap_or_default();
        {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            // Revoked while it was being introduced: `recheck` may have run in between.
            if self.roster.authorize_fingerprint(&met.fingerprint).is_err() {
                conn.close(1u32.into(), b"");
                return;
            }
            if let Some(old) =
                peers.get(&id).filter(|p| p.conn.close_reason().is_none() && p.conn.stable_id() != conn.stable_id())
            {
                if old.session != met.session {
                    tracing::debug!(peer = %self.describe(&id), "the peer started again; its old connection goes");
                    old.conn.close(3u32.into(), b"replaced");
                } else {
                    let keep_old = old.binding <= met.binding;
                    let loser = if keep_old { conn.clone() } else { old.conn.clone() };
                    loser.close(2u32.into(), b"duplicate");
                    if keep_old {
                        return;
                    }
                }
            }
            let peer = Peer {
                conn: conn.clone(),
                found,
                name,
                fingerprint: met.fingerprint,
                session: met.session,
                binding: met.binding,
            };
            peers.insert(id, peer);
        }
        self.save();
        tokio::spawn(self.chunks.clone().serve(conn.clone()));
        // The list follows a peer that leaves (or is lost past the idle timeout).
        let node = self.clone();
        tokio::spawn(async move {
            conn.closed().await;
            node.save();
        });
    }

    /// Closes connections to peers the roster no longer allows (revoked since they connected).
    pub fn recheck(&self) {
        let mut dropped = false;
        for p in self.peers.lock().unwrap_or_else(|p| p.into_inner()).values() {
            if p.conn.close_reason().is_none() && self.roster.authorize_fingerprint(&p.fingerprint).is_err() {
                p.conn.close(1u32.into(), b"refused");
                dropped = true;
            }
        }
        if dropped {
            self.save();
        }
    }

    /// `greet`, tried again after 0.5, 1 and 2 seconds if refused or unreachable: a device that
    /// has just enrolled is refused until the other side's roster lists it, which its refusal
    /// itself sets off.
    pub async fn greet_retrying(&self, hint: &PeerHint) -> anyhow::Result<()> {
        let mut result = self.greet(hint).await;
        for wait_ms in [500, 1000, 2000] {
            if result.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            result = self.greet(hint).await;
        }
        result
    }

    /// Connects to a device the coordinator hinted at (its first address that answers) unless
    /// already connected.
    pub async fn greet(&self, hint: &PeerHint) -> anyhow::Result<()> {
        let addrs: Vec<SocketAddr> = hint.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        self.greet_at(hint.device, &addrs, HINT).await
    }

    /// Connects to `device` at the first of `addrs` that answers, unless already connected;
    /// `found` says how the addresses were learnt (`hint`, `mdns`).
    pub async fn greet_at(&self, device: DeviceId, addrs: &[SocketAddr], found: &'static str) -> anyhow::Result<()> {
        if device == self.me || self.connected(&device) {
            return Ok(());
        }
        // One dial to a device at a time, however many announcements ask for one.
        let Some(_dialing) = Dialing::start(&self.dialing, device) else { return Ok(()) };
        let mut last = None;
        for &addr in addrs {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.dial(addr, &device)).await {
                Ok(Ok((met, conn))) => {
                    self.add(met, conn, found);
                    return Ok(());
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(anyhow::anyhow!("{addr} did not answer in time")),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no usable address")))
    }

    async fn dial(&self, addr: SocketAddr, device: &DeviceId) -> anyhow::Result<(Introduced, quinn::Connection)> {
        let conn = self.endpoint.connect(addr, SERVER_NAME)?.await?;
        match intro::as_caller(&conn, &self.identity, &self.roster, self.session, Some(*device)).await {
            Ok(met) => Ok((met, conn)),
            Err(e) => anyhow::bail!("{addr}: {e}"),
        }
    }

    async fn accept_loop(self) {
        let limits = Arc::new(Mutex::new(Handshakes::default()));
        while let Some(incoming) = self.endpoint.accept().await {
            // Address validation first: a sender that cannot receive at its source address (a
            // spoofed one) never gets past the Retry, and holds nothing meanwhile.
            if !incoming.remote_address_validated() {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            let source = source_key(incoming.remote_address().ip());
            let Some(slot) = Handshakes::take(&limits, source) else {
                incoming.refuse();
                continue;
            };
            let node = self.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, node.welcome(incoming)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %format!("{e:#}"), "peer refused"),
                    Err(_) => tracing::debug!("peer handshake timed out"),
                }
                drop(slot);
            });
        }
    }

    /// Introduces this device to a caller and admits it if it is one of the user's devices;
    /// otherwise the connection is closed without a byte of application data.
    async fn welcome(&self, incoming: quinn::Incoming) -> anyhow::Result<()> {
        let conn = incoming.await?;
        match intro::as_called(&conn, &self.identity, &self.roster, self.session).await {
            Ok(met) => {
                self.add(met, conn, INCOMING);
                Ok(())
            }
            Err(e) => {
                if matches!(e, IntroError::Refused(Refusal::UnknownCertificate)) {
                    // A certificate of the user's CA the roster does not list yet: a device
                    // enrolled since the last refresh, most likely.
                    self.unknown_caller.notify_one();
                }
                anyhow::bail!("refused {}: {e}", conn.remote_address())
            }
        }
    }

    /// Closes every connection and the endpoint, giving the close a moment to reach the peers.
    pub async fn close(&self) {
        self.endpoint.close(0u32.into(), b"stopping");
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.save();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// A dial to a device in progress: the device leaves the set when it drops.
struct Dialing {
    set: Arc<Mutex<std::collections::HashSet<DeviceId>>>,
    device: DeviceId,
}

impl Dialing {
    fn start(set: &Arc<Mutex<std::collections::HashSet<DeviceId>>>, device: DeviceId) -> Option<Dialing> {
        set.lock().unwrap_or_else(|p| p.into_inner()).insert(device).then(|| Dialing { set: set.clone(), device })
    }
}

impl Drop for Dialing {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.device);
    }
}

/// Introductions in progress, in all and per source (see `MAX_HANDSHAKES`).
#[derive(Default)]
struct Handshakes {
    total: usize,
    by_source: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// Holds one slot of `Handshakes` until dropped.
struct HandshakeSlot {
    limits: Arc<Mutex<Handshakes>>,
    source: std::net::IpAddr,
}

impl Handshakes {
    fn take(limits: &Arc<Mutex<Handshakes>>, source: std::net::IpAddr) -> Option<HandshakeSlot> {
        let mut h = limits.lock().unwrap_or_else(|p| p.into_inner());
        let n = h.by_source.get(&source).copied().unwrap_or(0);
        if h.total >= MAX_HANDSHAKES || n >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        h.total += 1;
        h.by_source.insert(source, n + 1);
        Some(HandshakeSlot { limits: limits.clone(), source })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut h = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        h.total -= 1;
        if let Some(n) = h.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                h.by_source.remove(&self.source);
            }
        }
    }
}

/// The source a connection attempt counts against: its address (a LAN's hosts often share one
/// IPv6 /64, so no wider).
fn source_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    ip.to_canonical()
}

/// The address to announce for an endpoint listening on `local`: itself, or, when it listens
/// on every interface, the local address this machine uses to reach `server` (found by
/// connecting a UDP socket, which sends nothing).
pub async fn announce_addr(local: SocketAddr, server: &str) -> std::io::Result<SocketAddr> {
    if !local.ip().is_unspecified() {
        return Ok(local);
    }
    let to = tokio::net::lookup_host(server)
        .await?
        .find(|a| a.is_ipv4() == local.is_ipv4())
        .ok_or_else(|| std::io::Error::other(format!("{server} has no address to route peers by")))?;
    let probe = tokio::net::UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await?;
    probe.connect(to).await?;
    Ok(SocketAddr::new(probe.local_addr()?.ip(), local.port()))
}

#[cfg(test)]
mod tests {
    use shoal_protocol::api::DeviceInfo;

    use super::*;
    use crate::peer::tls::tests::{device, lan, user_ca};

    fn hint(info: &DeviceInfo, at: &PeerNode) -> PeerHint {
        PeerHint {
            device: info.id,
            name: info.name.clone(),
            addrs: vec![at.local_addr().unwrap().to_string()],
            cert_fingerprint: info.cert_fingerprint,
        }
    }

    fn free() -> crate::limit::Limiter {
        crate::limit::Limiter::default()
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[tokio::test]
    async fn two_nodes_keep_one_connection_and_drop_a_revoked_peer() {
        let ca = user_ca("alice");
        let (ia, da) = device(Some(&ca), &ca, 365);
        let (ib, db) = device(Some(&ca), &ca, 365);
        let (home_a, home_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ra, rb) = (Roster::default(), Roster::default());
        ra.replace(vec![da.clone(), db.clone()], Some(lan(5)));
        rb.replace(vec![da.clone(), db.clone()], Some(lan(5)));
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let served = |home: &Path| {
            ChunkServer::new(
                crate::store::Store::open(&home.join("db")).unwrap(),
                home.into(),
                free(),
                Default::default(),
                Default::default(),
                Default::default(),
            )
        };
        let a = PeerNode::start(ia, local, ra.clone(), da.id, home_a.path(), served(home_a.path()), free()).unwrap();
        let b = PeerNode::start(ib, local, rb, db.id, home_b.path(), served(home_b.path()), free()).unwrap();

        // Both dial at once: each side ends with one connection, and the same one (found by a
        // hint on one side, incoming on the other).
        let (to_b, to_a) = (hint(&db, &b), hint(&da, &a));
        let (r1, r2) = tokio::join!(a.greet(&to_b), b.greet(&to_a));
        r1.unwrap();
        r2.unwrap();
        until("one connection each", || a.peers().len() == 1 && b.peers().len() == 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (pa, pb) = (a.peers(), b.peers());
        assert_eq!((pa.len(), pb.len()), (1, 1), "{pa:?} {pb:?}");
        assert_eq!((pa[0].device, pb[0].device), (db.id, da.id));
        let mut how = [pa[0].found.as_str(), pb[0].found.as_str()];
        how.sort();
        assert_eq!(how, ["hint", "incoming"], "{pa:?} {pb:?}");

        // B is revoked: A's next check closes the connection, both lists empty, and B cannot
        // come back.
        let mut revoked = db.clone();
        revoked.revoked = true;
        ra.replace(vec![da.clone(), revoked], None);
        a.recheck();
        until("the revoked peer is gone on both sides", || a.peers().is_empty() && b.peers().is_empty()).await;
        assert!(b.greet(&hint(&da, &a)).await.is_err());
        assert!(a.peers().is_empty());
        let saved: Vec<PeerStatus> =
            serde_json::from_slice(&std::fs::read(home_a.path().join(PEERS_FILE)).unwrap()).unwrap();
        assert!(saved.is_empty(), "{saved:?}");
        a.close().await;
        b.close().await;
    }

    /// A peer that starts again (a new run: a new session) while the old connection still looks
    /// alive replaces it at once, whichever side opened which.
    #[tokio::test]
    async fn a_restarted_peer_replaces_its_old_connection() {
        let ca = user_ca("alice");
        let (ia, da) = device(Some(&ca), &ca, 365);
        let ((kb, cb, cab), db) = crate::peer::tls::tests::device_parts(Some(&ca), &ca, 365);
        let homes: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let roster = || {
            let r = Roster::default();
            r.replace(vec![da.clone(), db.clone()], Some(lan(5)));
            r
        };
        let served = |home: &Path| {
            let store = crate::store::Store::open(&home.join("db")).unwrap();
            ChunkServer::new(store, home.into(), free(), Default::default(), Default::default(), Default::default())
        };
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let a = PeerNode::start(ia, local, roster(), da.id, homes[0].path(), served(homes[0].path()), free()).unwrap();
        for a_dials in [true, false] {
            // The first run of B; A or B dials.
            let ib = Identity::from_der(kb.clone(), cb.clone(), cab.clone()).unwrap();
            let b1 =
                PeerNode::start(ib, local, roster(), db.id, homes[1].path(), served(homes[1].path()), free()).unwrap();
            if a_dials {
                a.greet(&hint(&db, &b1)).await.unwrap()
            } else {
                b1.greet(&hint(&da, &a)).await.unwrap()
            }
            until("connected", || a.peers().len() == 1).await;
            // B starts again elsewhere, its old run never having said goodbye, and calls A (A
            // still counts itself connected to B, so it calls nobody).
            let ib = Identity::from_der(kb.clone(), cb.clone(), cab.clone()).unwrap();
            let b2 =
                PeerNode::start(ib, local, roster(), db.id, homes[2].path(), served(homes[2].path()), free()).unwrap();
            let new_addr = b2.local_addr().unwrap().to_string();
            b2.greet(&hint(&da, &a)).await.unwrap();
            until("the new run replaced the old", || a.peers().iter().any(|p| p.addr == new_addr)).await;
            assert_eq!(a.peers().len(), 1, "{:?}", a.peers());
            until("the old run's connection closed", || b1.peers().is_empty()).await;
            b1.close().await;
            b2.close().await;
            until("gone", || a.peers().is_empty()).await;
        }
        a.close().await;
    }

    /// A connected peer answers `have` from its chunk map and `get` with the chunks of files
    /// still as indexed: the chunks of a file changed since it was hashed are skipped, not sent.
    #[tokio::test]
    async fn a_peer_serves_indexed_chunks_and_skips_changed_ones() {
        let ca = user_ca("alice");
        let (ia, da) = device(Some(&ca), &ca, 365);
        let (ib, db) = device(Some(&ca), &ca, 365);
        let (home_a, home_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let roster = Roster::default();
        roster.replace(vec![da.clone(), db.clone()], Some(lan(5)));
        // A's folder holds one indexed file of several chunks.
        let root = home_a.path().join("folder");
        std::fs::create_dir(&root).unwrap();
        let data = shoal_protocol::testdata::noise(7, 600_000);
        let file = root.join("f");
        std::fs::write(&file, &data).unwrap();
        let manifest = shoal_protocol::Chunker::default().manifest(&data[..]).unwrap();
        assert!(manifest.chunks.len() > 2, "{manifest:?}");
        let store = crate::store::Store::open(&home_a.path().join("db")).unwrap();
        let mut rec = crate::scan::stat_rec(&std::fs::metadata(&file).unwrap());
        rec.manifest = Some(manifest.clone());
        let mut batch = crate::store::Batch::default();
        batch.put_index(&shoal_protocol::SyncPath::parse("f").unwrap(), &rec);
        store.apply(batch).unwrap();

        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let partials = crate::transfer::Partials::default();
        let recent = crate::transfer::RecentChunks::default();
        let served = ChunkServer::new(store, root, free(), partials.clone(), recent.clone(), Default::default());
        let a = PeerNode::start(ia, local, roster.clone(), da.id, home_a.path(), served, free()).unwrap();
        let b_store = crate::store::Store::open(&home_b.path().join("db")).unwrap();
        let b_root = home_b.path().to_path_buf();
        let b = PeerNode::start(
            ib,
            local,
            roster,
            db.id,
            home_b.path(),
            ChunkServer::new(b_store, b_root, free(), Default::default(), Default::default(), Default::default()),
            free(),
        )
        .unwrap();
        b.greet(&hint(&da, &a)).await.unwrap();
        let conns = b.connections();
        assert_eq!(conns.len(), 1);
        let conn = &conns[0].1;

        let mut ids: Vec<shoal_protocol::ChunkId> = manifest.chunks.iter().map(|c| c.id).collect();
        let unknown = shoal_protocol::ChunkId::of(b"not in any file");
        ids.push(unknown);
        let have = crate::peer::fetch::have(conn, &ids).await.unwrap();
        assert_eq!(have, ids.iter().map(|id| *id != unknown).collect::<Vec<_>>());

        let mut got = Vec::new();
        crate::peer::fetch::get(conn, &ids, &free(), &Default::default(), |id, d| got.push((id, d))).await.unwrap();
        assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids[..ids.len() - 1]);
        assert_eq!(got.iter().flat_map(|(_, d)| d.iter().copied()).collect::<Vec<u8>>(), data);

        // One byte of the file changes on disk (the index not yet updated): nothing of it is
        // served, and the answer is still well formed.
        let mut changed = data.clone();
        changed[0] ^= 1;
        std::fs::write(&file, &changed).unwrap();
        let mut got = Vec::new();
        crate::peer::fetch::get(conn, &ids, &free(), &Default::default(), |id, _| got.push(id)).await.unwrap();
        assert_eq!(got, Vec::<shoal_protocol::ChunkId>::new());

        // A download in progress on A: its written chunks are served from the temp file.
        let other = shoal_protocol::testdata::noise(8, 300_000);
        let m2 = shoal_protocol::Chunker::default().manifest(&other[..]).unwrap();
        let tmp = home_a.path().join("download.part");
        let first = m2.chunks[0].len as usize;
        std::fs::write(&tmp, &other[..first]).unwrap();
        let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(first as u64));
        let guard = partials.start(&tmp, written);
        guard.add(m2.chunks[0].id, 0, m2.chunks[0].len);
        guard.add(m2.chunks[1].id, first as u64, m2.chunks[1].len);
        let ids2: Vec<shoal_protocol::ChunkId> = m2.chunks[..2].iter().map(|c| c.id).collect();
        assert_eq!(crate::peer::fetch::have(conn, &ids2).await.unwrap(), vec![true, false], "only what is written");
        let mut got = Vec::new();
        crate::peer::fetch::get(conn, &ids2, &free(), &Default::default(), |_, d| got.push(d)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0][..], &other[..first]);
        drop(guard);
        assert_eq!(crate::peer::fetch::have(conn, &ids2).await.unwrap(), vec![false, false]);

        // A small file's chunk hashed lately is served from memory, among chunks that are not.
        let small = b"a small file, hashed lately".to_vec();
        let sid = shoal_protocol::ChunkId::of(&small);
        assert_eq!(crate::peer::fetch::have(conn, &[sid]).await.unwrap(), vec![false]);
        recent.add([(sid, bytes::Bytes::from(small.clone()))]);
        assert_eq!(crate::peer::fetch::have(conn, &[unknown, sid]).await.unwrap(), vec![false, true]);
        let mut got = Vec::new();
        crate::peer::fetch::get(conn, &[ids[0], sid, unknown], &free(), &Default::default(), |id, d| got.push((id, d)))
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, &got[0].1[..]), (sid, &small[..]));
        a.close().await;
        b.close().await;
    }
}

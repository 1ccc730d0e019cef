//! Finding the user's devices on the LAN without the coordinator: libp2p mDNS, for discovery
//! only. Bulk bytes and authentication stay on the quinn endpoint (`node`).
//!
//! mDNS announces a libp2p swarm's listen addresses, so the swarm listens on TCP on the *same
//! port number* as the peer endpoint's UDP port: an announced `/ip4/A/tcp/P` means "a QUIC peer
//! endpoint may answer at A:P". The TCP listener takes no connection: every one is refused as it
//! arrives (`connection_limits` at zero), so a LAN cannot fill this device's file descriptors.
//!
//! What a device announces is a libp2p identity derived from the user's LAN key, its device id
//! and the current ten-minute epoch (`keypair_of`): strangers see a random-looking id that
//! changes every epoch and cannot forge one, while the user's devices compute each other's for
//! the epochs around now, once per epoch or roster change (`Known`), and look announcements up
//! there. Announcements of anyone else are dropped as they arrive, never stored; the devices seen
//! keep a few addresses each (`Sightings`); and should libp2p's own list of what it heard grow
//! past `MAX_HEARD` (forged answers flooding the LAN), the swarm is built anew, which empties it.
//! A discovered device is then dialled like a hinted one, and the introduction decides. mDNS
//! does not use loopback interfaces; on a machine with only loopback it finds nothing.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{Multiaddr, PeerId, connection_limits, identity, mdns, noise, tcp, yamux};
use shoal_protocol::DeviceId;
use shoal_protocol::api::LanKey;

use super::node::{MDNS, PeerNode};
use super::tls::Roster;

/// How often the LAN is asked who is there (libp2p's default is five minutes).
const QUERY_INTERVAL: Duration = Duration::from_secs(5);
/// How long an announced identity lasts: the most a stranger can follow a device across
/// networks by it.
const EPOCH_SECS: u64 = 600;
/// Addresses kept per device seen.
const MAX_ADDRS: usize = 4;
/// Announcements libp2p may hold (it keeps every one until its TTL runs out, and scans them
/// all for each new one): past this, the swarm is built anew.
const MAX_HEARD: usize = 512;

/// The libp2p identity device `id` announces in `epoch`, under LAN key `lan`.
pub fn keypair_of(lan: &LanKey, id: &DeviceId, epoch: u64) -> identity::Keypair {
    let mut h = blake3::Hasher::new_derive_key("shoal mdns device identity v2");
    h.update(lan.bytes());
    h.update(&id.0);
    h.update(&epoch.to_be_bytes());
    identity::Keypair::ed25519_from_bytes(*h.finalize().as_bytes()).expect("32 bytes are a valid ed25519 secret")
}

/// The epoch of a Unix time in seconds.
pub fn epoch_of(unix_secs: u64) -> u64 {
    unix_secs / EPOCH_SECS
}

fn epoch_now() -> u64 {
    epoch_of(shoal_sys::clock::now_ms() / 1000)
}

/// The identities the user's other devices may announce now (this epoch and the two on either
/// side, for clocks up to twenty minutes apart; under the current LAN key and the one before
/// it), each with its device.
pub struct Known(HashMap<PeerId, DeviceId>);

impl Known {
    pub fn new(roster: &Roster, me: DeviceId, epoch: u64) -> Known {
        let mut map = HashMap::new();
        let Some(lan) = roster.lan() else { return Known(map) };
        for d in roster.devices().iter().filter(|d| !d.revoked && d.id != me) {
            for key in std::iter::once(lan.current).chain(lan.previous) {
                for e in epoch.saturating_sub(2)..=epoch + 2 {
                    map.insert(keypair_of(&key, &d.id, e).public().to_peer_id(), d.id);
                }
            }
        }
        Known(map)
    }

    pub fn device(&self, peer: &PeerId) -> Option<DeviceId> {
        self.0.get(peer).copied()
    }
}

/// The user's devices seen on the LAN and where: the `MAX_ADDRS` addresses each was seen at
/// last (an announcement replayed with made-up addresses pushes the oldest out, not the next
/// real one).
#[derive(Default)]
pub struct Sightings(HashMap<DeviceId, VecDeque<SocketAddr>>);

impl Sightings {
    /// Notes `device` at `at`; `true` if the address is new for it.
    pub fn seen(&mut self, device: DeviceId, at: SocketAddr) -> bool {
        let addrs = self.0.entry(device).or_default();
        let new = match addrs.iter().position(|a| *a == at) {
            Some(i) => {
                addrs.remove(i);
                false
            }
            None => true,
        };
        addrs.push_back(at);
        if addrs.len() > MAX_ADDRS {
            addrs.pop_front();
        }
        new
    }

    pub fn gone(&mut self, device: DeviceId, at: &SocketAddr) {
        if let Some(addrs) = self.0.get_mut(&device) {
            addrs.retain(|a| a != at);
            if addrs.is_empty() {
                self.0.remove(&device);
            }
        }
    }

    /// The addresses `device` was seen at, the latest first.
    pub fn addrs(&self, device: &DeviceId) -> Vec<SocketAddr> {
        self.0.get(device).map(|a| a.iter().rev().copied().collect()).unwrap_or_default()
    }

    pub fn devices(&self) -> Vec<DeviceId> {
        self.0.keys().copied().collect()
    }
}

/// The QUIC address an announced libp2p TCP address stands for.
fn quic_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut ip: Option<IpAddr> = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(a.into()),
            Protocol::Ip6(a) => ip = Some(a.into()),
            Protocol::Tcp(p) => port = Some(p),
            _ => {}
        }
    }
    Some(SocketAddr::new(ip?, port?))
}

/// mDNS, and a TCP listener that takes no connection.
#[derive(NetworkBehaviour)]
struct Discovery {
    limits: connection_limits::Behaviour,
    mdns: mdns::tokio::Behaviour,
}

/// A swarm announcing `keypair`'s identity at the endpoint's port number.
fn swarm(keypair: identity::Keypair, endpoint: SocketAddr) -> anyhow::Result<libp2p::Swarm<Discovery>> {
    let cfg = mdns::Config { query_interval: QUERY_INTERVAL, ..Default::default() };
    let none = connection_limits::ConnectionLimits::default()
        .with_max_pending_incoming(Some(0))
        .with_max_established_incoming(Some(0))
        .with_max_pending_outgoing(Some(0))
        .with_max_established_outgoing(Some(0));
    let behaviour = Discovery {
        limits: connection_limits::Behaviour::new(none),
        mdns: mdns::tokio::Behaviour::new(cfg, keypair.public().to_peer_id())?,
    };
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)?
        .with_behaviour(|_| behaviour)?
        .build();
    let mut listen = Multiaddr::from(endpoint.ip());
    listen.push(Protocol::Tcp(endpoint.port()));
    swarm.listen_on(listen)?;
    Ok(swarm)
}

/// Announces this device on the LAN and greets the user's devices it hears of, until dropped.
/// `endpoint` is the peer endpoint's local address. Waits for the roster's LAN key first.
pub async fn run(node: PeerNode, roster: Roster, me: DeviceId, endpoint: SocketAddr) -> anyhow::Result<()> {
    let mut said_no_key = false;
    loop {
        let Some(lan) = roster.lan() else {
            if !said_no_key {
                tracing::warn!(
                    "no LAN key from the coordinator yet: devices on the LAN are found through its hints only until it answers"
                );
                said_no_key = true;
            }
            tokio::time::sleep(QUERY_INTERVAL).await;
            continue;
        };
        let epoch = epoch_now();
        let mut swarm = match swarm(keypair_of(&lan.current, &me, epoch), endpoint) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "LAN discovery (mDNS) could not start; trying again in a minute");
                tokio::time::sleep(Duration::from_secs(60)).await;
                continue;
            }
        };
        let mut known = Known::new(&roster, me, epoch);
        let mut generation = roster.generation();
        let mut sightings = Sightings::default();
        let mut tick = tokio::time::interval(QUERY_INTERVAL);
        loop {
            tokio::select! {
                event = swarm.select_next_some() => match event {
                    libp2p::swarm::SwarmEvent::Behaviour(DiscoveryEvent::Mdns(mdns::Event::Discovered(found))) => {
                        for (peer, addr) in found {
                            // Strangers' announcements go no further than this lookup.
                            if let (Some(device), Some(at)) = (known.device(&peer), quic_addr(&addr))
                                && sightings.seen(device, at)
                            {
                                greet(&node, device, sightings.addrs(&device));
                            }
                        }
                    }
                    libp2p::swarm::SwarmEvent::Behaviour(DiscoveryEvent::Mdns(mdns::Event::Expired(gone))) => {
                        for (peer, addr) in gone {
                            if let (Some(device), Some(at)) = (known.device(&peer), quic_addr(&addr)) {
                                sightings.gone(device, &at);
                            }
                        }
                    }
                    libp2p::swarm::SwarmEvent::ListenerError { error, .. } => {
                        tracing::warn!(%error, "LAN discovery listener failed");
                    }
                    _ => {}
                },
                _ = tick.tick() => {
                    if epoch_now() != epoch || roster.lan() != Some(lan) {
                        break;
                    }
                    let heard = swarm.behaviour().mdns.discovered_nodes().len();
                    if heard > MAX_HEARD {
                        tracing::warn!(heard, "more mDNS announcements on the LAN than any home holds; starting discovery afresh");
                        break;
                    }
                    if roster.generation() != generation {
                        generation = roster.generation();
                        known = Known::new(&roster, me, epoch);
                    }
                    // mDNS reports a device once until it expires: the ones still listed, and
                    // not connected, are dialled again.
                    let listed = roster.devices();
                    for device in sightings.devices() {
                        if listed.iter().any(|d| d.id == device && !d.revoked) {
                            greet(&node, device, sightings.addrs(&device));
                        }
                    }
                }
            }
        }
    }
}

/// Connects to `device` at one of `addrs` in the background, unless already connected.
fn greet(node: &PeerNode, device: DeviceId, addrs: Vec<SocketAddr>) {
    let node = node.clone();
    tokio::spawn(async move {
        if let Err(e) = node.greet_at(device, &addrs, MDNS).await {
            tracing::debug!(peer = %device, error = %format!("{e:#}"), "device seen on the LAN not reached");
        }
    });
}

#[cfg(test)]
mod tests {
    use shoal_protocol::api::{LanKey, LanKeys};

    use super::*;
    use crate::peer::tls::tests::{device, user_ca};

    #[test]
    fn identities_follow_the_lan_key_the_device_and_the_epoch() {
        let (a, b) = (DeviceId([1; 16]), DeviceId([2; 16]));
        let (k1, k2) = (LanKey::new([7; 32]), LanKey::new([8; 32]));
        let id = |k: &LanKey, d: &DeviceId, e: u64| keypair_of(k, d, e).public().to_peer_id();
        assert_eq!(id(&k1, &a, 5), id(&k1, &a, 5));
        // Another device, another epoch, another user's key: another identity. Without the key,
        // the device id alone says nothing.
        assert_ne!(id(&k1, &a, 5), id(&k1, &b, 5));
        assert_ne!(id(&k1, &a, 5), id(&k1, &a, 6));
        assert_ne!(id(&k1, &a, 5), id(&k2, &a, 5));
        assert_eq!(epoch_of(0), epoch_of(EPOCH_SECS - 1));
        assert_ne!(epoch_of(EPOCH_SECS - 1), epoch_of(EPOCH_SECS));
        let addr: Multiaddr = "/ip4/10.77.0.2/tcp/4321".parse().unwrap();
        assert_eq!(quic_addr(&addr), Some("10.77.0.2:4321".parse().unwrap()));
        let no_port: Multiaddr = "/ip4/10.77.0.2".parse().unwrap();
        assert_eq!(quic_addr(&no_port), None);
    }

    /// Forged announcements (10,000 identities nobody knows) are dropped at the lookup and
    /// leave nothing behind; the user's devices are recognised in the epochs around now, under
    /// the current key and the one before it, and keep a few addresses each.
    #[test]
    fn only_the_users_devices_are_recognised_and_kept() {
        let ca = user_ca("alice");
        let (_, me) = device(Some(&ca), &ca, 365);
        let (_, other) = device(Some(&ca), &ca, 365);
        let (_, revoked) = device(Some(&ca), &ca, 365);
        let mut gone = revoked.clone();
        gone.revoked = true;
        let (old_key, key) = (LanKey::new([3; 32]), LanKey::new([4; 32]));
        let roster = Roster::default();
        roster.replace(
            vec![me.clone(), other.clone(), gone],
            Some(LanKeys { current: key, previous: Some(old_key), previous_until_ms: u64::MAX }),
        );
        let known = Known::new(&roster, me.id, 100);
        for (k, e) in [(&key, 98), (&key, 99), (&key, 100), (&key, 101), (&key, 102), (&old_key, 100)] {
            assert_eq!(known.device(&keypair_of(k, &other.id, e).public().to_peer_id()), Some(other.id));
        }
        for stranger in [
            keypair_of(&key, &other.id, 103),
            keypair_of(&key, &me.id, 100),
            keypair_of(&key, &revoked.id, 100),
            keypair_of(&LanKey::new([9; 32]), &other.id, 100),
        ] {
            assert_eq!(known.device(&stranger.public().to_peer_id()), None);
        }

        let mut sightings = Sightings::default();
        let at: SocketAddr = "10.0.0.9:4000".parse().unwrap();
        for i in 0..10_000u32 {
            let seed = *blake3::hash(&i.to_be_bytes()).as_bytes();
            let forged = identity::Keypair::ed25519_from_bytes(seed).unwrap().public().to_peer_id();
            if let Some(d) = known.device(&forged) {
                sightings.seen(d, at);
            }
        }
        assert!(sightings.devices().is_empty());
        assert!(sightings.seen(other.id, at), "a new address");
        assert!(!sightings.seen(other.id, at), "seen again: nothing new to dial");
        for port in 1..100 {
            sightings.seen(other.id, SocketAddr::new(at.ip(), port));
        }
        assert_eq!((sightings.devices(), sightings.addrs(&other.id).len()), (vec![other.id], MAX_ADDRS));
        // A replay with made-up addresses pushes the oldest out: the real one seen last is kept.
        assert!(sightings.seen(other.id, at));
        assert_eq!(sightings.addrs(&other.id)[0], at);
    }
}

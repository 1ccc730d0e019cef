//! Finding the user's devices on the LAN without the coordinator: libp2p mDNS, for discovery
//! only. Bulk bytes and authorization stay on the quinn endpoint (`node`).
//!
//! mDNS announces a libp2p swarm's listen addresses, so the swarm listens on TCP on the *same
//! port number* as the peer endpoint's UDP port: an announced `/ip4/A/tcp/P` means "a QUIC peer
//! endpoint may answer at A:P". Each device's libp2p identity is derived from its device id
//! (`peer_id_of`), so a discovered peer id names the device to dial — and the TLS handshake and
//! the roster then decide, as for any peer: anyone can compute these ids, so they are only
//! hints, never credentials. Announcements from devices not in the roster are ignored. mDNS does
//! not use loopback interfaces; on a machine with only loopback it finds nothing.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, identity, mdns, noise, tcp, yamux};
use shoal_protocol::DeviceId;

use super::node::{MDNS, PeerNode};
use super::tls::Roster;

/// How often the LAN is asked who is there (libp2p's default is five minutes).
const QUERY_INTERVAL: Duration = Duration::from_secs(5);

/// The libp2p identity of device `id` (public: derived from the id alone).
pub fn keypair_of(id: &DeviceId) -> identity::Keypair {
    let seed = blake3::derive_key("shoal mdns device identity v1", &id.0);
    identity::Keypair::ed25519_from_bytes(seed).expect("32 bytes are a valid ed25519 secret")
}

pub fn peer_id_of(id: &DeviceId) -> PeerId {
    keypair_of(id).public().to_peer_id()
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

/// Announces this device on the LAN and greets the user's devices it hears of, until dropped.
/// `endpoint` is the peer endpoint's local address.
pub async fn run(node: PeerNode, roster: Roster, me: DeviceId, endpoint: SocketAddr) -> anyhow::Result<()> {
    let cfg = mdns::Config { query_interval: QUERY_INTERVAL, ..Default::default() };
    let behaviour = mdns::tokio::Behaviour::new(cfg, peer_id_of(&me))?;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair_of(&me))
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)?
        .with_behaviour(|_| behaviour)?
        .build();
    let mut listen = Multiaddr::from(endpoint.ip());
    listen.push(Protocol::Tcp(endpoint.port()));
    swarm.listen_on(listen)?;
    // Everyone seen on the LAN and not expired, by peer id, with their addresses. mDNS reports a
    // peer once (until it expires), so every tick dials again the ones that are the user's
    // devices (by the roster as it is now: it may not have been fetched yet at the first
    // announcement) and are not connected.
    let mut seen: HashMap<PeerId, BTreeSet<SocketAddr>> = HashMap::new();
    let mut tick = tokio::time::interval(QUERY_INTERVAL);
    loop {
        let fresh = tokio::select! {
            event = swarm.select_next_some() => match event {
                libp2p::swarm::SwarmEvent::Behaviour(mdns::Event::Discovered(found)) => {
                    let mut fresh = Vec::new();
                    for (peer, addr) in found {
                        if let Some(at) = quic_addr(&addr) {
                            seen.entry(peer).or_default().insert(at);
                            fresh.push(peer);
                        }
                    }
                    fresh
                }
                libp2p::swarm::SwarmEvent::Behaviour(mdns::Event::Expired(gone)) => {
                    for (peer, addr) in gone {
                        if let (Some(at), Some(addrs)) = (quic_addr(&addr), seen.get_mut(&peer)) {
                            addrs.remove(&at);
                        }
                    }
                    seen.retain(|_, addrs| !addrs.is_empty());
                    Vec::new()
                }
                libp2p::swarm::SwarmEvent::ListenerError { error, .. } => {
                    tracing::warn!(%error, "LAN discovery listener failed");
                    Vec::new()
                }
                _ => Vec::new(),
            },
            _ = tick.tick() => seen.keys().copied().collect(),
        };
        if fresh.is_empty() {
            continue;
        }
        let devices = roster.devices();
        for peer in fresh {
            let known = devices.iter().find(|d| !d.revoked && d.id != me && peer_id_of(&d.id) == peer);
            if let (Some(d), Some(addrs)) = (known, seen.get(&peer)) {
                greet(&node, d.id, addrs);
            }
        }
    }
}

/// Connects to `device` at one of `addrs` in the background, unless already connected.
fn greet(node: &PeerNode, device: DeviceId, addrs: &BTreeSet<SocketAddr>) {
    let (node, addrs): (PeerNode, Vec<SocketAddr>) = (node.clone(), addrs.iter().copied().collect());
    tokio::spawn(async move {
        if let Err(e) = node.greet_at(device, &addrs, MDNS).await {
            tracing::debug!(peer = %device, error = %format!("{e:#}"), "device seen on the LAN not reached");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_follow_device_ids_and_addresses_map_to_the_endpoint() {
        let (a, b) = (DeviceId([1; 16]), DeviceId([2; 16]));
        assert_eq!(peer_id_of(&a), peer_id_of(&a));
        assert_ne!(peer_id_of(&a), peer_id_of(&b));
        let addr: Multiaddr = "/ip4/10.77.0.2/tcp/4321".parse().unwrap();
        assert_eq!(quic_addr(&addr), Some("10.77.0.2:4321".parse().unwrap()));
        let no_port: Multiaddr = "/ip4/10.77.0.2".parse().unwrap();
        assert_eq!(quic_addr(&no_port), None);
    }
}

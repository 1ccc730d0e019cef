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
    // The user's devices seen on the LAN and not expired, with their addresses. mDNS reports a
    // device once (until it expires), so a dial that fails (the other side busy, or not yet
    // knowing this device) is tried again on every tick.
    let mut seen: HashMap<DeviceId, BTreeSet<SocketAddr>> = HashMap::new();
    let mut tick = tokio::time::interval(QUERY_INTERVAL);
    loop {
        tokio::select! {
            event = swarm.select_next_some() => match event {
                libp2p::swarm::SwarmEvent::Behaviour(mdns::Event::Discovered(found)) => {
                    let devices = roster.devices();
                    for (peer, addr) in found {
                        let known = devices.iter().find(|d| !d.revoked && d.id != me && peer_id_of(&d.id) == peer);
                        let (Some(d), Some(at)) = (known, quic_addr(&addr)) else { continue };
                        let addrs = seen.entry(d.id).or_default();
                        addrs.insert(at);
                        greet(&node, d.id, addrs);
                    }
                }
                libp2p::swarm::SwarmEvent::Behaviour(mdns::Event::Expired(gone)) => {
                    for (peer, addr) in gone {
                        let Some(at) = quic_addr(&addr) else { continue };
                        seen.retain(|d, addrs| {
                            if peer_id_of(d) == peer {
                                addrs.remove(&at);
                            }
                            !addrs.is_empty()
                        });
                    }
                }
                libp2p::swarm::SwarmEvent::ListenerError { error, .. } => {
                    tracing::warn!(%error, "LAN discovery listener failed");
                }
                _ => {}
            },
            _ = tick.tick() => {
                for (device, addrs) in &seen {
                    greet(&node, *device, addrs);
                }
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

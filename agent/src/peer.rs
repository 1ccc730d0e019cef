//! Talking to the user's other devices. Peers speak QUIC (quinn) with mutual TLS 1.3 under ALPN
//! `shoal/peer/1`, each presenting the device certificate the coordinator signed with the user's
//! CA. `tls` builds the endpoint configurations and decides who may talk to this device; `node` is
//! the endpoint the daemon runs; `serve` answers a peer's chunk requests and `fetch` asks them;
//! `mdns` finds the user's devices on the LAN when the coordinator cannot.

pub mod fetch;
pub mod mdns;
pub mod node;
pub mod serve;
pub mod tls;

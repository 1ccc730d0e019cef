//! Talking to the user's other devices. Peers speak QUIC (quinn) under ALPN `shoal/peer/2`: a TLS
//! 1.3 handshake that reveals nobody, then an introduction in which each proves it is one of the
//! user's devices, with the user's LAN key and the device certificate the coordinator signed with
//! the user's CA. `tls` builds the endpoint configurations and decides who may talk to this
//! device; `intro` is the introduction; `node` is the endpoint the daemon runs; `serve` answers a
//! peer's chunk requests and `fetch` asks them; `mdns` finds the user's devices on the LAN when
//! the coordinator cannot.

pub mod fetch;
pub mod intro;
pub mod mdns;
pub mod node;
pub mod serve;
pub mod tls;

//! What Shoal's networked parts share, so that none of them needs another's crate: the agent and
//! a relay read chunk frames and pin a server's certificate the same way; the coordinator and a
//! relay serve HTTPS behind the same listener limits, with a self-signed identity kept on disk.
//! Per-user CAs sign device certificates (the coordinator) and are made the same way in tests.
//! The coordinator signs relay tickets, and a relay checks them, with `ticket`.

pub mod ca;
pub mod frames;
pub mod pinned;
pub mod ticket;

#[cfg(feature = "server")]
pub mod identity;
#[cfg(feature = "server")]
pub mod listener;

//! OS and runtime helpers that every Shoal program needs — the agent, the coordinator and the
//! relay — kept apart so that none of them has to depend on another to get them: direct I/O,
//! atomic file replacement, syncing a sled database, the device's TLS identity, allocator
//! policy, process limits, the clock and random names. Nothing here knows about sync, users or the API.

pub mod allocator;
pub mod clock;
pub mod dbsync;
pub mod direct;
pub mod failpoints;
pub mod fs;
pub mod identity;
pub mod limits;
pub mod random;

//! netsim: Shoal's real processes over an emulated network, to show what LAN peers and regional
//! relays save. `fabric` builds the network (a namespace per site behind one address, a
//! user-space core carrying packets between sites over links); `link` is the model each link
//! applies (latency, jitter, loss, bandwidth, partitions).

pub mod fabric;
pub mod link;
pub mod random;
pub mod run;
pub mod scenario;

pub use fabric::{Fabric, FabricError, LinkId, LinkKind, LinkReport, in_namespace, spawn_in_namespace};
pub use link::{LinkCounters, LinkParams, LinkState};

//! Shoal's test kit: real coordinator, relay and agent processes in temp dirs, on loopback or
//! in network namespaces, plus the oracle every test checks — all devices converge, by content
//! hash, to the coordinator's tree. The end-to-end tests (`tests/`) and the network simulator
//! (`netsim/`) both drive Shoal through it.

mod bins;
mod netns;
mod oracle;
mod processes;

pub use bins::*;
pub use netns::*;
pub use oracle::*;
pub use processes::*;
pub use shoal_protocol::testdata::noise;

//! The Shoal device agent: configuration, the coordinator client, the internal database, the
//! scanner, the pure sync planner, the executor that applies plans to disk, the uploader, the
//! daemon loop and the command line behind the `shoal` binary.

pub mod client;
pub mod config;
pub mod planner;
pub mod scan;
pub mod store;

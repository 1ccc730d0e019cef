//! End-to-end tests: real coordinator and agent processes on loopback. Every test ends by
//! checking that all devices converge, by content hash, to the coordinator's tree.

mod harness;

mod agent_safety;
mod api;
mod bad_input;
mod demo;
mod durability;
mod hardening;
mod history;
mod lan;
mod lan_attacks;
mod large;
mod migration;
mod network;
mod peers;
mod randomized;
mod relays;
mod retention;
mod s3;
mod sync;

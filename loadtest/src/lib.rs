//! `photon-loadtest`: measures any network that speaks the Beam app API (`../shared/API.md`),
//! Photon's or Samply.Beam's: throughput, latency percentiles and errors by status.
//!
//! Crate map: [`target`] (where the apps are; loopback unless told otherwise), [`stats`]
//! (latency histograms, error counts, throughput over time, the JSON summary), [`client`] (one
//! app's HTTP client: tasks, results, long-polls, SSE), [`photon::http1`] (its lean HTTP/1.1 client),
//! [`scenario`] (the scenarios, each bounded by count and time), [`cli`] (flags → a plan).
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod memory;
pub mod network;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod svg;
pub mod target;

//! The one integration-test binary (see ARCHITECTURE.md): real servers on free ports, real
//! SQLite and PostgreSQL, real HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod alerts;
mod audit;
mod auth;
mod cli;
mod cluster;
mod connections;
mod datadir;
mod docs;
mod errors;
mod faults;
mod gateway;
mod harness;
mod input;
mod lifecycle;
mod metrics;
mod openapi;
mod outbound;
mod owners;
mod policy;
pub mod process;
mod receiver;
mod scan;
mod scim;
mod services;
mod smtp;
mod tokens;
mod usage_chain;
mod usage_log;
mod usage_stats;
mod verify;
mod watch;

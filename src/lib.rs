//! resonance-sync forwards unsynced PostgreSQL rows to the Resonance rewards API as events and
//! marks each row synced only after the API confirmed it with a 2xx.
//!
//! The data flows through one module per step:
//!
//! - [`config`]: the TOML file, parsed once into typed values; secrets from the environment.
//! - [`source`]: the mapping's own SQL, wrapped to list candidates, fetch rows and mark them.
//! - [`store`]: the daemon's schema (`resonance_sync`): claims as leases, retry times, dead letters.
//! - [`mapping`] and [`value`]: a row becomes an exact JSON body and a stable `Idempotency-Key`.
//! - [`sink`]: one HTTP POST and the meaning of its answer; [`retry`]: backoff and `Retry-After`.
//! - [`sync`]: the per-mapping loop that claims and fetches batches; [`dispatch`] sends each
//!   batch with bounded concurrency and hands every outcome to [`recorder`], the only place a
//!   row is marked synced ([`lane`] holds what they share); [`gate`] pauses sending when the
//!   API is down or refuses the key; [`listen`] wakes a loop at once on a NOTIFY.
//! - [`app`], [`check`] and [`admin`]: the commands; [`sandbox`]: a local stand-in for the API;
//!   [`explain`] reads a mapping's query plan so `check` can warn about a missing index.
//! - [`service`]: what `run` adds as a service: [`systemd`] notifications and watchdog, fed by
//!   [`health`]'s per-loop heartbeats, and [`server`]'s `/metrics`, `/healthz` and `/readyz`;
//!   [`progress`] shows a backfill's progress.
//!
//! Long-lived loops take the pool and a cancellation token as arguments, so tests drive the
//! real thing in-process; shutdown stops claiming, lets requests in flight finish, marks them,
//! and returns.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod check;
pub mod cli;
pub mod config;
pub mod currency;
pub mod db;
pub mod dispatch;
pub mod error;
pub mod explain;
pub mod gate;
pub mod health;
pub mod lane;
pub mod listen;
pub mod mapping;
pub mod output;
pub mod progress;
pub mod recorder;
pub mod retry;
pub mod sandbox;
pub mod secret;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod stats;
pub mod store;
pub mod sync;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod value;

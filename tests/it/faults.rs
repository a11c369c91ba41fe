//! The delivery guarantees under faults injected for real (issue 3): each test is named after
//! the promise it proves.
//!
//! - [`processes`]: the real binary killed with SIGKILL at random moments, stopped with SIGTERM,
//!   and run as several instances on one table (C20, C21).
//! - [`database`]: PostgreSQL restarted mid-run, down at start-up, sessions terminated (C24), and
//!   a mark-synced UPDATE that fails (C19).
//! - [`api`]: connection resets, hangs, 500 bursts, `Retry-After` (C15), answers after the
//!   timeout (C18), and the global pause while the API is down.
//! - [`durable`]: retry state that survives restarts, dead letters and their commands.

mod api;
mod database;
mod durable;
mod inject;
mod processes;
mod support;

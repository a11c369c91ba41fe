//! The integration tests: one binary, one module per area, a shared harness. Every test gets
//! its own database on a real PostgreSQL server and real HTTP servers on 127.0.0.1.

#[allow(dead_code)]
mod harness;

mod cases;
mod chinook;
#[allow(dead_code)]
mod cluster;
mod config_errors;
mod delivery;
mod exact_values;
mod faults;
mod fuzz;
mod misconfig;
mod ops;
mod packaging;
mod perf;
mod process;
mod sandbox;
mod secrets;
mod terminal;
mod tls;
mod types;

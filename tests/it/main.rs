//! The integration tests: one binary, one module per area, a shared harness. Every test gets
//! its own database on a real PostgreSQL server and real HTTP servers on 127.0.0.1.

#[allow(dead_code)]
mod harness;

mod chinook;
mod sandbox;

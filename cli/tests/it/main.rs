//! End-to-end tests: real `meridian` processes on 127.0.0.1 with fresh
//! certificates, talking mutual TLS, with their own SQLite state.

#![allow(clippy::unwrap_used, reason = "integration tests: a step that fails fails the test")]

mod applications;
mod crash;
mod deadlines;
mod disclosure;
mod federation;
mod governance;
mod hostile;
mod privacy_cli;
mod robust;
mod security;
mod sim;
mod specs;
mod unix;
mod util;

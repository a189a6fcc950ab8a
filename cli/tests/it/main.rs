//! End-to-end tests: real `meridian` processes on 127.0.0.1 with fresh
//! certificates, talking mutual TLS, with their own SQLite state.

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
mod tidy;
mod unix;
mod util;

//! Integration tests of the `privacy` crate: the accountant against the
//! reference fixtures.

#![allow(clippy::unwrap_used, reason = "integration tests: a step that fails fails the test")]

mod accountant;
mod pld;

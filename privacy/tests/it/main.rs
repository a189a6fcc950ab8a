//! Integration tests of the `privacy` crate: the accountant against the
//! reference fixtures, and the crate's own tidiness rules.

mod accountant;
mod pld;
mod tidy;

//! placeholder: the worker daemon library (being written)
pub mod dataset;

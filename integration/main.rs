//! End-to-end tests: real `strata` processes on loopback.

mod harness;

mod adversarial;
mod breaker;
mod composition;
mod concurrency;
mod config_errors;
mod disk;
mod examples;
mod limits;
mod lying_peer;
mod metrics;
mod objectstore;
mod ranges;
mod roundtrip;
mod status_codes;

//! End-to-end tests: real `strata` processes on loopback.

mod harness;

mod adversarial;
mod composition;
mod concurrency;
mod config_errors;
mod crash;
mod disk;
mod examples;
mod fuzz_config;
mod fuzz_grpc;
mod fuzz_index;
mod lying_peer;
mod objectstore;
mod ranges;
mod roundtrip;
mod status_codes;

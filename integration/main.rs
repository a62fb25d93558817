//! End-to-end tests: real `strata` processes on loopback.

mod harness;

mod adversarial;
mod breaker;
mod composition;
mod concurrency;
mod config_errors;
mod crash;
mod disk;
mod disk_full;
mod examples;
mod fetch;
mod front;
mod fuzz_config;
mod fuzz_grpc;
mod fuzz_index;
mod limits;
mod load;
mod lying_peer;
mod metrics;
mod objectstore;
mod operations;
mod ranges;
mod roundtrip;
mod security;
mod shutdown;
mod status_codes;
mod streaming_fill;

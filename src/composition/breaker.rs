//! The circuit breaker every remote tier carries (peers, buckets), applied
//! by the composition engine like `timeout`.
//!
//! After `failures` consecutive failed calls the breaker opens: for
//! `open_for`, calls fail at once with [`Error::CircuitOpen`] instead of
//! waiting out a timeout each, so a dead or hung peer costs the requests
//! behind it nothing. Then one call is let through as a probe; if it
//! succeeds the breaker closes, else it stays open for another period.
//!
//! A failure is any error from a call, a timeout or a verification failure
//! alike ("absent" is an answer, not a failure). Streams that fail after
//! they were opened are not counted: the call that opened them succeeded.
//!
//! ```toml
//! [blobservices.peer]
//! type = "grpc"
//! url = "grpc+http://peer:9000"
//! breaker = { failures = 5, open_for = "10s" }   # the defaults; failures = 0 turns it off
//! ```

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;
use tracing::{info, warn};

use crate::blobservice::{BlobReader, BlobService, BlobStat, BlobWriter, ChunkMeta, ChunkStream};
use crate::digest::B3Digest;
use crate::error::{Error, Result};
use crate::verify::Outboard;

/// Default consecutive failures that open the breaker.
pub const DEFAULT_FAILURES: u32 = 5;
/// Default time the breaker stays open before a probe.
pub const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(10);

/// The `breaker` table of a tier.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker; 0 turns it off.
    #[serde(default = "default_failures")]
    pub failures: u32,
    /// How long it stays open before a probe.
    #[serde(default = "default_open_for")]
    pub open_for: super::Duration,
}

fn default_failures() -> u32 {
    DEFAULT_FAILURES
}

fn default_open_for() -> super::Duration {
    super::Duration(DEFAULT_OPEN_FOR)
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: DEFAULT_FAILURES,
            open_for: default_open_for(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// Open, with one probe call in flight.
    Probing,
}

/// A tier behind a circuit breaker.
pub struct BreakerService {
    inner: Arc<dyn BlobService>,
    tier: String,
    config: BreakerConfig,
    state: Mutex<State>,
    open_gauge: Gauge,
    trips: Counter,
}

impl BreakerService {
    /// Guards `inner` (the tier called `tier`); `open_gauge` shows whether
    /// the breaker is open, `trips` counts how often it opened.
    pub fn new(
        inner: Arc<dyn BlobService>,
        tier: String,
        config: BreakerConfig,
        open_gauge: Gauge,
        trips: Counter,
    ) -> Self {
        BreakerService {
            inner,
            tier,
            config,
            state: Mutex::new(State::Closed { failures: 0 }),
            open_gauge,
            trips,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a plain value: a panic elsewhere cannot leave it
        // half-written, so a poisoned lock is still good.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lets a call through, or refuses it while the breaker is open.
    fn admit(&self) -> Result<Admitted<'_>> {
        let mut state = self.state();
        let probe = match *state {
            State::Closed { .. } => false,
            State::Open { until } if Instant::now() >= until => {
                *state = State::Probing;
                true
            }
            State::Open { until } => {
                return Err(Error::CircuitOpen {
                    tier: self.tier.clone(),
                    retry_in: until.saturating_duration_since(Instant::now()),
                });
            }
            State::Probing => {
                return Err(Error::CircuitOpen {
                    tier: self.tier.clone(),
                    retry_in: Duration::ZERO,
                });
            }
        };
        Ok(Admitted {
            breaker: self,
            probe,
            settled: false,
        })
    }

    fn succeeded(&self, probe: bool) {
        let mut state = self.state();
        if probe {
            info!(tier = %self.tier, "probe succeeded; circuit closed");
            self.open_gauge.set(0);
        }
        if probe || matches!(*state, State::Closed { .. }) {
            *state = State::Closed { failures: 0 };
        }
    }

    fn failed(&self, probe: bool, err: &Error) {
        let mut state = self.state();
        let open_for = self.config.open_for.0;
        match *state {
            State::Probing if probe => {
                warn!(tier = %self.tier, error = %err, ?open_for, "probe failed; circuit stays open");
                *state = State::Open {
                    until: Instant::now() + open_for,
                };
            }
            State::Closed { failures } if failures + 1 >= self.config.failures => {
                warn!(tier = %self.tier, error = %err, failures = failures + 1, ?open_for,
                    "consecutive failures; circuit open");
                *state = State::Open {
                    until: Instant::now() + open_for,
                };
                self.open_gauge.set(1);
                self.trips.inc();
            }
            State::Closed { failures } => {
                *state = State::Closed {
                    failures: failures + 1,
                };
            }
            // Calls admitted before the breaker opened, finishing late.
            _ => {}
        }
    }

    /// Runs `call` if the breaker admits it, and records its outcome.
    async fn guarded<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        let mut admitted = self.admit()?;
        let result = call.await;
        admitted.settled = true;
        match &result {
            Ok(_) => self.succeeded(admitted.probe),
            Err(e) => self.failed(admitted.probe, e),
        }
        result
    }
}

/// A call the breaker let through. A probe dropped before it finished (its
/// caller went away) leaves the breaker open but ready for another probe.
struct Admitted<'a> {
    breaker: &'a BreakerService,
    probe: bool,
    settled: bool,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            let mut state = self.breaker.state();
            if matches!(*state, State::Probing) {
                *state = State::Open {
                    until: Instant::now(),
                };
            }
        }
    }
}

#[async_trait]
impl BlobService for BreakerService {
    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        self.guarded(self.inner.has(digest)).await
    }

    async fn stat(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        self.guarded(self.inner.stat(digest)).await
    }

    async fn stat_before_read(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        self.guarded(self.inner.stat_before_read(digest)).await
    }

    async fn outboard(&self, digest: &B3Digest) -> Result<Option<Outboard>> {
        self.guarded(self.inner.outboard(digest)).await
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        self.guarded(self.inner.open_read(digest)).await
    }

    async fn read_chunk(&self, chunk: &ChunkMeta) -> Result<Option<Bytes>> {
        self.guarded(self.inner.read_chunk(chunk)).await
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        self.guarded(self.inner.open_write()).await
    }

    async fn open_fill(&self, digest: &B3Digest, stat: &BlobStat) -> Result<Box<dyn BlobWriter>> {
        self.guarded(self.inner.open_fill(digest, stat)).await
    }

    async fn stream_chunks(
        &self,
        digest: &B3Digest,
        chunks: &[ChunkMeta],
    ) -> Result<Option<ChunkStream>> {
        self.guarded(self.inner.stream_chunks(digest, chunks)).await
    }

    /// Not guarded: it asks only what the tier knows without a round trip,
    /// and its success says nothing of the tier's health.
    async fn holds_chunks(&self, chunks: &[ChunkMeta]) -> Result<Vec<bool>> {
        self.inner.holds_chunks(chunks).await
    }

    async fn shutdown(&self, deadline: tokio::time::Instant) -> Result<()> {
        self.inner.shutdown(deadline).await
    }

    fn caught_lying(&self, digest: &B3Digest, chunks: &[ChunkMeta]) -> bool {
        self.inner.caught_lying(digest, chunks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// A tier that fails while `down` is set, and counts its calls.
    #[derive(Default)]
    struct Flaky {
        down: AtomicBool,
        calls: AtomicU32,
    }

    #[async_trait]
    impl BlobService for Flaky {
        async fn stat(&self, _: &B3Digest) -> Result<Option<BlobStat>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(Error::Backend("down".into()));
            }
            Ok(None)
        }
        async fn open_read(&self, _: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
            Ok(None)
        }
        async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
            Err(Error::ReadOnly("test".into()))
        }
    }

    #[tokio::test]
    async fn opens_after_consecutive_failures_and_closes_after_a_good_probe() {
        let flaky = Arc::new(Flaky::default());
        let gauge = Gauge::default();
        let trips = Counter::default();
        let config = BreakerConfig {
            failures: 3,
            open_for: crate::composition::Duration(Duration::from_millis(50)),
        };
        let b = BreakerService::new(
            flaky.clone(),
            "peer".into(),
            config,
            gauge.clone(),
            trips.clone(),
        );
        let d = B3Digest::of(b"x");
        assert!(b.stat(&d).await.is_ok());
        flaky.down.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            assert!(matches!(b.stat(&d).await, Err(Error::Backend(_))));
        }
        assert_eq!((gauge.get(), trips.get()), (1, 1));
        let before = flaky.calls.load(Ordering::SeqCst);
        assert!(matches!(b.stat(&d).await, Err(Error::CircuitOpen { .. })));
        assert_eq!(
            flaky.calls.load(Ordering::SeqCst),
            before,
            "an open breaker called the tier"
        );

        // A failed probe keeps it open.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(matches!(b.stat(&d).await, Err(Error::Backend(_))));
        assert!(matches!(b.stat(&d).await, Err(Error::CircuitOpen { .. })));
        assert_eq!(gauge.get(), 1);

        // A good probe closes it.
        flaky.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(b.stat(&d).await.is_ok());
        assert_eq!((gauge.get(), trips.get()), (0, 1));
        assert!(b.stat(&d).await.is_ok());
    }

    #[tokio::test]
    async fn a_success_resets_the_count() {
        let flaky = Arc::new(Flaky::default());
        let config = BreakerConfig {
            failures: 2,
            ..Default::default()
        };
        let b = BreakerService::new(
            flaky.clone(),
            "peer".into(),
            config,
            Gauge::default(),
            Counter::default(),
        );
        let d = B3Digest::of(b"x");
        for _ in 0..5 {
            flaky.down.store(true, Ordering::SeqCst);
            assert!(matches!(b.stat(&d).await, Err(Error::Backend(_))));
            flaky.down.store(false, Ordering::SeqCst);
            assert!(b.stat(&d).await.is_ok());
        }
    }
}

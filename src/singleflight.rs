//! [`SingleFlight`]: concurrent requests for the same key share one run of
//! the work.
//!
//! Written here rather than taken from moka's `get_with` coalescing: moka
//! caches the result afterwards, while a fetch-and-fill must run again once
//! it is over (the near tier it filled may evict the blob later).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use crate::error::{Error, Result};

/// A run in flight: await it (any number of clones) for its result.
pub type Flight<V> = Shared<BoxFuture<'static, Result<V, Arc<Error>>>>;

/// Runs at most one piece of work per key at a time; callers that arrive
/// while it runs wait for its result instead of starting their own.
pub struct SingleFlight<K, V> {
    flights: Arc<Mutex<HashMap<K, Flight<V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `work` for `key`, or joins the run already in flight, and waits
    /// for it. Returns the result and whether this call joined an earlier
    /// one. See [`start`](Self::start).
    pub async fn run<F>(&self, key: K, work: F) -> (Result<V, Arc<Error>>, bool)
    where
        F: Future<Output = Result<V>> + Send + 'static,
    {
        let (flight, joined) = self.start(key, work);
        (flight.await, joined)
    }

    /// Starts `work` for `key`, or joins the run already in flight (and
    /// drops `work`). The work runs in its own task, so it completes for the
    /// other waiters even if the caller that started it goes away. Returns
    /// the run, to await when its result is needed, and whether this call
    /// joined an earlier one.
    pub fn start<F>(&self, key: K, work: F) -> (Flight<V>, bool)
    where
        F: Future<Output = Result<V>> + Send + 'static,
    {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(flight) = flights.get(&key) {
            return (flight.clone(), true);
        }
        let registry = self.flights.clone();
        let done_key = key.clone();
        let task = tokio::spawn(async move {
            let result = work.await.map_err(Arc::new);
            registry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&done_key);
            result
        });
        let flight = async move {
            task.await.unwrap_or_else(|join| {
                Err(Arc::new(Error::Io(std::io::Error::other(format!(
                    "coalesced work failed: {join}"
                )))))
            })
        }
        .boxed()
        .shared();
        flights.insert(key, flight.clone());
        (flight, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let sf: Arc<SingleFlight<u32, u32>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..50 {
            let sf = sf.clone();
            let runs = runs.clone();
            handles.push(tokio::spawn(async move {
                sf.run(7, async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(42)
                })
                .await
            }));
        }
        let mut joined = 0;
        for h in handles {
            let (result, j) = h.await.unwrap();
            assert_eq!(result.unwrap(), 42);
            joined += usize::from(j);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(joined, 49);
        // Once over, the next call runs again.
        let (result, j) = sf.run(7, async { Ok(43) }).await;
        assert_eq!(result.unwrap(), 43);
        assert!(!j);
    }
}

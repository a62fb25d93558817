//! Admission limits: how many requests run at once, overall and per client.
//!
//! A request over either limit is answered `RESOURCE_EXHAUSTED` at once
//! rather than queued: a client (or a stock snix client's retry loop) can
//! back off, and an overloaded sidecar keeps its memory bounded instead of
//! piling up work. A Read holds its slot until its stream ends, a Put until
//! it is answered.
//!
//! Clients are told apart by IP address; every unix-socket client is one
//! client (they are local, and the socket's mode decides who they are).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tonic::Status;

/// Default bound on requests served at once.
pub const DEFAULT_MAX_CONCURRENT: usize = 1024;
/// Default bound on one client's requests served at once.
pub const DEFAULT_MAX_CONCURRENT_PER_CLIENT: usize = 256;

/// Who a request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    /// A TCP client.
    Ip(IpAddr),
    /// Any client of a unix socket.
    Local,
}

impl Client {
    /// The client of `request`.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        request
            .remote_addr()
            .map_or(Client::Local, |a| Client::Ip(a.ip()))
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_client: HashMap<Client, usize>,
}

/// The limits and the requests running now.
#[derive(Debug, Clone)]
pub struct Limits {
    max: usize,
    max_per_client: usize,
    counts: Arc<Mutex<Counts>>,
}

impl Limits {
    /// At most `max` requests at once, `max_per_client` of them from one
    /// client.
    pub fn new(max: usize, max_per_client: usize) -> Self {
        Limits {
            max,
            max_per_client,
            counts: Arc::default(),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Plain counters: still consistent after a panic elsewhere.
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for a request from `client`, or `RESOURCE_EXHAUSTED`.
    pub fn admit(&self, client: Client) -> Result<Slot, Status> {
        let mut counts = self.counts();
        if counts.total >= self.max {
            return Err(Status::resource_exhausted(format!(
                "server busy: {} requests in progress (limit {}); retry later",
                counts.total, self.max
            )));
        }
        let mine = counts.per_client.entry(client).or_default();
        if *mine >= self.max_per_client {
            return Err(Status::resource_exhausted(format!(
                "too many requests from this client at once (limit {}); retry later",
                self.max_per_client
            )));
        }
        *mine += 1;
        counts.total += 1;
        Ok(Slot {
            limits: self.clone(),
            client,
        })
    }
}

/// A request's place within the limits, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    limits: Limits,
    client: Client,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.limits.counts();
        counts.total = counts.total.saturating_sub(1);
        if let Some(mine) = counts.per_client.get_mut(&self.client) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                counts.per_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_over_either_limit_and_frees_slots_on_drop() {
        let limits = Limits::new(3, 2);
        let a = Client::Ip([10, 0, 0, 1].into());
        let b = Client::Ip([10, 0, 0, 2].into());
        let a1 = limits.admit(a).unwrap();
        let _a2 = limits.admit(a).unwrap();
        let refused = limits.admit(a).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let _b1 = limits.admit(b).unwrap();
        assert_eq!(
            limits.admit(Client::Local).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        drop(a1);
        let _local = limits.admit(Client::Local).unwrap();
        assert_eq!(limits.counts().per_client.len(), 3);
    }
}

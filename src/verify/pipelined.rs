//! [`PipelinedHasher`]: an [`OutboardHasher`] that runs beside its caller.

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::bao::{Outboard, OutboardHasher};
use crate::digest::B3Digest;
use crate::error::{Error, Result};

/// Blobs up to this size are hashed on the caller's task: a thread hand-off
/// costs more than hashing them.
const INLINE_LIMIT: u64 = 1024 * 1024;
/// Pieces queued for the hashing thread. The pieces are `Bytes` the caller
/// holds anyway (they are also being chunked and stored), so this bounds how
/// far the hash may lag, not a copy.
const QUEUE: usize = 8;

/// Computes a blob's digest and outboard, like [`OutboardHasher`], but once
/// the blob outgrows [`INLINE_LIMIT`] on a blocking-pool thread of its own.
///
/// A Put's writer chunks, hashes each chunk and stores it; hashing the whole
/// blob as well on the same task made that task the bottleneck of a Put. On
/// its own thread the blob hash overlaps with the rest.
pub struct PipelinedHasher {
    state: State,
}

enum State {
    Inline(Box<OutboardHasher>),
    Offloaded {
        tx: mpsc::Sender<Bytes>,
        done: JoinHandle<OutboardHasher>,
    },
    /// Only while switching states.
    Switching,
}

impl PipelinedHasher {
    /// A hasher producing an outboard at `shift`.
    pub fn new(shift: u8) -> Self {
        PipelinedHasher {
            state: State::Inline(Box::new(OutboardHasher::new(shift))),
        }
    }

    /// Feeds the next bytes; waits only when the hashing thread is
    /// [`QUEUE`] pieces behind.
    pub async fn update(&mut self, data: Bytes) -> Result<()> {
        self.state = match std::mem::replace(&mut self.state, State::Switching) {
            State::Inline(mut hasher) if hasher.len() + data.len() as u64 <= INLINE_LIMIT => {
                hasher.update(&data);
                self.state = State::Inline(hasher);
                return Ok(());
            }
            State::Inline(hasher) => offload(*hasher),
            other => other,
        };
        match &self.state {
            State::Offloaded { tx, .. } => tx.send(data).await.map_err(|_| hasher_gone()),
            _ => Err(hasher_gone()),
        }
    }

    /// The digest of everything fed, and its outboard.
    pub async fn finalize(self) -> Result<(B3Digest, Outboard)> {
        match self.state {
            State::Inline(hasher) => Ok(hasher.finalize()),
            State::Offloaded { tx, done } => {
                drop(tx);
                let hasher = done.await.map_err(|_| hasher_gone())?;
                Ok(hasher.finalize())
            }
            State::Switching => Err(hasher_gone()),
        }
    }
}

/// Moves `hasher` onto a blocking-pool thread fed by a bounded queue. The
/// thread ends when the sender is dropped (the blob is finished, or the
/// writer abandoned).
fn offload(mut hasher: OutboardHasher) -> State {
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    let done = tokio::task::spawn_blocking(move || {
        while let Some(piece) = rx.blocking_recv() {
            hasher.update(&piece);
        }
        hasher
    });
    State::Offloaded { tx, done }
}

fn hasher_gone() -> Error {
    Error::Io(std::io::Error::other("the blob hashing thread stopped"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::pseudo_random;
    use crate::verify::bao::outboard_of;

    #[tokio::test]
    async fn same_digest_and_outboard_inline_and_offloaded() {
        for size in [
            0,
            1000,
            INLINE_LIMIT as usize,
            3 * INLINE_LIMIT as usize + 17,
        ] {
            let data = Bytes::from(pseudo_random(size, 7));
            let mut h = PipelinedHasher::new(4);
            for piece in data.chunks(100_000) {
                h.update(Bytes::copy_from_slice(piece)).await.unwrap();
            }
            let (digest, outboard) = h.finalize().await.unwrap();
            let (want_digest, want_outboard) = outboard_of(&data, 4);
            assert_eq!(digest, want_digest, "size {size}");
            assert_eq!(outboard, want_outboard, "size {size}");
        }
    }
}

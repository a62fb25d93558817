//! [`PipelinedHasher`]: an [`OutboardHasher`] that runs beside its caller.

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::bao::{Outboard, OutboardHasher};
use crate::digest::B3Digest;
use crate::error::{Error, Result};

/// Blobs up to this size are hashed on the caller's task: a thread hand-off
/// costs more than hashing them.
const INLINE_LIMIT: u64 = 1024 * 1024;
/// Bytes handed to the blocking pool at once. Pieces follow the HTTP/2
/// frames a Put arrived in, and a 1 MiB message often comes as a large
/// frame and a small one: a task per piece cost two pool hand-offs per
/// MiB, and on two cores the pool's lock, contended by its threads, spun
/// (`sched_yield`) on every one. Gathered to 4 MiB (about 1.5 ms of
/// hashing, shorter than the time to receive and cut them), a task is
/// started every few ms.
const BATCH: usize = 4 * 1024 * 1024;

/// Computes a blob's digest and outboard, like [`OutboardHasher`], but once
/// the blob outgrows `INLINE_LIMIT` (1 MiB) its pieces are hashed on the
/// blocking pool, a `BATCH` at a time, while the caller goes on with the
/// next.
///
/// A Put's writer chunks, hashes each chunk and stores it; hashing the whole
/// blob as well on the same task made that task the bottleneck of a Put.
/// Each batch is a short blocking task of its own, waited for only when the
/// next batch is ready: the hash runs one batch behind, and no pool thread
/// is held while waiting for data (a thread per Put waiting on a channel
/// could take the whole pool under many concurrent Puts and starve the
/// disk writes those Puts wait for).
pub struct PipelinedHasher {
    state: State,
    /// Pieces not yet handed to the pool (fewer than [`BATCH`] bytes).
    pending: Vec<Bytes>,
    pending_len: usize,
}

enum State {
    Inline(Box<OutboardHasher>),
    /// Hashing the latest piece.
    Offloaded(JoinHandle<Box<OutboardHasher>>),
    /// Only while switching states, or after a hashing task failed.
    Gone,
}

impl PipelinedHasher {
    /// A hasher producing an outboard at `shift`.
    pub fn new(shift: u8) -> Self {
        PipelinedHasher {
            state: State::Inline(Box::new(OutboardHasher::new(shift))),
            pending: Vec::new(),
            pending_len: 0,
        }
    }

    /// Feeds the next bytes; waits only for the previous batch's hashing.
    pub async fn update(&mut self, data: Bytes) -> Result<()> {
        if let State::Inline(hasher) = &mut self.state
            && self.pending.is_empty()
            && hasher.len() + data.len() as u64 <= INLINE_LIMIT
        {
            hasher.update(&data);
            return Ok(());
        }
        self.pending_len += data.len();
        self.pending.push(data);
        if self.pending_len >= BATCH {
            self.hand_off().await?;
        }
        Ok(())
    }

    /// Waits for the previous batch, then hands the pending pieces to the
    /// blocking pool.
    async fn hand_off(&mut self) -> Result<()> {
        let mut hasher = self.take_hasher().await?;
        let batch = std::mem::take(&mut self.pending);
        self.pending_len = 0;
        self.state = State::Offloaded(tokio::task::spawn_blocking(move || {
            for piece in &batch {
                hasher.update(piece);
            }
            hasher
        }));
        Ok(())
    }

    /// The hasher, once it hashed all handed off.
    async fn take_hasher(&mut self) -> Result<Box<OutboardHasher>> {
        match std::mem::replace(&mut self.state, State::Gone) {
            State::Inline(hasher) => Ok(hasher),
            State::Offloaded(task) => task.await.map_err(|_| hasher_gone()),
            State::Gone => Err(hasher_gone()),
        }
    }

    /// The digest of everything fed, and its outboard.
    pub async fn finalize(mut self) -> Result<(B3Digest, Outboard)> {
        if !self.pending.is_empty() {
            self.hand_off().await?;
        }
        Ok(self.take_hasher().await?.finalize())
    }
}

fn hasher_gone() -> Error {
    Error::Io(std::io::Error::other("the blob hashing task failed"))
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
            2 * BATCH + 100_001,
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

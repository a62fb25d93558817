//! [`PipelinedHasher`]: an [`OutboardHasher`] that runs beside its caller.

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::bao::{Outboard, OutboardHasher};
use crate::digest::B3Digest;
use crate::error::{Error, Result};

/// Blobs up to this size are hashed on the caller's task: a thread hand-off
/// costs more than hashing them.
const INLINE_LIMIT: u64 = 1024 * 1024;

/// Computes a blob's digest and outboard, like [`OutboardHasher`], but once
/// the blob outgrows `INLINE_LIMIT` (1 MiB) each piece is hashed on the blocking
/// pool while the caller goes on with the next.
///
/// A Put's writer chunks, hashes each chunk and stores it; hashing the whole
/// blob as well on the same task made that task the bottleneck of a Put.
/// Each piece is a short blocking task of its own, waited for only when the
/// next piece arrives: the hash runs one piece behind, and no pool thread
/// is held while waiting for data (a thread per Put waiting on a channel
/// could take the whole pool under many concurrent Puts and starve the
/// disk writes those Puts wait for).
pub struct PipelinedHasher {
    state: State,
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
        }
    }

    /// Feeds the next bytes; waits only for the previous piece's hashing.
    pub async fn update(&mut self, data: Bytes) -> Result<()> {
        let mut hasher = match std::mem::replace(&mut self.state, State::Gone) {
            State::Inline(mut hasher) if hasher.len() + data.len() as u64 <= INLINE_LIMIT => {
                hasher.update(&data);
                self.state = State::Inline(hasher);
                return Ok(());
            }
            State::Inline(hasher) => hasher,
            State::Offloaded(task) => task.await.map_err(|_| hasher_gone())?,
            State::Gone => return Err(hasher_gone()),
        };
        self.state = State::Offloaded(tokio::task::spawn_blocking(move || {
            hasher.update(&data);
            hasher
        }));
        Ok(())
    }

    /// The digest of everything fed, and its outboard.
    pub async fn finalize(self) -> Result<(B3Digest, Outboard)> {
        let hasher = match self.state {
            State::Inline(hasher) => hasher,
            State::Offloaded(task) => task.await.map_err(|_| hasher_gone())?,
            State::Gone => return Err(hasher_gone()),
        };
        Ok(hasher.finalize())
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

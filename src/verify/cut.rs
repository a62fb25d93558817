//! [`cut_chunks`]: a blob that arrives as one stream of arbitrary pieces,
//! cut back into its listed chunks and each chunk checked on its own.
//!
//! A peer answers a Read of a whole blob in messages of its own size, which
//! need not line up with the chunk list its Stat gave. Cutting them along the
//! list lets a fill fetch a blob in one round trip and still store chunks
//! that are each proven against their digest.

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};

use crate::blobservice::{ChunkMeta, ChunkStream, listed_len};
use crate::digest::B3Digest;
use crate::error::{Error, Result, VerifyError};
use crate::task::spawn_owned;
use crate::verify::verify_chunk_meta;

/// The chunks `chunks` of blob `blob`, cut from `pieces` (the blob's bytes
/// in order) and each verified against its digest and length before it is
/// yielded.
///
/// A chunk that lies within one piece is a slice of it, not a copy. Bytes
/// beyond the last chunk, or a stream that ends before it, are a length
/// mismatch; an error from `pieces` ends the stream with that error.
pub fn cut_chunks<S>(blob: B3Digest, chunks: Vec<ChunkMeta>, pieces: S) -> ChunkStream
where
    S: Stream<Item = Result<Bytes>> + Send + 'static,
{
    checked_ahead(cut_unchecked(blob, chunks, pieces))
}

/// The chunks `chunks` of blob `blob` cut from `pieces` without checking
/// them: for bytes already proven, each chunk against its digest and the
/// run against the blob (a verified spool of a fill that kept its source's
/// chunk list), which a writer of listed chunks stores as they are cut.
/// Lengths are still checked, as [`cut_chunks`] does.
pub fn cut_proven<S>(blob: B3Digest, chunks: Vec<ChunkMeta>, pieces: S) -> ChunkStream
where
    S: Stream<Item = Result<Bytes>> + Send + 'static,
{
    Box::pin(cut_unchecked(blob, chunks, pieces).map(|cut| cut.map(|(_, data)| data)))
}

/// How many cut chunks may be checked at once, ahead of the one yielded.
const CHECKS_IN_FLIGHT: usize = 4;

/// The chunks of `cut`, each checked against its digest and length on a
/// task of its own, yielded in order once checked.
///
/// Whoever takes the chunks checks them again against the blob (a fill's
/// `BlobCheck`), so checking them here, on the task that takes them, put
/// both passes over every byte on one core. With up to
/// [`CHECKS_IN_FLIGHT`] chunks checked on their own tasks, the chunk
/// digests are hashed on whichever cores are free while that task does
/// the blob's pass, and cutting goes on meanwhile. A chunk that fails its
/// check ends the stream (the checks behind it are aborted); an error from
/// the cut is yielded after the chunks cut before it, so a caller that
/// resumes after the chunks it got loses none.
fn checked_ahead(
    cut: impl Stream<Item = Result<(ChunkMeta, Bytes)>> + Send + 'static,
) -> ChunkStream {
    Box::pin(async_stream::stream! {
        let mut cut = std::pin::pin!(cut);
        let mut checks = FuturesOrdered::new();
        let mut cut_done = false;
        let mut cut_error = None;
        while !(cut_done && checks.is_empty()) {
            tokio::select! {
                biased;
                Some(checked) = checks.next(), if !checks.is_empty() => match checked {
                    Ok(data) => yield Ok(data),
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                },
                next = cut.next(), if !cut_done && checks.len() < CHECKS_IN_FLIGHT => match next {
                    Some(Ok((meta, data))) => checks.push_back(spawn_owned(async move {
                        verify_chunk_meta(&meta, &data)?;
                        Ok(data)
                    })),
                    Some(Err(e)) => {
                        cut_error = Some(e);
                        cut_done = true;
                    }
                    None => cut_done = true,
                },
            }
        }
        if let Some(e) = cut_error {
            yield Err(e);
        }
    })
}

/// The chunks `chunks` cut from `pieces`, unchecked.
fn cut_unchecked<S>(
    blob: B3Digest,
    chunks: Vec<ChunkMeta>,
    pieces: S,
) -> impl Stream<Item = Result<(ChunkMeta, Bytes)>> + Send + 'static
where
    S: Stream<Item = Result<Bytes>> + Send + 'static,
{
    // A list whose sizes cannot be a blob's claims nothing worth a buffer.
    let sane = listed_len(&chunks);
    let listed = sane.unwrap_or(u64::MAX);
    let mismatch = move |actual_len: u64| -> Error {
        VerifyError::LengthMismatch {
            what: "blob",
            expected: blob,
            expected_len: listed,
            actual_len,
        }
        .into()
    };
    async_stream::try_stream! {
        if sane.is_none() {
            Err(Error::from(VerifyError::BadChunkList { blob }))?;
        }
        let mut pieces = std::pin::pin!(pieces);
        // What is left of the last piece taken, and all bytes received.
        let mut rest = Bytes::new();
        let mut received = 0u64;
        for chunk in chunks {
            let want = usize::try_from(chunk.size).map_err(|_| mismatch(received))?;
            // Look at the next piece before deciding to gather: a peer that
            // sends one chunk per message hands each chunk over whole.
            if rest.is_empty() && want > 0 {
                match pieces.next().await {
                    Some(piece) => {
                        rest = piece?;
                        received += rest.len() as u64;
                    }
                    None => Err(mismatch(received))?,
                }
            }
            let data = if rest.len() >= want {
                rest.split_to(want)
            } else {
                // The chunk spans pieces: gather it.
                let mut whole = BytesMut::with_capacity(want);
                whole.extend_from_slice(&std::mem::take(&mut rest));
                while whole.len() < want {
                    let Some(piece) = pieces.next().await else {
                        Err(mismatch(received))?;
                        break;
                    };
                    let mut piece = piece?;
                    received += piece.len() as u64;
                    let take = (want - whole.len()).min(piece.len());
                    whole.extend_from_slice(&piece.split_to(take));
                    rest = piece;
                }
                whole.freeze()
            };
            yield (chunk, data);
        }
        // Nothing may follow the last chunk.
        let mut extra = rest.len() as u64;
        while let Some(piece) = pieces.next().await {
            extra += piece?.len() as u64;
        }
        if extra > 0 {
            Err(mismatch(listed + extra))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    fn listed(data: &[u8], sizes: &[usize]) -> Vec<ChunkMeta> {
        let mut at = 0;
        sizes
            .iter()
            .map(|&n| {
                let chunk = &data[at..at + n];
                at += n;
                ChunkMeta {
                    digest: B3Digest::of(chunk),
                    size: n as u64,
                }
            })
            .collect()
    }

    fn pieces(data: &[u8], piece: usize) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
        let pieces: Vec<Result<Bytes>> = data
            .chunks(piece)
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect();
        futures::stream::iter(pieces)
    }

    fn blob(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn cuts_any_piece_size_back_into_the_listed_chunks() {
        let data = blob(10_000);
        let sizes = [3000, 1, 4999, 2000];
        let chunks = listed(&data, &sizes);
        for piece in [1, 7, 1000, 3000, 3001, 10_000] {
            let got: Vec<Bytes> =
                cut_chunks(B3Digest::of(&data), chunks.clone(), pieces(&data, piece))
                    .try_collect()
                    .await
                    .unwrap();
            let lens: Vec<usize> = got.iter().map(Bytes::len).collect();
            assert_eq!(lens, sizes, "piece size {piece}");
            assert_eq!(got.concat(), data, "piece size {piece}");
        }
    }

    #[tokio::test]
    async fn a_chunk_that_arrives_in_one_piece_is_not_copied() {
        let data = Bytes::from(blob(10_000));
        let sizes = [3000, 4000, 3000];
        let chunks = listed(&data, &sizes);
        // One piece per chunk, then one piece holding two chunks.
        for cuts in [&[0, 3000, 7000, 10_000][..], &[0, 3000, 10_000][..]] {
            let sent: Vec<Bytes> = cuts.windows(2).map(|w| data.slice(w[0]..w[1])).collect();
            let source = futures::stream::iter(sent.clone().into_iter().map(Ok));
            let got: Vec<Bytes> = cut_chunks(B3Digest::of(&data), chunks.clone(), source)
                .try_collect()
                .await
                .unwrap();
            let mut at = 0;
            for chunk in &got {
                assert_eq!(
                    chunk.as_ptr(),
                    data[at..].as_ptr(),
                    "the chunk at {at} is a copy (pieces cut at {cuts:?})"
                );
                at += chunk.len();
            }
            assert_eq!(at, data.len());
        }
    }

    #[tokio::test]
    async fn a_short_a_long_or_a_wrong_stream_fails() {
        let data = blob(10_000);
        let chunks = listed(&data, &[4000, 6000]);
        let digest = B3Digest::of(&data);
        let run = |bytes: Vec<u8>| {
            let chunks = chunks.clone();
            async move {
                let mut stream = cut_chunks(digest, chunks, pieces(&bytes, 999));
                let mut good = 0;
                loop {
                    match stream.next().await {
                        Some(Ok(_)) => good += 1,
                        Some(Err(e)) => return (good, e.to_string()),
                        None => panic!("a bad stream ended without an error"),
                    }
                }
            }
        };
        let (good, err) = run(data[..9_999].to_vec()).await;
        assert_eq!(good, 1, "{err}");
        assert!(err.contains("9999"), "{err}");
        let mut long = data.clone();
        long.push(0);
        let (good, err) = run(long).await;
        assert_eq!(good, 2, "{err}");
        assert!(err.contains("10001"), "{err}");
        let mut flipped = data.clone();
        flipped[5000] ^= 1;
        let (good, err) = run(flipped).await;
        assert_eq!(good, 1, "only the first chunk is sound: {err}");
        assert!(err.contains(&chunks[1].digest.to_string()), "{err}");
    }

    #[tokio::test]
    async fn an_error_from_the_source_ends_the_stream_with_it() {
        let data = blob(8_000);
        let chunks = listed(&data, &[4000, 4000]);
        let source = pieces(&data[..5000], 5000).chain(futures::stream::once(async {
            Err(Error::AllTiersFailed(vec!["peer went away".into()]))
        }));
        let mut stream = cut_chunks(B3Digest::of(&data), chunks, source);
        assert_eq!(stream.next().await.unwrap().unwrap().len(), 4000);
        let err = stream.next().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("peer went away"), "{err}");
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn chunks_being_checked_when_the_source_fails_come_before_its_error() {
        // Six chunks in one piece are all cut, and their checks started,
        // before the error arrives.
        let data = blob(6_000);
        let chunks = listed(&data, &[1000; 6]);
        let source = pieces(&data, 6000).chain(futures::stream::once(async {
            Err(Error::AllTiersFailed(vec!["peer went away".into()]))
        }));
        let got: Vec<Result<Bytes>> = cut_chunks(B3Digest::of(&data), chunks, source)
            .collect()
            .await;
        assert_eq!(got.len(), 7);
        for (i, chunk) in got[..6].iter().enumerate() {
            assert_eq!(chunk.as_ref().unwrap()[..], data[i * 1000..(i + 1) * 1000]);
        }
        let err = got[6].as_ref().unwrap_err();
        assert!(err.to_string().contains("peer went away"), "{err}");
    }

    #[tokio::test]
    async fn a_wrong_chunk_ends_the_stream_after_the_good_ones_before_it() {
        let data = blob(6_000);
        let mut chunks = listed(&data, &[1000; 6]);
        chunks[2].digest = B3Digest::of(b"something else");
        let got: Vec<Result<Bytes>> = cut_chunks(B3Digest::of(&data), chunks, pieces(&data, 6000))
            .collect()
            .await;
        assert_eq!(got.len(), 3, "nothing after the wrong chunk");
        assert_eq!(got[0].as_ref().unwrap()[..], data[..1000]);
        assert_eq!(got[1].as_ref().unwrap()[..], data[1000..2000]);
        assert!(matches!(
            got[2].as_ref().unwrap_err().root(),
            Error::Verification(_)
        ));
    }
}

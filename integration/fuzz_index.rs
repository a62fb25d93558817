//! Property tests of the stored blob index (`BlobIndex::decode`/`encode`):
//! indexes come from disk and from shared buckets, so decoding (and taking
//! the outboard out of) any bytes must fail cleanly, never panic; and what
//! strata writes must read back as written.

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;
use strata::B3Digest;
use strata::blobservice::{ChunkMeta, LARGEST_CHUNK};
use strata::chunkstore::BlobIndex;
use strata::proto::snix::{StatBlobResponse, stat_blob_response};
use strata::verify::bao::{MAX_VERIFY_SHIFT, outboard_of};

use crate::harness::fuzz_config;

fn digest() -> impl Strategy<Value = B3Digest> {
    any::<[u8; 32]>().prop_map(B3Digest::from_bytes)
}

/// Decodes `data` as the index of `blob` and uses it the way stores do;
/// whatever comes out must be self-consistent.
fn decode_and_use(blob: &B3Digest, data: &[u8]) -> Option<BlobIndex> {
    match BlobIndex::decode(blob, data) {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&blob.to_hex()),
                "error does not name the blob: {msg}"
            );
            None
        }
        Ok(index) => {
            assert!(
                !index.chunks.is_empty(),
                "an index without chunks was accepted"
            );
            let sum = index
                .chunks
                .iter()
                .try_fold(0u64, |acc, c| acc.checked_add(c.size));
            assert_eq!(sum, Some(index.size), "size is not the sum of the chunks");
            assert!(
                index.chunks.iter().all(|c| c.size <= LARGEST_CHUNK),
                "a chunk larger than any store cuts was accepted"
            );
            // Taking the outboard out, checked or merely shaped, must not
            // panic whatever the stored shift and bytes are; a checked one
            // is never too coarse to stream with.
            let _ = index.outboard(blob, true);
            if let Some(outboard) = index.outboard(blob, false) {
                assert!(
                    outboard.shift() <= MAX_VERIFY_SHIFT,
                    "shift {}",
                    outboard.shift()
                );
            }
            Some(index)
        }
    }
}

/// A raw `StatBlobResponse` with fields of any shape: digests of any
/// length, sizes up to overflow, any shift.
fn raw_index() -> impl Strategy<Value = StatBlobResponse> {
    let chunk = (
        prop_oneof![
            4 => any::<[u8; 32]>().prop_map(|d| d.to_vec()),
            1 => prop::collection::vec(any::<u8>(), 0..40),
        ],
        prop_oneof![
            4 => 0u64..(1 << 20),
            1 => any::<u64>(),
            1 => Just(u64::MAX),
        ],
    )
        .prop_map(|(digest, size)| stat_blob_response::ChunkMeta {
            digest: digest.into(),
            size,
        });
    (
        prop::collection::vec(chunk, 0..8),
        prop_oneof![Just(0u64), any::<u64>()],
        prop::collection::vec(any::<u8>(), 0..300),
        prop_oneof![0u32..8, any::<u32>()],
    )
        .prop_map(|(chunks, size, bao, bao_shift)| StatBlobResponse {
            chunks,
            size,
            bao: bao.into(),
            bao_shift,
            ..Default::default()
        })
}

/// An index as strata builds them (chunks no larger than any store cuts),
/// with or without an arbitrary stored outboard.
fn generated_index() -> impl Strategy<Value = BlobIndex> {
    (
        prop::collection::vec((digest(), 0u64..=LARGEST_CHUNK), 1..12),
        prop::option::of((0u8..=32, prop::collection::vec(any::<u8>(), 1..200))),
    )
        .prop_map(|(chunks, bao)| BlobIndex {
            size: chunks.iter().map(|(_, s)| s).sum(),
            chunks: chunks
                .into_iter()
                .map(|(digest, size)| ChunkMeta { digest, size })
                .collect(),
            bao: bao.map(|(s, d)| (s, Bytes::from(d))),
        })
}

/// A real blob cut at random points, with its real outboard at `shift`.
fn real_blob() -> impl Strategy<Value = (Vec<u8>, Vec<usize>, u8)> {
    (
        prop::collection::vec(any::<u8>(), 1..(96 * 1024)),
        prop::collection::vec(any::<prop::sample::Index>(), 1..6),
        0u8..=4,
    )
        .prop_map(|(data, cuts, shift)| {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(data.len())).collect();
            cuts.push(data.len());
            cuts.sort_unstable();
            cuts.dedup();
            (data, cuts, shift)
        })
}

fn chunk_list(data: &[u8], cuts: &[usize]) -> Vec<ChunkMeta> {
    let mut start = 0;
    cuts.iter()
        .map(|&end| {
            let piece = &data[start..end];
            start = end;
            ChunkMeta {
                digest: B3Digest::of(piece),
                size: piece.len() as u64,
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(fuzz_config(1024))]

    #[test]
    fn arbitrary_bytes_never_panic(blob in digest(), data in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_and_use(&blob, &data);
    }

    #[test]
    fn malformed_fields_are_errors(blob in digest(), raw in raw_index()) {
        let data = raw.encode_to_vec();
        let decoded = decode_and_use(&blob, &data);
        let well_formed = !raw.chunks.is_empty()
            && raw.chunks.iter().all(|c| c.digest.len() == 32 && c.size <= LARGEST_CHUNK)
            && raw.chunks.iter().try_fold(0u64, |a, c| a.checked_add(c.size))
                .is_some_and(|sum| raw.size == 0 || raw.size == sum)
            && (raw.bao.is_empty() || raw.bao_shift <= u32::from(u8::MAX));
        prop_assert_eq!(decoded.is_some(), well_formed, "{:?}", raw);
    }

    #[test]
    fn generated_indexes_round_trip(blob in digest(), index in generated_index()) {
        let decoded = BlobIndex::decode(&blob, &index.encode());
        prop_assert_eq!(decoded.ok(), Some(index));
    }
}

proptest! {
    #![proptest_config(fuzz_config(128))]

    #[test]
    fn real_indexes_round_trip_with_and_without_outboard(
        (data, cuts, shift) in real_blob(),
        with_outboard in any::<bool>(),
    ) {
        let (blob, outboard) = outboard_of(&data, shift);
        prop_assert_eq!(blob, B3Digest::of(&data));
        let chunks = chunk_list(&data, &cuts);
        let index = BlobIndex::new(chunks, with_outboard.then_some(&outboard));
        prop_assert_eq!(index.size, data.len() as u64);
        let decoded = BlobIndex::decode(&blob, &index.encode()).expect("decode");
        // A one-group blob's outboard is empty, and an empty `bao` field
        // reads back as no outboard (snix's indexes have none).
        let expect_outboard = with_outboard && !outboard.data().is_empty();
        let mut expected = index.clone();
        if !expect_outboard {
            expected.bao = None;
        }
        prop_assert_eq!(&decoded, &expected);
        for trusted in [false, true] {
            let got = decoded.outboard(&blob, trusted);
            prop_assert_eq!(got.is_some(), expect_outboard);
            if let Some(got) = got {
                prop_assert_eq!(got.data(), outboard.data());
                prop_assert_eq!(got.shift(), shift);
                prop_assert_eq!(got.size(), data.len() as u64);
            }
        }
    }

    /// Damage anywhere in a stored index with an outboard: decoding may
    /// succeed (protobuf is forgiving), but the checked outboard is then
    /// either refused or carries exactly the original parent hashes.
    #[test]
    fn damaged_indexes_never_yield_a_wrong_outboard(
        (data, cuts, shift) in real_blob(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        truncate in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let (blob, outboard) = outboard_of(&data, shift);
        let index = BlobIndex::new(chunk_list(&data, &cuts), Some(&outboard));
        let mut stored = index.encode().to_vec();
        for (at, mask) in &flips {
            let i = at.index(stored.len());
            stored[i] ^= mask;
        }
        if let Some(t) = truncate {
            stored.truncate(t.index(stored.len()));
        }
        if let Some(damaged) = decode_and_use(&blob, &stored)
            && let Some(got) = damaged.outboard(&blob, false)
        {
            // The parent hashes are what the outboard proves; a damaged
            // size within the last group only shows when that group's
            // bytes are checked, which then fail.
            prop_assert_eq!(got.data(), outboard.data());
            prop_assert_eq!(got.shift(), shift);
        }
    }
}

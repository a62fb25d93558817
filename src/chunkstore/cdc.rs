//! Content-defined chunking: FastCDC v2020 cut points, found several
//! positions at a time.
//!
//! The cut points are exactly those of the `fastcdc` crate's
//! `v2020::FastCDC` (normalisation level 1, no seed), which snix also uses,
//! so both cut any blob into the same chunks. The tests compare the two on
//! random and adversarial inputs.
//!
//! # Why not call the crate's `cut`
//!
//! A Put cuts every byte on the task that receives the blob, so the cut
//! scan is on the Put's critical path. The crate's scan is one dependency
//! chain (`hash = (hash << 1) + GEAR[byte]`, then a branch), bound by that
//! chain's latency rather than by the core's throughput: it was the largest
//! single cost in a profiled Put, ahead of both BLAKE3 passes together.
//!
//! The gear hash forgets: a byte's table entry is shifted left once per
//! later byte, so 64 bytes on it no longer reaches any bit. The hash at a
//! position is therefore a function of the 64 bytes ending there (or of
//! those since the scan started, near its start), whatever came earlier.
//! [`Cutter`] uses that to scan four stretches of the input at once, as
//! independent chains the core overlaps, each primed with the 64 bytes
//! before it. The first match in position order wins, as in the one-chain
//! scan; matches further on in the same round are discarded. Each lane
//! takes two positions per step with the crate's shifted table, one shift
//! per pair. The speed-up over the crate depends on the core: 1.5 times
//! on one development machine, little on another, where the crate's
//! scan is as fast as a BLAKE3 pass (`examples/chunking.rs`,
//! `docs/benchmarks.md`).

use std::cmp::{max, min};

use fastcdc::v2020::{self, MASKS, get_gear_with_seed, logarithm2};

/// Average chunk size: snix's default, so both cut identical chunks.
pub const AVG_CHUNK_SIZE: u32 = 256 * 1024;
/// Minimum chunk size (average / 2).
pub const MIN_CHUNK_SIZE: u32 = AVG_CHUNK_SIZE / 2;
/// Maximum chunk size (average * 2).
pub const MAX_CHUNK_SIZE: u32 = AVG_CHUNK_SIZE * 2;

/// FastCDC v2020 parameters: minimum = average / 2, maximum = average * 2,
/// as snix derives them from its `avg_chunk_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    /// Average chunk size in bytes.
    pub avg: u32,
}

impl Default for Chunking {
    fn default() -> Self {
        Chunking {
            avg: AVG_CHUNK_SIZE,
        }
    }
}

impl Chunking {
    /// Smallest average FastCDC v2020 accepts with these ratios (its
    /// smallest maximum chunk is 1 KiB).
    pub const MIN_AVG: u32 = 512;
    /// Largest average FastCDC v2020 accepts with these ratios (its
    /// largest minimum chunk is 1 MiB).
    pub const MAX_AVG: u32 = 2 << 20;

    /// Parameters for average chunk size `avg`, if FastCDC accepts it.
    pub fn with_avg(avg: u32) -> Option<Self> {
        (Self::MIN_AVG..=Self::MAX_AVG)
            .contains(&avg)
            .then_some(Chunking { avg })
    }

    /// Minimum chunk size.
    pub fn min(&self) -> u32 {
        self.avg / 2
    }

    /// Maximum chunk size.
    pub fn max(&self) -> u32 {
        self.avg * 2
    }
}

// Every average in MIN_AVG..=MAX_AVG gives sizes FastCDC accepts, and
// MIN_AVG - 1 would not.
const _: () = {
    let (lo, hi) = (Chunking::MIN_AVG, Chunking::MAX_AVG);
    assert!(lo / 2 >= v2020::MINIMUM_MIN && lo >= v2020::AVERAGE_MIN);
    assert!(lo * 2 >= v2020::MAXIMUM_MIN && (lo - 1) * 2 < v2020::MAXIMUM_MIN);
    assert!(hi / 2 <= v2020::MINIMUM_MAX);
    assert!(hi <= v2020::AVERAGE_MAX && hi * 2 <= v2020::MAXIMUM_MAX);
};

/// Stretches scanned at once. Four chains keep a core's integer units busy
/// without running out of registers.
const LANES: usize = 4;
/// Bytes each lane scans per round. A round's work past the first match is
/// wasted, and each stretch costs [`WINDOW`] bytes of priming, so this sits
/// between the two.
const STRETCH: usize = 4096;
// Lanes step two positions at a time and never past a stretch's end.
const _: () = assert!(STRETCH.is_multiple_of(2));
/// Bytes after which a byte no longer affects the gear hash.
const WINDOW: usize = 64;

/// Finds FastCDC v2020 cut points for one [`Chunking`].
#[derive(Clone)]
pub struct Cutter {
    min: usize,
    avg: usize,
    max: usize,
    /// Mask before the average size (harder to match).
    mask_s: u64,
    /// Mask after the average size (easier to match).
    mask_l: u64,
    gear: Box<[u64; 256]>,
    /// `gear` shifted left by one, for the first position of a pair.
    gear_ls: Box<[u64; 256]>,
}

impl Cutter {
    /// A cutter for `chunking`'s sizes.
    pub fn new(chunking: Chunking) -> Self {
        let avg = chunking.avg;
        // Level 1 normalisation: one bit more before the average, one less
        // after, as `FastCDC::new` chooses.
        let bits = logarithm2(avg) as usize;
        let mask_s = MASKS[bits + 1];
        let mask_l = MASKS[bits - 1];
        // The crate checks even positions on the hash shifted left by one.
        // With bit 63 clear in both masks, that is the plain check here.
        debug_assert!((mask_s | mask_l) >> 63 == 0);
        let (gear, gear_ls) = get_gear_with_seed(0);
        Cutter {
            min: chunking.min() as usize,
            avg: avg as usize,
            max: chunking.max() as usize,
            mask_s,
            mask_l,
            gear,
            gear_ls,
        }
    }

    /// Length of the chunk that starts at `data[0]`. `data` must hold at
    /// least a maximum chunk, or be the end of the blob.
    pub fn cut(&self, data: &[u8]) -> usize {
        self.cut_pieces(&[data])
    }

    /// [`Cutter::cut`] of `head` followed by `tail`, without joining them:
    /// a writer holding the start of a chunk from an earlier piece learns
    /// how much of the next piece the chunk takes before it copies any of
    /// it.
    pub fn cut_split(&self, head: &[u8], tail: &[u8]) -> usize {
        self.cut_pieces(&[head, tail])
    }

    /// [`Cutter::cut`] of `pieces` one after the other, without joining
    /// them: a writer holding a chunk's start in the pieces it arrived in
    /// (the end of a large one and a few small ones, as an HTTP/2 stream
    /// often cuts 1 MiB messages) cuts it where it lies. A whole input is
    /// one piece.
    pub fn cut_pieces(&self, pieces: &[&[u8]]) -> usize {
        let len = pieces.iter().map(|p| p.len()).sum();
        if len <= self.min {
            return len;
        }
        let remaining = min(len, self.max);
        let center = min(self.avg, remaining);
        // The scan walks pairs of bytes from an even offset, as the
        // crate's does: an odd minimum starts one byte early, and an odd
        // end leaves its last byte unexamined.
        let origin = self.min / 2 * 2;
        let middle = center / 2 * 2;
        let end = remaining / 2 * 2;
        self.first_match_pieces(pieces, origin, origin, middle, self.mask_s)
            .or_else(|| self.first_match_pieces(pieces, origin, middle, end, self.mask_l))
            .unwrap_or(remaining)
    }

    /// [`Cutter::first_match`] over `pieces` one after the other. Each
    /// position is scanned in place, in the piece that holds it, unless
    /// its hash reaches back across the start of that piece: those, at
    /// most [`WINDOW`] after each join, are scanned from a copy of the
    /// bytes around the join.
    fn first_match_pieces(
        &self,
        pieces: &[&[u8]],
        origin: usize,
        from: usize,
        to: usize,
        mask: u64,
    ) -> Option<usize> {
        // The first position not scanned yet, and where the piece starts.
        let mut next = from;
        let mut at = 0;
        for piece in pieces {
            let end = at + piece.len();
            if next >= to {
                break;
            }
            if next < end && origin < at && next < at + WINDOW {
                // The bytes the hashes at next..bridged depend on (from
                // this piece and those before it, and after it if it is
                // shorter than a window).
                let bridged = min(to, at + WINDOW);
                let start = max(origin, next.saturating_sub(WINDOW));
                let mut bridge = [0u8; 2 * WINDOW];
                let bridge = &mut bridge[..bridged - start];
                gather(pieces, start, bridge);
                let hash = self.prime(bridge, 0, next - start);
                if let Some(i) = self.scan(bridge, hash, next - start..bridged - start, mask) {
                    return Some(start + i);
                }
                next = bridged;
            }
            let stop = min(to, end);
            if next < stop {
                // From here on every hash lies within this piece.
                let local = origin.saturating_sub(at);
                if let Some(i) = self.first_match(piece, local, next - at, stop - at, mask) {
                    return Some(at + i);
                }
                next = stop;
            }
            at = end;
        }
        None
    }

    /// The first position in `from..to` whose hash, taken from `origin`
    /// on, has none of `mask`'s bits set.
    fn first_match(
        &self,
        data: &[u8],
        origin: usize,
        mut from: usize,
        to: usize,
        mask: u64,
    ) -> Option<usize> {
        // Each lane takes two positions per step, as the crate's scan
        // does: `(h << 2) + (G[x] << 1)` is the hash at the first position
        // shifted left by one, tested against the mask shifted alike (bit
        // 63 is clear in both masks, so no bit of the test is lost), and
        // adding `G[y]` to it gives the exact hash at the second. One shift
        // per pair instead of two: the four chains are bound by the core's
        // throughput, so every instruction saved per byte counts.
        let mask_ls = mask << 1;
        while to - from >= LANES * STRETCH {
            // Written out for four lanes: in separate variables, the four
            // chains stay in registers, which they did not in an array.
            let starts: [usize; LANES] = std::array::from_fn(|l| from + l * STRETCH);
            // One slice for the four stretches: each lane's byte is at a
            // constant offset from one base, which leaves registers for
            // the chains, both tables and both masks.
            let round: &[u8; LANES * STRETCH] = data[from..from + LANES * STRETCH]
                .try_into()
                .expect("a round is LANES * STRETCH bytes");
            let (gear, gear_ls) = (&*self.gear, &*self.gear_ls);
            let [mut ha, mut hb, mut hc, mut hd] = starts.map(|s| self.prime(data, origin, s));
            // The offset in each stretch of the position that matched, with
            // the lanes' hashes there (see below for the first of a pair).
            let mut hit = None;
            for pair in 0..STRETCH / 2 {
                let k = 2 * pair;
                ha = (ha << 2).wrapping_add(gear_ls[round[k] as usize]);
                hb = (hb << 2).wrapping_add(gear_ls[round[STRETCH + k] as usize]);
                hc = (hc << 2).wrapping_add(gear_ls[round[2 * STRETCH + k] as usize]);
                hd = (hd << 2).wrapping_add(gear_ls[round[3 * STRETCH + k] as usize]);
                if (ha & mask_ls == 0)
                    | (hb & mask_ls == 0)
                    | (hc & mask_ls == 0)
                    | (hd & mask_ls == 0)
                {
                    // The hash at k with its top bit dropped: the next
                    // step shifts that bit out anyway.
                    hit = Some((k, [ha, hb, hc, hd].map(|h| h >> 1)));
                    break;
                }
                ha = ha.wrapping_add(gear[round[k + 1] as usize]);
                hb = hb.wrapping_add(gear[round[STRETCH + k + 1] as usize]);
                hc = hc.wrapping_add(gear[round[2 * STRETCH + k + 1] as usize]);
                hd = hd.wrapping_add(gear[round[3 * STRETCH + k + 1] as usize]);
                if (ha & mask == 0) | (hb & mask == 0) | (hc & mask == 0) | (hd & mask == 0) {
                    hit = Some((k + 1, [ha, hb, hc, hd]));
                    break;
                }
            }
            if let Some((k, hashes)) = hit {
                // Lanes are in position order: a lane that matched at `k`
                // wins unless an earlier lane matches later in its stretch.
                for (start, hash) in starts.into_iter().zip(hashes) {
                    if hash & mask == 0 {
                        return Some(start + k);
                    }
                    let rest = start + k + 1..start + STRETCH;
                    if let Some(i) = self.scan(data, hash, rest, mask) {
                        return Some(i);
                    }
                }
                unreachable!("a lane matched at {k}");
            }
            from += LANES * STRETCH;
        }
        let hash = self.prime(data, origin, from);
        self.scan(data, hash, from..to, mask)
    }

    /// The hash just before `at`, for a scan that started at `origin`.
    fn prime(&self, data: &[u8], origin: usize, at: usize) -> u64 {
        let from = max(origin, at.saturating_sub(WINDOW));
        data[from..at].iter().fold(0, |h, &b| self.step(h, b))
    }

    /// One chain: the first position in `range` that matches, going on
    /// from `hash`, the hash just before it.
    fn scan(
        &self,
        data: &[u8],
        mut hash: u64,
        range: std::ops::Range<usize>,
        mask: u64,
    ) -> Option<usize> {
        let start = range.start;
        for (i, &b) in data[range].iter().enumerate() {
            hash = self.step(hash, b);
            if hash & mask == 0 {
                return Some(start + i);
            }
        }
        None
    }

    #[inline(always)]
    fn step(&self, hash: u64, byte: u8) -> u64 {
        (hash << 1).wrapping_add(self.gear[byte as usize])
    }
}

/// Copies the bytes of `pieces`, one after the other, from offset `start`
/// on into `out`.
fn gather(pieces: &[&[u8]], start: usize, out: &mut [u8]) {
    let mut at = 0;
    let mut filled = 0;
    for piece in pieces {
        if filled == out.len() {
            break;
        }
        let end = at + piece.len();
        let from = start + filled;
        if from < end {
            let take = min(end - from, out.len() - filled);
            out[filled..filled + take].copy_from_slice(&piece[from - at..from - at + take]);
            filled += take;
        }
        at = end;
    }
}

impl std::fmt::Debug for Cutter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cutter")
            .field("min", &self.min)
            .field("avg", &self.avg)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastcdc::v2020::FastCDC;
    use proptest::prelude::*;

    /// Every cut of `data`, by the crate and by [`Cutter`].
    fn both(data: &[u8], chunking: Chunking) -> (Vec<usize>, Vec<usize>) {
        let reference = FastCDC::new(data, chunking.min(), chunking.avg, chunking.max())
            .map(|c| c.offset + c.length)
            .collect();
        let cutter = Cutter::new(chunking);
        let mut ours = Vec::new();
        let mut at = 0;
        while at < data.len() {
            at += cutter.cut(&data[at..]);
            ours.push(at);
        }
        (reference, ours)
    }

    /// Random bytes folded into `alphabet` values: low-entropy input makes
    /// matches dense, so they land in every lane and at every offset of a
    /// round.
    fn low_entropy(len: usize, seed: u64, alphabet: u8) -> Vec<u8> {
        random(len, seed)
            .into_iter()
            .map(|b| b % alphabet)
            .collect()
    }

    fn random(len: usize, seed: u64) -> Vec<u8> {
        use rand::{RngCore, SeedableRng};
        let mut data = vec![0; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
        data
    }

    #[test]
    fn cuts_random_data_where_fastcdc_does() {
        let data = random(24 << 20, 7);
        let (reference, ours) = both(&data, Chunking::default());
        assert!(reference.len() > 50, "{} chunks", reference.len());
        assert_eq!(ours, reference);
    }

    #[test]
    fn cuts_where_fastcdc_does_at_every_average() {
        // Odd and even minimums, the smallest sizes (where priming
        // reaches back to the scan's start) and the largest.
        for (avg, len) in [
            (Chunking::MIN_AVG, 1 << 16),
            (Chunking::MIN_AVG + 1, 1 << 16),
            (1000, 1 << 18),
            (4099, 1 << 20),
            (65_537, 8 << 20),
            (Chunking::MAX_AVG, 40 << 20),
        ] {
            let chunking = Chunking::with_avg(avg).expect("a valid average");
            let data = random(len, avg as u64);
            let (reference, ours) = both(&data, chunking);
            assert_eq!(ours, reference, "average {avg}");
        }
    }

    #[test]
    fn cuts_repetitive_data_where_fastcdc_does() {
        // Zeros never match and run to the maximum; a short repeating
        // pattern matches at the same phase in every lane.
        let zeros = vec![0u8; 3 << 20];
        let (reference, ours) = both(&zeros, Chunking::default());
        assert_eq!(ours, reference);
        let chunking = Chunking::with_avg(4096).expect("a valid average");
        for period in [1usize, 2, 3, 7, 64, 4096, 4097] {
            let base = random(period, period as u64);
            let data: Vec<u8> = base.iter().copied().cycle().take(1 << 20).collect();
            let (reference, ours) = both(&data, chunking);
            assert_eq!(ours, reference, "period {period}");
        }
    }

    #[test]
    fn a_short_end_is_one_chunk() {
        let cutter = Cutter::new(Chunking::default());
        let data = random(MIN_CHUNK_SIZE as usize, 1);
        assert_eq!(cutter.cut(&data), data.len());
        assert_eq!(cutter.cut(&data[..10]), 10);
        assert_eq!(cutter.cut(&[]), 0);
    }

    /// Every split of `data` whose head is shorter than a maximum chunk
    /// that `splits` yields cuts where the joined input does.
    fn splits_cut_alike(data: &[u8], chunking: Chunking, splits: impl Iterator<Item = usize>) {
        let cutter = Cutter::new(chunking);
        let whole = cutter.cut(data);
        for at in splits.filter(|&at| at < cutter.max && at <= data.len()) {
            let (head, tail) = data.split_at(at);
            assert_eq!(cutter.cut_split(head, tail), whole, "split at {at}");
        }
    }

    #[test]
    fn a_split_input_cuts_where_the_joined_one_does() {
        let chunking = Chunking::default();
        let (min, avg, max) = (
            MIN_CHUNK_SIZE as usize,
            AVG_CHUNK_SIZE as usize,
            MAX_CHUNK_SIZE as usize,
        );
        // Around the scan's start, the mask change and every lane's and
        // the join's priming window.
        let marks = [0, min, avg, avg - 2 * STRETCH, max - 1];
        let splits = || {
            marks
                .into_iter()
                .flat_map(|m| (0..2 * WINDOW + 2).map(move |d| (m + d).saturating_sub(WINDOW + 1)))
        };
        for seed in 0..40 {
            let data = random(max + 100, seed);
            splits_cut_alike(&data, chunking, splits());
            splits_cut_alike(&data, chunking, (1..max).step_by(4099));
        }
        // A maximum chunk with no match in it, and an input shorter than
        // one.
        let zeros = vec![0u8; max];
        splits_cut_alike(&zeros, chunking, splits());
        let short = random(min + 5000, 3);
        splits_cut_alike(&short, chunking, (0..short.len()).step_by(97));
    }

    #[test]
    fn a_split_before_the_minimum_hashes_nothing_before_it() {
        // Small averages match often, so some match falls within a
        // window of the scan's start, whose hash must not include the
        // bytes before it whichever part they are in.
        for avg in [Chunking::MIN_AVG, 700, 1000] {
            let chunking = Chunking::with_avg(avg).expect("a valid average");
            let min = chunking.min() as usize;
            for seed in 0..300 {
                let data = random(chunking.max() as usize + 10, seed);
                splits_cut_alike(&data, chunking, (0..min + 2 * WINDOW).step_by(5));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_split_cuts_where_the_joined_input_does(
            avg in Chunking::MIN_AVG..20_000u32,
            len in 0usize..90_000,
            seed in any::<u64>(),
            alphabet in 1u8..=255,
            at in any::<prop::sample::Index>(),
        ) {
            let chunking = Chunking::with_avg(avg).expect("in range");
            let data = low_entropy(len, seed, alphabet);
            let cutter = Cutter::new(chunking);
            let at = at.index(data.len().min(cutter.max - 1) + 1);
            let (head, tail) = data.split_at(at);
            prop_assert_eq!(cutter.cut_split(head, tail), cutter.cut(&data));
        }
    }

    /// `data` cut into pieces of the sizes in `sizes`, round and round.
    fn pieces_of<'a>(data: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
        let mut pieces = Vec::new();
        let mut rest = data;
        for &size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, after) = rest.split_at(size.min(rest.len()));
            pieces.push(piece);
            rest = after;
        }
        pieces
    }

    #[test]
    fn an_input_in_many_pieces_cuts_where_the_joined_one_does() {
        // Pieces shorter than, as long as and longer than a window, so
        // that a join's bridge spans several of them; empty ones too; and
        // a large piece followed by small ones, as a 1 MiB message often
        // arrives.
        let sizes: [&[usize]; 7] = [
            &[1],
            &[63, 0, 1, 64, 65],
            &[WINDOW - 1],
            &[3, 1000, 7],
            &[200_000, 10, 5],
            &[100_000, 1, 0, 2, 300_000],
            &[4099, 17],
        ];
        for chunking in [
            Chunking::default(),
            Chunking::with_avg(4096).expect("valid"),
        ] {
            let cutter = Cutter::new(chunking);
            for seed in 0..8 {
                let data = random(cutter.max + 100, seed);
                let whole = cutter.cut(&data);
                for sizes in sizes {
                    // The pieces the writer holds: the start of a chunk,
                    // then the next piece cut at a maximum chunk.
                    let pieces = pieces_of(&data[..cutter.max], sizes);
                    assert_eq!(cutter.cut_pieces(&pieces), whole, "{sizes:?}, seed {seed}");
                }
            }
        }
    }

    #[test]
    fn small_pieces_cut_where_the_joined_input_does() {
        // Small averages match often, and pieces shorter than a few
        // windows put a join within a window of nearly every position: a
        // hash that misses bytes across a join, or takes some from before
        // the scan's start, shows.
        let sizes: [&[usize]; 5] = [
            &[1],
            &[7, 0],
            &[WINDOW / 2],
            &[WINDOW + 3],
            &[2 * WINDOW - 1, 5],
        ];
        for avg in [Chunking::MIN_AVG, 700, 1000] {
            let chunking = Chunking::with_avg(avg).expect("a valid average");
            let cutter = Cutter::new(chunking);
            for seed in 0..200 {
                let data = random(cutter.max, seed);
                let whole = cutter.cut(&data);
                for sizes in sizes {
                    let pieces = pieces_of(&data, sizes);
                    assert_eq!(
                        cutter.cut_pieces(&pieces),
                        whole,
                        "average {avg}, {sizes:?}, seed {seed}"
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_pieces_cut_where_the_joined_input_does(
            avg in Chunking::MIN_AVG..20_000u32,
            len in 0usize..90_000,
            seed in any::<u64>(),
            alphabet in 1u8..=255,
            sizes in prop::collection::vec(0usize..3 * WINDOW, 1..8),
            large in 0usize..40_000,
        ) {
            let chunking = Chunking::with_avg(avg).expect("in range");
            let data = low_entropy(len, seed, alphabet);
            let cutter = Cutter::new(chunking);
            let data = &data[..data.len().min(cutter.max)];
            let mut sizes = sizes;
            sizes.push(large);
            let pieces = pieces_of(data, &sizes);
            prop_assert_eq!(cutter.cut_pieces(&pieces), cutter.cut(data));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn cuts_any_input_where_fastcdc_does(
            avg in Chunking::MIN_AVG..20_000u32,
            len in 0usize..300_000,
            seed in any::<u64>(),
            alphabet in 1u8..=255,
        ) {
            let chunking = Chunking::with_avg(avg).expect("in range");
            let data = low_entropy(len, seed, alphabet);
            let (reference, ours) = both(&data, chunking);
            prop_assert_eq!(ours, reference);
        }
    }
}

//! Runs fuzz bodies on stable, inside `cargo test`: shared by the `tests/fuzz_bodies.rs`
//! files (each includes this file with `#[path]`). Reads the committed seed corpus
//! `fuzz/corpus/<target>/` and derives a bounded number of inputs from it with a seeded
//! mutator, so every CI run covers the same inputs and a failure names the input that
//! broke the body. `BUILDFARM_FUZZ_ITERATIONS` raises (or lowers) the count.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Generated inputs per target when `BUILDFARM_FUZZ_ITERATIONS` is not set.
pub const DEFAULT_ITERATIONS: usize = 2_000;

/// How many generated inputs to run.
pub fn iterations() -> usize {
    std::env::var("BUILDFARM_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ITERATIONS)
}

/// `fuzz/corpus/<target>`, found above the test crate's manifest dir.
pub fn corpus_dir(manifest_dir: &str, target: &str) -> PathBuf {
    let found = Path::new(manifest_dir)
        .ancestors()
        .map(|a| a.join("fuzz/corpus"))
        .find(|c| c.is_dir());
    match found {
        Some(c) => c.join(target),
        None => panic!("no fuzz/corpus above {manifest_dir}"),
    }
}

/// The seeds of `target` as (file name, bytes), sorted by name; never empty.
pub fn corpus(manifest_dir: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(manifest_dir, target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("listing the corpus").path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let data =
                std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            (name, data)
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "corpus {} is empty", dir.display());
    seeds
}

/// SplitMix64: a few lines of deterministic randomness, enough for a mutator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Bytes that tend to matter to parsers: delimiters, quotes, escapes, boundaries.
const INTERESTING: &[u8] = b"\0\n\r\t \"'\\/.-+=@[]{}#,:\xff\x7f\x80";

/// One mutated input: a seed changed by 1 to 4 libFuzzer-style edits (bit flips, byte
/// sets, inserted or deleted runs, duplicated chunks, splices with another seed,
/// truncation), capped at `max_len` bytes.
pub fn mutate(rng: &mut Rng, seeds: &[(String, Vec<u8>)], max_len: usize) -> Vec<u8> {
    let mut data = rng.pick(seeds).1.clone();
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = *rng.pick(INTERESTING);
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let b = *rng.pick(INTERESTING);
                data.splice(i..i, std::iter::repeat_n(b, n));
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                data.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let chunk = data[i..i + n].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, chunk);
            }
            5 => {
                let other = &rng.pick(seeds).1;
                if !other.is_empty() {
                    let i = rng.below(other.len());
                    let n = 1 + rng.below((other.len() - i).min(256));
                    let at = rng.below(len + 1);
                    data.splice(at..at, other[i..i + n].iter().copied());
                }
            }
            6 if len > 0 => data.truncate(rng.below(len)),
            _ => {
                let i = rng.below(len + 1);
                let random = rng.next_u64().to_le_bytes();
                data.splice(i..i, random[..1 + rng.below(8)].iter().copied());
            }
        }
    }
    data.truncate(max_len);
    data
}

/// Runs `body` over `count` mutated inputs from `seed`; on a panic, says which input (and
/// writes it to the temp dir) so it can become a corpus entry.
pub fn run_generated(
    target: &str,
    seeds: &[(String, Vec<u8>)],
    seed: u64,
    count: usize,
    max_len: usize,
    mut body: impl FnMut(&[u8]),
) {
    let mut rng = Rng::new(seed);
    for i in 0..count {
        let input = mutate(&mut rng, seeds, max_len);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&input)));
        if let Err(panic) = outcome {
            let path = std::env::temp_dir().join(format!("{target}-crash-{seed}-{i}"));
            let saved = std::fs::write(&path, &input).is_ok();
            eprintln!(
                "{target}: generated input {i} (seed {seed}) broke the body; {}",
                if saved {
                    format!("saved as {}", path.display())
                } else {
                    format!("bytes: {input:?}")
                }
            );
            std::panic::resume_unwind(panic);
        }
    }
}

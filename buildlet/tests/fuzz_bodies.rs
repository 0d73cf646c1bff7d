//! The `tar_extract` fuzz body on stable: every committed seed and a bounded number of
//! generated tarballs go through `buildlet::tarball::fuzz_extract`, which panics if
//! anything outside the destination changed, a refused tarball changed anything, or an
//! accepted one left a link pointing out.

#[path = "../../fuzz/stable.rs"]
mod stable;

use std::io::Write;

use buildlet::tarball::{FuzzExtractOutcome, fuzz_extract};
use stable::Rng;

const TARGET: &str = "tar_extract";

/// Seeds named `ok-*` are accepted, `bad-*` refused: raw `.tar` seeds once gzip-wrapped,
/// `.tar.gz` seeds as given.
#[test]
fn corpus_seeds_are_accepted_or_refused_as_named() {
    let seeds = stable::corpus(env!("CARGO_MANIFEST_DIR"), TARGET);
    for (name, data) in &seeds {
        let FuzzExtractOutcome { as_given, wrapped } = fuzz_extract(data);
        let judged = if name.ends_with(".tar.gz") {
            as_given
        } else {
            wrapped
        };
        if name.starts_with("ok-") {
            assert!(judged.is_ok(), "{name} was refused: {judged:?}");
        } else if name.starts_with("bad-") {
            assert!(judged.is_err(), "{name} was accepted: {judged:?}");
        }
    }
}

#[test]
fn mutated_seeds_never_break_the_policy() {
    let seeds = stable::corpus(env!("CARGO_MANIFEST_DIR"), TARGET);
    stable::run_generated(
        TARGET,
        &seeds,
        13,
        stable::iterations() / 2,
        64 << 10,
        |d| {
            let _ = fuzz_extract(d);
        },
    );
}

/// Byte mutations mostly break tar header checksums; these tarballs are well formed, with
/// hostile names, link targets and types drawn at random, so they reach the policy.
#[test]
fn generated_tarballs_never_break_the_policy() {
    let mut rng = Rng::new(2026);
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..stable::iterations() / 2 {
        let tar = random_tar(&mut rng);
        let outcome = std::panic::catch_unwind(|| fuzz_extract(&tar));
        match outcome {
            Ok(FuzzExtractOutcome { wrapped: Ok(_), .. }) => accepted += 1,
            Ok(_) => refused += 1,
            Err(panic) => {
                let path = std::env::temp_dir().join(format!("{TARGET}-generated-{i}.tar"));
                let _ = std::fs::write(&path, &tar);
                eprintln!(
                    "generated tarball {i} broke the body; saved as {}",
                    path.display()
                );
                std::panic::resume_unwind(panic);
            }
        }
    }
    // Both sides of the policy must be exercised, or the generator has gone blind.
    assert!(
        accepted > 0 && refused > 0,
        "accepted {accepted}, refused {refused}"
    );
}

fn random_path(rng: &mut Rng) -> String {
    const PARTS: &[&str] = &["a", "b", "sub", "existing", "keep", "l", "..", ".", "", "é"];
    let mut p = String::new();
    if rng.below(12) == 0 {
        p.push('/');
    }
    for i in 0..1 + rng.below(3) {
        if i > 0 {
            p.push('/');
        }
        let part: &&str = rng.pick(PARTS);
        p.push_str(part);
    }
    p
}

fn random_tar(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(5) {
        let mut h = tar::Header::new_gnu();
        let name = random_path(rng);
        // Written raw: `Header::set_path` refuses the hostile names this is about.
        let name_field = &mut h.as_old_mut().name;
        let n = name.len().min(name_field.len());
        name_field[..n].copy_from_slice(&name.as_bytes()[..n]);
        let data: &[u8] = b"content";
        let (kind, size) = match rng.below(10) {
            0..=3 => (tar::EntryType::Regular, data.len()),
            4 | 5 => (tar::EntryType::Directory, 0),
            6 | 7 => (tar::EntryType::Symlink, 0),
            8 => (tar::EntryType::Link, 0),
            _ => (tar::EntryType::Fifo, 0),
        };
        h.set_entry_type(kind);
        h.set_size(size as u64);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
            let target = random_path(rng);
            let link_field = &mut h.as_old_mut().linkname;
            let n = target.len().min(link_field.len());
            link_field[..n].copy_from_slice(&target.as_bytes()[..n]);
        }
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        if size > 0 {
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(512), 0);
        }
    }
    out.write_all(&[0; 1024]).expect("writing to a Vec");
    out
}

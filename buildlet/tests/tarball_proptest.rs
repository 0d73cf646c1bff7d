//! Property test of the tarball policy: arbitrary tarballs built from hostile name parts
//! (`..`, `/`, `.`, empty), symlinks and hard links either extract with everything inside
//! the destination, or fail leaving the whole sandbox byte-identical. Nothing outside the
//! destination (a sentinel sibling dir, the staging root) ever changes.

#[path = "tarball_common/mod.rs"]
mod common;

use std::fs;
use std::path::Path;

use common::*;
use proptest::prelude::*;
use tar::EntryType;

fn name_part() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(String::from),
        1 => Just("..".to_owned()),
        1 => Just(".".to_owned()),
        1 => Just(String::new()),
        1 => Just("sub".to_owned()),
        1 => Just("existing.txt".to_owned()),
    ]
}

fn rel_path() -> impl Strategy<Value = String> {
    (
        prop::bool::weighted(0.05),
        prop::collection::vec(name_part(), 1..4),
    )
        .prop_map(|(abs, parts)| {
            let joined = parts.join("/");
            if abs { format!("/{joined}") } else { joined }
        })
}

fn link_target() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => rel_path(),
        1 => Just("../../sentinel".to_owned()),
        1 => Just("../../sentinel/secret".to_owned()),
        1 => Just("..".to_owned()),
    ]
}

fn entry() -> impl Strategy<Value = RawEntry> {
    let data = prop::collection::vec(any::<u8>(), 0..64);
    prop_oneof![
        4 => (rel_path(), data, 0u32..0o10000)
            .prop_map(|(n, d, m)| RawEntry::file(&n, &d).with_mode(m | 0o400)),
        2 => (rel_path(), 0u32..0o10000).prop_map(|(n, m)| RawEntry::dir(&n).with_mode(m)),
        2 => (rel_path(), link_target()).prop_map(|(n, t)| RawEntry::symlink(&n, &t)),
        1 => (rel_path(), link_target()).prop_map(|(n, t)| RawEntry::hardlink(&n, &t)),
        1 => rel_path().prop_map(|n| RawEntry::special(&n, EntryType::Fifo)),
    ]
}

/// Every symlink under `dest` that resolves at all resolves inside `dest`.
fn assert_links_inside(dest: &Path) {
    let real_dest = dest.canonicalize().unwrap();
    for item in walkdir::WalkDir::new(dest).follow_links(false) {
        let item = item.unwrap();
        if item.path_is_symlink()
            && let Ok(real) = item.path().canonicalize()
        {
            assert!(
                real.starts_with(&real_dest),
                "{} resolves to {}",
                item.path().display(),
                real.display()
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn extraction_stays_inside_or_changes_nothing(
        entries in prop::collection::vec(entry(), 0..8)
    ) {
        let sb = Sandbox::new();
        let before = sb.snapshot_all();
        let result = sb.extract(&raw_tgz(&entries), &small_limits());
        match result {
            Ok(_) => {
                sb.assert_outside_unchanged(&before);
                assert_links_inside(&sb.dest);
            }
            Err(_) => prop_assert_eq!(before, sb.snapshot_all()),
        }
        prop_assert_eq!(fs::read_dir(&sb.staging).unwrap().count(), 0);
    }

    #[test]
    fn round_trip_of_accepted_trees(entries in prop::collection::vec(entry(), 0..8)) {
        // Whatever was accepted, written out again and extracted elsewhere, is identical.
        let sb = Sandbox::new();
        if sb.extract(&raw_tgz(&entries), &small_limits()).is_ok() {
            let mut tgz = Vec::new();
            buildlet::tarball::write_tar_gz(&sb.dest, &mut tgz).unwrap();
            let other = sb.tmp.path().join("copy");
            fs::create_dir(&other).unwrap();
            buildlet::tarball::extract_tar_gz(
                tgz.as_slice(), &other, &sb.staging, &small_limits(),
            ).unwrap();
            prop_assert_eq!(snapshot(&sb.dest), snapshot(&other));
        }
    }
}

//! Explicit tests of the tarball policy: each kind of hostile tarball is refused with a clear
//! message and leaves the whole sandbox untouched; accepted tarballs merge into the
//! destination; `write_tar_gz` then `extract_tar_gz` reproduces a tree.

#[path = "tarball_common/mod.rs"]
mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};

use buildlet::tarball::{Limits, TarError, extract_tar_gz, write_tar_gz};
use common::*;
use tar::EntryType;

#[test]
fn dotdot_entries_are_refused() {
    let sb = Sandbox::new();
    for name in ["../escape", "a/../../escape", "..", "ok/.."] {
        let tgz = raw_tgz(&[RawEntry::file("fine", b"x"), RawEntry::file(name, b"evil")]);
        let err = sb.extract_refused(&tgz, &small_limits());
        assert!(matches!(err, TarError::Escapes(_)), "{name}: {err}");
        assert_eq!(
            err.to_string(),
            format!("entry {name:?} escapes the target directory")
        );
    }
}

#[test]
fn absolute_entries_are_refused() {
    let sb = Sandbox::new();
    let target = sb.sentinel.join("abs");
    let tgz = raw_tgz(&[RawEntry::file(target.to_str().unwrap(), b"evil")]);
    let err = sb.extract_refused(&tgz, &small_limits());
    assert!(matches!(err, TarError::Absolute(_)), "{err}");
    assert!(!target.exists());
}

#[test]
fn symlinks_pointing_out_are_refused() {
    let sb = Sandbox::new();
    let abs = sb.sentinel.to_str().unwrap().to_owned();
    for (name, target) in [
        ("a", abs.as_str()),
        ("a", "../../sentinel"),
        ("d/a", "../../x"),
        ("a", ""),
        ("d/a", "x/../../y"),
    ] {
        let tgz = raw_tgz(&[
            RawEntry::symlink(name, target),
            RawEntry::file(&format!("{name}/secret"), b"evil"),
        ]);
        let err = sb.extract_refused(&tgz, &small_limits());
        assert!(
            matches!(
                err,
                TarError::SymlinkOutside { .. } | TarError::SymlinkDotDotAfterName { .. }
            ),
            "{name} -> {target}: {err}"
        );
    }
    let tgz = raw_tgz(&[RawEntry::symlink("a", "/etc")]);
    let err = sb.extract_refused(&tgz, &small_limits());
    assert_eq!(err.to_string(), "symlink \"a\" -> \"/etc\" points outside");
}

#[test]
fn writing_through_a_symlink_is_refused_even_inside() {
    let sb = Sandbox::new();
    let tgz = raw_tgz(&[
        RawEntry::dir("real"),
        RawEntry::symlink("a", "real"),
        RawEntry::file("a/file", b"through"),
    ]);
    let err = sb.extract_refused(&tgz, &small_limits());
    assert!(
        matches!(&err, TarError::ThroughSymlink { path, link } if path == "a/file" && link == "a"),
        "{err}"
    );
}

#[test]
fn a_symlink_replacing_a_directory_is_refused() {
    let sb = Sandbox::new();
    let tgz = raw_tgz(&[
        RawEntry::file("d/f", b"x"),
        RawEntry::symlink("d", "."),
        RawEntry::file("d/g", b"y"),
    ]);
    let err = sb.extract_refused(&tgz, &small_limits());
    assert!(matches!(err, TarError::Conflict { .. }), "{err}");
}

#[test]
fn hard_links_must_name_an_earlier_file() {
    let sb = Sandbox::new();
    let secret = sb.sentinel.join("secret");
    let cases = [
        RawEntry::hardlink("h", "../../sentinel/secret"),
        RawEntry::hardlink("h", secret.to_str().unwrap()),
        RawEntry::hardlink("h", "existing.txt"),
        RawEntry::hardlink("h", "sub"),
        RawEntry::hardlink("h", ""),
    ];
    for case in cases {
        let tgz = raw_tgz(&[RawEntry::dir("sub"), case.clone()]);
        let err = sb.extract_refused(&tgz, &small_limits());
        assert!(
            matches!(
                err,
                TarError::HardLinkOutside { .. } | TarError::HardLinkUnknown { .. }
            ),
            "{case:?}: {err}"
        );
    }
    // A hard link to a file that was replaced by a symlink is refused too.
    let tgz = raw_tgz(&[
        RawEntry::file("f", b"x"),
        RawEntry::symlink("f", "g"),
        RawEntry::hardlink("h", "f"),
    ]);
    let err = sb.extract_refused(&tgz, &small_limits());
    assert!(matches!(err, TarError::HardLinkUnknown { .. }), "{err}");

    let tgz = raw_tgz(&[RawEntry::file("f", b"data"), RawEntry::hardlink("h", "./f")]);
    let stats = sb.extract(&tgz, &small_limits()).unwrap();
    assert_eq!(stats.entries, 2);
    assert_eq!(inode(&sb.dest.join("f")), inode(&sb.dest.join("h")));
    assert_eq!(fs::read(sb.dest.join("h")).unwrap(), b"data");
}

#[test]
fn devices_and_fifos_are_refused() {
    let sb = Sandbox::new();
    for (kind, word) in [
        (EntryType::Char, "device file"),
        (EntryType::Block, "device file"),
        (EntryType::Fifo, "fifo"),
    ] {
        let tgz = raw_tgz(&[RawEntry::special("dev/null", kind)]);
        let err = sb.extract_refused(&tgz, &small_limits());
        assert_eq!(err.to_string(), format!("{word} \"dev/null\" refused"));
    }
}

#[test]
fn entry_count_bomb_is_refused() {
    let sb = Sandbox::new();
    let limits = Limits {
        max_entries: 100,
        ..small_limits()
    };
    let ok: Vec<_> = (0..100)
        .map(|i| RawEntry::file(&format!("f{i}"), b""))
        .collect();
    let too_many: Vec<_> = (0..101)
        .map(|i| RawEntry::file(&format!("f{i}"), b""))
        .collect();
    let err = sb.extract_refused(&raw_tgz(&too_many), &limits);
    assert_eq!(err.to_string(), "too many entries (limit 100)");
    assert_eq!(sb.extract(&raw_tgz(&ok), &limits).unwrap().entries, 100);
}

#[test]
fn declared_size_bomb_is_refused_before_reading() {
    let sb = Sandbox::new();
    // The header claims 11 MiB but carries only a little data.
    let mut entry = RawEntry::file("big", b"small");
    entry.declared_size = Some(11 << 20);
    let mut tar = raw_tar(&[entry]);
    tar.truncate(1024);
    let err = sb.extract_refused(&gzip(&tar), &small_limits());
    assert_eq!(err.to_string(), "tarball exceeds 10 MiB uncompressed limit");
}

#[test]
fn decompressed_bytes_are_bounded_even_past_the_end_of_the_archive() {
    let sb = Sandbox::new();
    let mut tar = raw_tar(&[RawEntry::file("a", b"x")]);
    tar.extend(std::iter::repeat_n(0u8, 11 << 20));
    let limits = Limits {
        max_ratio: u64::MAX,
        ..small_limits()
    };
    let err = sb.extract_refused(&gzip(&tar), &limits);
    assert!(matches!(err, TarError::TooLarge { .. }), "{err}");
}

#[test]
fn declared_sizes_are_summed_across_entries() {
    let sb = Sandbox::new();
    // Three 4 MiB files: each declared size is fine, the sum is not.
    let data = vec![7u8; 4 << 20];
    let entries: Vec<_> = (0..3)
        .map(|i| RawEntry::file(&format!("f{i}"), &data))
        .collect();
    let limits = Limits {
        max_ratio: u64::MAX,
        ..small_limits()
    };
    let err = sb.extract_refused(&raw_tgz(&entries), &limits);
    assert!(
        matches!(err, TarError::TooLarge { limit } if limit == 10 << 20),
        "{err}"
    );
}

#[test]
fn high_ratio_bomb_is_refused() {
    let sb = Sandbox::new();
    let zeros = vec![0u8; 5 << 20];
    let tgz = raw_tgz(&[RawEntry::file("zeros", &zeros)]);
    let err = sb.extract_refused(&tgz, &small_limits());
    assert_eq!(err.to_string(), "compression ratio above 100");
    // The same data is fine under a ratio it does not exceed.
    let limits = Limits {
        max_ratio: 2000,
        ..small_limits()
    };
    assert_eq!(sb.extract(&tgz, &limits).unwrap().bytes, 5 << 20);
}

#[test]
fn non_gzip_input_is_refused() {
    let sb = Sandbox::new();
    let plain_tar = raw_tar(&[RawEntry::file("a", b"x")]);
    for input in [&b""[..], b"h", b"hello world", plain_tar.as_slice()] {
        let err = sb.extract_refused(input, &small_limits());
        assert_eq!(err.to_string(), "not a gzip stream");
    }
}

#[test]
fn truncated_streams_are_refused() {
    let sb = Sandbox::new();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let tgz = raw_tgz(&[RawEntry::file("a", b"first"), RawEntry::file("b", &data)]);
    // Cut in the middle of the data, just before the gzip trailer (CRC and size), and in the
    // header.
    for len in [tgz.len() / 2, tgz.len() - 4, 12] {
        let err = sb.extract_refused(&tgz[..len], &small_limits());
        assert!(matches!(err, TarError::Corrupt(_)), "cut at {len}: {err}");
    }
    // A corrupted byte in the middle is refused (CRC or deflate error).
    let mut bad = tgz.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    sb.extract_refused(&bad, &small_limits());
}

#[test]
fn pax_and_gnu_long_names_work_and_are_checked() {
    let sb = Sandbox::new();
    let long = format!("{}/file.txt", "d".repeat(150));
    let long_link = format!("{}/target", "t".repeat(120));
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(4);
    header.set_mode(0o644);
    builder
        .append_data(&mut header, &long, &b"long"[..])
        .unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(EntryType::Symlink);
    header.set_size(0);
    builder
        .append_link(&mut header, "longlink", &long_link)
        .unwrap();
    let tgz = gzip(&builder.into_inner().unwrap());
    sb.extract(&tgz, &small_limits()).unwrap();
    assert_eq!(fs::read(sb.dest.join(&long)).unwrap(), b"long");
    assert_eq!(
        fs::read_link(sb.dest.join("longlink"))
            .unwrap()
            .to_str()
            .unwrap(),
        long_link
    );

    // A pax "path" record overrides the innocent name in the header: the policy sees it.
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_pax_extensions([("path", &b"../pax-escape"[..])])
        .unwrap();
    let mut header = tar::Header::new_ustar();
    header.set_size(1);
    header.set_mode(0o644);
    builder
        .append_data(&mut header, "innocent", &b"x"[..])
        .unwrap();
    let err = sb.extract_refused(&gzip(&builder.into_inner().unwrap()), &small_limits());
    assert_eq!(
        err.to_string(),
        "entry \"../pax-escape\" escapes the target directory"
    );
}

#[test]
fn modes_are_kept_without_setuid_and_dirs_stay_usable() {
    let sb = Sandbox::new();
    let tgz = raw_tgz(&[
        RawEntry::dir("locked").with_mode(0o500),
        RawEntry::file("locked/suid", b"#!/bin/sh\n").with_mode(0o4755),
        RawEntry::file("ro", b"r").with_mode(0o444),
        RawEntry::file("sticky", b"s").with_mode(0o1777),
    ]);
    sb.extract(&tgz, &small_limits()).unwrap();
    let mode = |p: &str| fs::metadata(sb.dest.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("locked/suid"), 0o755);
    assert_eq!(mode("ro"), 0o444);
    assert_eq!(mode("sticky"), 0o777);
    assert_eq!(mode("locked"), 0o700);
}

#[test]
fn accepted_tarball_merges_into_dest_and_replaces_planted_symlinks() {
    let sb = Sandbox::new();
    // A previous command planted symlinks pointing outside.
    symlink(&sb.sentinel, sb.dest.join("planted_dir")).unwrap();
    symlink(sb.sentinel.join("secret"), sb.dest.join("planted_file")).unwrap();
    let before = sb.snapshot_all();
    let tgz = raw_tgz(&[
        RawEntry::file("existing.txt", b"replaced"),
        RawEntry::file("sub/new", b"new"),
        RawEntry::file("planted_dir/secret", b"evil"),
        RawEntry::file("planted_file", b"evil"),
        RawEntry::symlink("sub/up", "../existing.txt"),
        RawEntry::file("./", b"").with_mode(0o755),
    ]);
    // "./" as a file is refused; drop it for the accepted case.
    let err = sb.extract_refused(&tgz, &small_limits());
    assert!(matches!(err, TarError::EmptyName(_)), "{err}");
    let tgz = raw_tgz(&[
        RawEntry::dir("./"),
        RawEntry::file("existing.txt", b"replaced"),
        RawEntry::file("sub/new", b"new"),
        RawEntry::file("planted_dir/secret", b"evil"),
        RawEntry::file("planted_file", b"evil"),
        RawEntry::symlink("sub/up", "../existing.txt"),
    ]);
    let stats = sb.extract(&tgz, &small_limits()).unwrap();
    assert_eq!(stats.entries, 6);
    assert_eq!(stats.bytes, 8 + 3 + 4 + 4);
    sb.assert_outside_unchanged(&before);
    let read = |p: &str| fs::read(sb.dest.join(p)).unwrap();
    assert_eq!(read("existing.txt"), b"replaced");
    assert_eq!(read("sub/keep"), b"keep");
    assert_eq!(read("sub/new"), b"new");
    assert_eq!(read("sub/up"), b"replaced");
    assert_eq!(read("planted_dir/secret"), b"evil");
    assert!(
        fs::symlink_metadata(sb.dest.join("planted_dir"))
            .unwrap()
            .is_dir()
    );
    assert!(
        fs::symlink_metadata(sb.dest.join("planted_file"))
            .unwrap()
            .is_file()
    );
    assert_eq!(fs::read(sb.sentinel.join("secret")).unwrap(), b"secret");
}

#[test]
fn missing_dest_and_staging_root_are_created() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("a/b/dest");
    let staging = tmp.path().join("staging");
    let tgz = raw_tgz(&[RawEntry::file("f", b"x")]);
    extract_tar_gz(tgz.as_slice(), &dest, &staging, &Limits::default()).unwrap();
    assert_eq!(fs::read(dest.join("f")).unwrap(), b"x");
    assert_eq!(fs::read_dir(&staging).unwrap().count(), 0);
}

#[test]
fn round_trip_gives_an_identical_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let long_dir = "x".repeat(120);
    fs::create_dir_all(src.join("pkg/empty")).unwrap();
    fs::create_dir_all(src.join(&long_dir)).unwrap();
    fs::write(src.join("pkg/main.go"), b"package main\n").unwrap();
    fs::write(src.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(src.join("private"), b"p").unwrap();
    fs::set_permissions(src.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(src.join(&long_dir).join("deep.txt"), vec![3u8; 100_000]).unwrap();
    fs::set_permissions(src.join("pkg/empty"), fs::Permissions::from_mode(0o750)).unwrap();
    symlink("pkg/main.go", src.join("link")).unwrap();
    symlink("../run.sh", src.join("pkg/up")).unwrap();
    symlink("missing", src.join("dangling")).unwrap();

    let mut tgz = Vec::new();
    let tar_bytes = write_tar_gz(&src, &mut tgz).unwrap();
    assert!(tar_bytes >= 100_000, "tar bytes {tar_bytes}");
    assert_eq!(tar_bytes % 512, 0);

    let dest = tmp.path().join("dest");
    let stats = extract_tar_gz(
        tgz.as_slice(),
        &dest,
        &tmp.path().join("staging"),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(stats.bytes, 13 + 18 + 1 + 100_000);
    assert_eq!(snapshot(&src), snapshot(&dest));

    // Writing is deterministic.
    let mut again = Vec::new();
    write_tar_gz(&src, &mut again).unwrap();
    assert_eq!(tgz, again);
}

#[test]
fn a_dest_that_is_a_symlink_is_refused() {
    let sb = Sandbox::new();
    symlink(&sb.sentinel, sb.dest.join("link")).unwrap();
    let dest = sb.dest.join("link");
    let before = sb.snapshot_all();
    let tgz = raw_tgz(&[RawEntry::file("secret", b"evil")]);
    let err = extract_tar_gz(tgz.as_slice(), &dest, &sb.staging, &small_limits()).unwrap_err();
    assert!(matches!(err, TarError::DestNotDir(_)), "{err}");
    assert_eq!(before, sb.snapshot_all());
}

#!/usr/bin/env python3
"""Writes the seed corpus under fuzz/corpus/<target>/ (committed; rerun only to change seeds).

Names say what each seed must do in `tests/fuzz_bodies.rs`: `ok-*` is accepted, `bad-*` refused, `any-*` only must not break the body.
"""
import gzip, hashlib, hmac, io, os, struct, tarfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- tar_extract: raw tars (the body also gzips them) and a few gzip streams ---------------
def tar(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for kind, name, extra in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            if kind == "file":
                info.size = len(extra)
                info.mode = 0o644
                t.addfile(info, io.BytesIO(extra))
                continue
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, extra
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, extra
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            t.addfile(info)
    return buf.getvalue()


T = "tar_extract"
put(T, "ok-files.tar", tar([("dir", "a", None), ("file", "a/hello.txt", b"hello\n"), ("file", "b.txt", b"b\n")]))
put(T, "ok-symlink-inside.tar", tar([("dir", "a", None), ("file", "b.txt", b"b"), ("symlink", "a/link", "../b.txt")]))
put(T, "ok-hardlink.tar", tar([("file", "f", b"data"), ("hardlink", "h", "f")]))
put(T, "ok-merge-existing-dir.tar", tar([("dir", "sub", None), ("file", "sub/new", b"new")]))
put(T, "ok-gzip.tar.gz", gzip.compress(tar([("file", "x.go", b"package x\n")]), mtime=0))
put(T, "bad-dotdot.tar", tar([("file", "../escape", b"x")]))
put(T, "bad-dotdot-inner.tar", tar([("dir", "a", None), ("file", "a/../../escape", b"x")]))
put(T, "bad-absolute.tar", tar([("file", "/tmp/buildlet-fuzz-absolute-escape", b"x")]))
put(T, "bad-symlink-out.tar", tar([("symlink", "l", "../../sentinel")]))
put(T, "bad-symlink-absolute.tar", tar([("symlink", "l", "/etc")]))
put(T, "bad-symlink-then-file.tar", tar([("symlink", "l", "../../sentinel"), ("file", "l/secret", b"pwned")]))
put(T, "bad-symlink-inside-then-file.tar", tar([("dir", "d", None), ("symlink", "l", "d"), ("file", "l/x", b"through")]))
put(T, "bad-hardlink-out.tar", tar([("hardlink", "h", "../../sentinel/secret")]))
put(T, "bad-hardlink-unknown.tar", tar([("hardlink", "h", "nothere")]))
put(T, "bad-device.tar", tar([("chr", "null", None)]))
put(T, "bad-fifo.tar", tar([("fifo", "pipe", None)]))
put(T, "bad-not-gzip.tar.gz", b"hello, not a tarball\n")
put(T, "bad-truncated.tar.gz", gzip.compress(tar([("file", "x", b"y" * 2000)]), mtime=0)[:40])


# --- revdial_handshake: length-prefixed protobuf frames ------------------------------------
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    return key + (varint(payload) if wire == 0 else varint(len(payload)) + payload)


def hello(version=1, host_type=b"linux", hostname=b"host-1", bv=b"0.1.0", cred=None):
    m = field(1, 0, version) + field(2, 2, host_type) + field(3, 2, hostname) + field(4, 2, bv)
    return m + (cred or b"")


def frame(body):
    return struct.pack(">I", len(body)) + body


NONCE = bytes([7]) * 32


def proof(key, host_type, hostname):
    return hmac.new(key, NONCE + host_type + b"\0" + hostname, hashlib.sha256).digest()


R = "revdial_handshake"
bk = hmac.new(b"fuzz master", b"linux", hashlib.sha256).digest()
good_bk = field(5, 2, proof(bk, b"linux", b"host-1"))
good_tok = field(6, 2, field(1, 2, b"t1") + field(2, 2, proof(b"secret", b"linux", b"host-1")))
put(R, "ok-builder-key.bin", frame(hello(cred=good_bk)))
put(R, "ok-host-token.bin", frame(hello(cred=good_tok)))
put(R, "ok-two-hellos.bin", frame(hello(cred=good_bk)) + frame(hello(cred=good_tok)))
put(R, "bad-wrong-proof.bin", frame(hello(cred=field(5, 2, bytes(32)))))
put(R, "bad-token-other-host-type.bin", frame(hello(host_type=b"mac", cred=good_tok)))
put(R, "bad-no-credential.bin", frame(hello()))
put(R, "bad-version.bin", frame(hello(version=2, cred=good_bk)))
put(R, "bad-host-type-chars.bin", frame(hello(host_type=b"../x", cred=good_bk)))
put(R, "bad-short-proof.bin", frame(hello(cred=field(5, 2, bytes(5)))))
put(R, "bad-oversized-frame.bin", struct.pack(">I", 0xFFFFFFFF) + b"x")
put(R, "bad-truncated.bin", frame(hello(cred=good_bk))[:20])
put(R, "bad-garbage-body.bin", frame(b"\xff\xff\xff\xff\xff"))
put(R, "any-challenge.bin", frame(field(1, 0, 1) + field(2, 2, NONCE)))
put(R, "any-verdict.bin", frame(field(1, 0, 0) + field(2, 2, "refusé \x1b[31m".encode())))

# --- config_parse ---------------------------------------------------------------------------
C = "config_parse"
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "..", "deploy", "examples", "local-and-reverse.toml"), "rb") as f:
    put(C, "ok-deploy-example.toml", f.read())
minimal = b'''[[host_types]]
name = "h"
pool = { kind = "local", count = 1 }

[[builders]]
name = "linux-amd64"
host_type = "h"
steps = [{ name = "test", command = ["go", "test", "./..."] }]

[[repos]]
name = "r"
url = "file:///tmp/r"
'''
put(C, "ok-minimal.toml", minimal)
put(C, "bad-syntax.toml", b"[[host_types]\nname = \n")
put(C, "bad-unknown-section.toml", minimal + b"\n[surprise]\nx = 1\n")
put(C, "bad-unknown-host-type.toml", minimal.replace(b'host_type = "h"', b'host_type = "nope"'))
put(C, "bad-builder-name.toml", minimal.replace(b'"linux-amd64"', b'"linux amd64!"'))
put(C, "bad-duplicate-builder.toml", minimal + minimal[minimal.index(b"[[builders]]"):minimal.index(b"[[repos]]")])
put(C, "bad-wrong-type.toml", minimal.replace(b"count = 1", b'count = "many"'))
put(C, "bad-zero-count.toml", minimal.replace(b"count = 1", b"count = 0"))
put(C, "bad-unknown-field.toml", minimal.replace(b'url = "file:///tmp/r"', b'url = "file:///tmp/r"\nsecret_sauce = true'))
put(C, "bad-bad-duration.toml", b'[coordinator]\nrepo_poll_interval = "soon"\n' + minimal)
put(C, "bad-multibyte.toml", "# é ü 日本\n[[builders]]\nname = \"日本-amd64\"\n".encode())

# --- webhook: repo \n X-Hub-Signature-256 \n body -------------------------------------------
W = "webhook"
body = b'{"ref":"refs/heads/main","after":"0123456789abcdef0123456789abcdef01234567"}'
sig = b"sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest().encode()
put(W, "ok-signed.txt", b"signed\n" + sig + b"\n" + body)
put(W, "ok-signed-upper-hex.txt", b"signed\n" + b"sha256=" + sig[7:].upper() + b"\n" + body)
put(W, "ok-signed-empty-body.txt", b"signed\nsha256=" + hmac.new(b"s3cret", b"", hashlib.sha256).hexdigest().encode() + b"\n")
put(W, "bad-wrong-signature.txt", b"signed\nsha256=" + b"0" * 64 + b"\n" + body)
put(W, "bad-sha1-signature.txt", b"signed\nsha1=" + hmac.new(b"s3cret", body, hashlib.sha1).hexdigest().encode() + b"\n" + body)
put(W, "bad-short-signature.txt", b"signed\n" + sig[:20] + b"\n" + body)
put(W, "bad-no-signature.txt", b"signed")
put(W, "bad-no-secret-repo.txt", b"open\n" + sig + b"\n" + body)
put(W, "ok-unsigned-opted-in.txt", b"unsigned\n\n" + body)
put(W, "bad-unknown-repo.txt", b"../nope\n" + sig + b"\n" + body)

# --- try_patch ------------------------------------------------------------------------------
P = "try_patch"
put(P, "ok-git-diff.patch", b'''From 1 Mon Sep 17 00:00:00 2001
Subject: [PATCH] say hello

---
diff --git a/hello.go b/hello.go
index 3b18e51..a042389 100644
--- a/hello.go
+++ b/hello.go
@@ -1,5 +1,5 @@
 package main
 
 func main() {
-\tprintln("hi")
+\tprintln("hello")
 }
''')
put(P, "ok-new-and-deleted.patch", b'''diff --git a/new.txt b/new.txt
new file mode 100644
index 0000000..e69de29
--- /dev/null
+++ b/new.txt
@@ -0,0 +1,2 @@
+one
+two
diff --git a/old.txt b/old.txt
deleted file mode 100644
--- a/old.txt
+++ /dev/null
@@ -1 +0,0 @@
-gone
''')
put(P, "ok-rename.patch", b'''diff --git a/a dir/x.go b/b dir/x.go
similarity index 100%
rename from a dir/x.go
rename to b dir/x.go
''')
put(P, "ok-quoted.patch", b'''diff --git "a/caf\\303\\251.txt" "b/caf\\303\\251.txt"
--- "a/caf\\303\\251.txt"
+++ "b/caf\\303\\251.txt"
@@ -1 +1 @@
-a
+b
\\ No newline at end of file
''')
put(P, "ok-unified.patch", b'''--- orig/x.c\t2024-01-01 00:00:00.000000000 +0000
+++ new/x.c\t2024-01-02 00:00:00.000000000 +0000
@@ -1,3 +1,3 @@
 int a;
--- not a header inside a hunk
+++ not a header either
 int c;
''')
put(P, "ok-binary.patch", b'''diff --git a/logo.png b/logo.png
new file mode 100644
index 0000000000000000000000000000000000000000..1111111111111111111111111111111111111111
GIT binary patch
literal 4
LcmZ?wbhEKk0

literal 0
HcmV?d00001

''')
put(P, "bad-dotdot.patch", b"--- a/../escape\n+++ b/../escape\n@@ -0,0 +1 @@\n+pwned\n")
put(P, "bad-dotgit.patch", b"diff --git a/.git/hooks/pre-commit b/.git/hooks/pre-commit\nnew file mode 100755\n--- /dev/null\n+++ b/.git/hooks/pre-commit\n@@ -0,0 +1 @@\n+rm -rf /\n")
put(P, "bad-absolute.patch", b"--- a//etc/passwd\n+++ b//etc/passwd\n@@ -1 +1 @@\n-root\n+toor\n")
put(P, "bad-rename-out.patch", b"diff --git a/x b/y\nrename from x\nrename to ../../y\n")
put(P, "bad-truncated.patch", b"--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n a\n-b\n")
put(P, "bad-corrupt-hunk.patch", b"--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n-a\n+b\nnot a hunk line\n")
put(P, "bad-hunk-header.patch", b"--- a/x\n+++ b/x\n@@ -one +two @@\n")
put(P, "bad-hunk-without-file.patch", b"@@ -1 +1 @@\n-a\n+b\n")
put(P, "bad-not-a-patch.patch", b"please apply my change, thanks\n")
put(P, "bad-nul.patch", b"--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\x00\n+b\n")

#!/bin/sh
# Builds the linux-amd64 buildlet image without a registry: assembles a root filesystem
# from this Debian machine (Debian's Go toolchain, sh, git, curl, coreutils, the shared
# libraries `ldd` lists, CA certificates) and loads it with `docker import`.
#
# The image does NOT contain the buildlet: containers run the coordinator's bootstrap
# script, which fetches the buildlet from the coordinator (digest-checked) at start.
#
# Usage: make-image.sh [TAG]   (default buildfarm/linux-amd64:local)
# Needs: docker, Debian's golang-go, git, curl, ca-certificates. `cargo xtask images`
# runs it.
set -eu

tag=${1:-buildfarm/linux-amd64:local}
say() { echo "make-image: $*" >&2; }
die() { say "$*"; exit 1; }

command -v docker >/dev/null 2>&1 || die "docker is not installed"
[ -x /usr/lib/go/bin/go ] || die "Debian's Go is missing (/usr/lib/go): apt-get install golang-go"
goroot=$(readlink -f /usr/lib/go)
gover=$("$goroot/bin/go" env GOVERSION)
sharego=/usr/share/$(basename "$goroot")

# Tests rebuild an image made by another version of this script.
script_sum=$(sha256sum "$0" | cut -d' ' -f1)

root=$(mktemp -d "${TMPDIR:-/tmp}/buildfarm-rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT INT TERM

# Programs the bootstrap, the buildlet's commands and Go builds use.
progs="sh dash bash env cat cp mv rm mkdir rmdir ln ls chmod chown cut head tail tr sort uniq
  wc grep sed find xargs tar gzip sha256sum printf echo true false sleep kill ps id uname
  date touch mktemp dirname basename readlink realpath stat du df test expr tee git curl"
mkdir -p "$root/usr/bin" "$root/bin" "$root/etc" "$root/tmp" "$root/root" "$root/var/tmp" \
  "$root/usr/lib" "$root/usr/share"
chmod 1777 "$root/tmp" "$root/var/tmp"

copy_file() { # copy a file into the rootfs at the same path, resolving symlinks
  src=$1
  [ -e "$root$src" ] && return 0
  mkdir -p "$root$(dirname "$src")"
  cp -L "$src" "$root$src"
}
copy_libs() { # the shared libraries a binary needs, as ldd lists them
  ldd "$1" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    [ -e "$lib" ] && copy_file "$lib"
  done
}

for p in $progs; do
  path=$(command -v "$p" 2>/dev/null || true)
  case $path in
    /*) ;;
    *) [ "$p" = printf ] || [ "$p" = echo ] || [ "$p" = test ] || [ "$p" = true ] ||
         [ "$p" = false ] || [ "$p" = kill ] || die "$p is not installed"
       continue ;;
  esac
  copy_file "$path"
  copy_libs "$path"
done
# /bin/sh is dash on Debian; make it so in the image whatever /bin/sh is here.
ln -sf /usr/bin/dash "$root/bin/sh" 2>/dev/null || ln -sf dash "$root/bin/sh"
[ -e "$root/usr/bin/dash" ] || copy_file "$(command -v dash)"

# git's helpers (git-remote-https and friends) and their libraries.
if [ -d /usr/lib/git-core ]; then
  cp -a /usr/lib/git-core "$root/usr/lib/"
  for f in "$root"/usr/lib/git-core/*; do
    [ -f "$f" ] && [ ! -L "$f" ] && copy_libs "${f#"$root"}"
  done
fi
[ -d /usr/share/git-core ] && cp -a /usr/share/git-core "$root/usr/share/"

# The dynamic loader itself, the C runtime the fetched buildlet (a Rust binary) links
# against, and name-service modules Go and git may load at run time.
for lib in /lib64/ld-linux-x86-64.so.2 /lib/x86_64-linux-gnu/libgcc_s.so.1 \
  /lib/x86_64-linux-gnu/libc.so.6 /lib/x86_64-linux-gnu/libm.so.6 \
  /lib/x86_64-linux-gnu/libnss_files.so.2 \
  /lib/x86_64-linux-gnu/libnss_dns.so.2 /lib/x86_64-linux-gnu/libresolv.so.2; do
  [ -e "$lib" ] && copy_file "$lib"
done

# Debian's Go: the toolchain tree and the shared sources it links to (tests of the
# standard library are left out: builds never need them).
say "copying $gover from $goroot"
cp -a "$goroot" "$root/usr/lib/"
if [ -d "$sharego" ]; then
  mkdir -p "$root$sharego"
  for d in "$sharego"/*; do
    [ "$(basename "$d")" = test ] && continue
    cp -a "$d" "$root$sharego/"
  done
fi
ln -sfn "$(basename "$goroot")" "$root/usr/lib/go"
ln -sf ../lib/go/bin/go "$root/usr/bin/go"
ln -sf ../lib/go/bin/gofmt "$root/usr/bin/gofmt"
for f in "$goroot"/pkg/tool/*/*; do
  [ -f "$f" ] && copy_libs "$f"
done

# CA certificates (Go modules over HTTPS, git), users, and a minimal name-service config.
if [ -d /etc/ssl/certs ]; then
  mkdir -p "$root/etc/ssl"
  cp -aL /etc/ssl/certs "$root/etc/ssl/" 2>/dev/null || cp -a /etc/ssl/certs "$root/etc/ssl/"
fi
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"

# Smoke-check the tree before importing: Go runs from it.
if command -v chroot >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  chroot "$root" /usr/bin/go version >/dev/null || die "go does not run inside the assembled root filesystem"
fi

say "importing $(du -sh "$root" | cut -f1) as $tag"
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/lib/go/bin' \
  --change 'ENV CGO_ENABLED=0' \
  --change 'WORKDIR /root' \
  --change "LABEL buildfarm.go=$gover" \
  --change 'LABEL buildfarm.image=linux-amd64' \
  --change "LABEL buildfarm.script-sha256=$script_sum" \
  - "$tag" >/dev/null
say "built $tag ($gover)"

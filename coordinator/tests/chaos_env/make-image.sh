#!/bin/sh
# Builds one image of the chaos suite (coordinator/tests/chaos.rs) without a registry:
# assembles a root filesystem from this Debian machine's files and loads it with
# `docker import`, like env/linux-amd64/make-image.sh.
#
# Usage: make-image.sh KIND TAG [BIN_DIR]
#   coordinator  the coordinator and buildlet binaries of BIN_DIR, git, sh, coreutils
#   buildlet     the buildlet binary of BIN_DIR, sh, coreutils, curl (the docker pool's
#                bootstrap fetches its own buildlet; reverse buildlets run this one)
#   postgres     Debian's PostgreSQL server (the newest /usr/lib/postgresql/N) with an
#                entry point that makes a trust-auth cluster on first start
# The caller tags by a digest of this script and its inputs, so an unchanged image is
# reused; the libraries each program needs are the ones `ldd` lists.
set -eu

kind=$1
tag=$2
bindir=${3:-}
say() { echo "chaos make-image: $*" >&2; }
die() { say "$*"; exit 1; }
command -v docker >/dev/null 2>&1 || die "docker is not installed"

root=$(mktemp -d "${TMPDIR:-/tmp}/buildfarm-chaos-rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT INT TERM
mkdir -p "$root/usr/bin" "$root/usr/local/bin" "$root/bin" "$root/etc" "$root/tmp" \
  "$root/root" "$root/var/tmp" "$root/usr/lib" "$root/usr/share"
chmod 1777 "$root/tmp" "$root/var/tmp"

copy_file() { # a file into the rootfs at the same path, symlinks resolved
  [ -e "$root$1" ] && return 0
  mkdir -p "$root$(dirname "$1")"
  cp -L "$1" "$root$1"
}
copy_libs() { # the shared libraries a binary needs, as ldd lists them
  ldd "$1" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    [ -e "$lib" ] && copy_file "$lib"
  done
  return 0
}
copy_prog() {
  path=$(command -v "$1" 2>/dev/null || true)
  case $path in
    /*) copy_file "$path"; copy_libs "$path" ;;
    *) die "$1 is not installed" ;;
  esac
}
install_bin() { # a cargo-built binary, without its debug info (images stay small)
  src=$1/$2
  [ -x "$src" ] || die "$src is missing: build it first"
  if command -v strip >/dev/null 2>&1; then
    strip -o "$root/usr/local/bin/$2" "$src"
  else
    cp "$src" "$root/usr/local/bin/$2"
  fi
  copy_libs "$src"
}

progs="sh dash env cat cp mv rm mkdir ln ls chmod cut head tail grep sed sleep id uname
  date touch mktemp dirname basename sha256sum tee df du wc"
for p in $progs; do copy_prog "$p"; done
ln -sf /usr/bin/dash "$root/bin/sh" 2>/dev/null || true
for lib in /lib64/ld-linux-x86-64.so.2 /lib/x86_64-linux-gnu/libgcc_s.so.1 \
  /lib/x86_64-linux-gnu/libc.so.6 /lib/x86_64-linux-gnu/libm.so.6 \
  /lib/x86_64-linux-gnu/libnss_files.so.2 /lib/x86_64-linux-gnu/libnss_dns.so.2 \
  /lib/x86_64-linux-gnu/libresolv.so.2; do
  [ -e "$lib" ] && copy_file "$lib"
done
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
passwd='root:x:0:0:root:/root:/bin/sh\n'
group='root:x:0:\n'
image_path=/usr/local/bin:/usr/bin:/bin
entry=

case $kind in
  coordinator)
    [ -n "$bindir" ] || die "coordinator needs BIN_DIR"
    # Debian's git (a wrapper earlier on PATH may not be), its helpers where its
    # --exec-path says, and the names a local clone runs through the shell.
    gitbin=/usr/bin/git
    [ -x "$gitbin" ] || gitbin=$(command -v git) || die "git is not installed"
    copy_file "$gitbin"
    copy_libs "$gitbin"
    exec_path=$("$gitbin" --exec-path)
    mkdir -p "$root$(dirname "$exec_path")"
    cp -a "$exec_path" "$root$(dirname "$exec_path")/"
    for f in "$root$exec_path"/*; do
      [ -f "$f" ] && [ ! -L "$f" ] && copy_libs "${f#"$root"}"
    done
    for t in git-upload-pack git-receive-pack git-upload-archive; do
      ln -sf git "$root$(dirname "$gitbin")/$t"
    done
    [ -d /usr/share/git-core ] && cp -a /usr/share/git-core "$root/usr/share/"
    install_bin "$bindir" coordinator
    install_bin "$bindir" buildlet
    ;;
  buildlet)
    [ -n "$bindir" ] || die "buildlet needs BIN_DIR"
    copy_prog curl
    [ -d /etc/ssl/certs ] && mkdir -p "$root/etc/ssl" && cp -aL /etc/ssl/certs "$root/etc/ssl/"
    install_bin "$bindir" buildlet
    ;;
  postgres)
    [ -d /usr/lib/postgresql ] || die "PostgreSQL is not installed: apt-get install postgresql"
    v=$(ls /usr/lib/postgresql | sort -n | tail -1)
    pgbin=/usr/lib/postgresql/$v/bin
    for p in postgres initdb pg_ctl; do copy_file "$pgbin/$p"; copy_libs "$pgbin/$p"; done
    # Extension modules, without the JIT (its bitcode and LLVM are most of the size;
    # the server runs with jit=off).
    mkdir -p "$root/usr/lib/postgresql/$v/lib"
    for f in "/usr/lib/postgresql/$v/lib"/*.so; do
      case $(basename "$f") in llvmjit*) continue ;; esac
      cp -a "$f" "$root$f"
      copy_libs "$f"
    done
    mkdir -p "$root/usr/share/postgresql"
    cp -a "/usr/share/postgresql/$v" "$root/usr/share/postgresql/"
    [ -d /usr/share/zoneinfo ] && cp -a /usr/share/zoneinfo "$root/usr/share/"
    passwd="${passwd}postgres:x:999:999:postgres:/var/lib/postgresql:/bin/sh\n"
    group="${group}postgres:x:999:\n"
    mkdir -p "$root/var/lib/postgresql"
    chown 999:999 "$root/var/lib/postgresql"
    cat > "$root/usr/local/bin/pg-entry" <<'PG'
#!/bin/sh
# A throwaway cluster: trust auth from anywhere (the suite's network is private),
# no fsync (a crash of the container is not a scenario of this database's).
set -eu
data=/var/lib/postgresql/data
if [ ! -s "$data/PG_VERSION" ]; then
  initdb -D "$data" -U buildfarm --auth=trust --locale=C -E UTF8 --no-sync >/dev/null
  echo "host all all all trust" >> "$data/pg_hba.conf"
fi
exec postgres -D "$data" -c listen_addresses='*' -c unix_socket_directories=/tmp \
  -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c jit=off
PG
    chmod 755 "$root/usr/local/bin/pg-entry"
    image_path=$image_path:$pgbin
    entry=/usr/local/bin/pg-entry
    ;;
  *) die "unknown kind $kind (coordinator, buildlet, postgres)" ;;
esac
printf "$passwd" > "$root/etc/passwd"
printf "$group" > "$root/etc/group"

say "importing $(du -sh "$root" | cut -f1) as $tag"
if [ -n "$entry" ]; then
  tar -C "$root" -c . | docker import --change "ENV PATH=$image_path" --change 'ENV TZ=UTC' \
    --change "CMD [\"$entry\"]" --change "LABEL buildfarm.chaos=$kind" - "$tag" >/dev/null
else
  tar -C "$root" -c . | docker import --change "ENV PATH=$image_path" --change 'ENV TZ=UTC' \
    --change "LABEL buildfarm.chaos=$kind" - "$tag" >/dev/null
fi
say "built $tag"

#!/usr/bin/env bash
# Builds the Debian package ssock_VERSION_ARCH.deb from files already built
# (`make deb` builds them first), without debhelper: `make install
# PREFIX=/usr` into a staging tree, then dpkg-deb --build.
#
#   packaging/build-deb.sh [OUTDIR]      (default OUTDIR: CARGO_TARGET_DIR/debian)
#
# Environment: PROFILE (release by default) and CARGO_TARGET_DIR or
# BUILD_DIR, as for `make install`; DEB_MAINTAINER (the control file's
# Maintainer). Prints the package's path as its last line.
#
# Layout: /usr/bin/{devd,ssock-run,ringstat,ssock-bench,ssock-ivshmem-server},
# /usr/lib/ssock/libssock.so, /usr/lib/systemd/system/ssock-devd.service,
# /etc/ssock/devd.toml (a conffile), /usr/share/doc/ssock/ (the docs, the
# example config, copyright, changelog.gz). Binaries are stripped of
# debugging information (symbols stay, for backtraces). Needs dpkg-deb and
# dpkg-shlibdeps (package dpkg-dev), make, strip.
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true

src="$(cd "$(dirname "$0")/.." && pwd)"
export PROFILE="${PROFILE:-release}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$src/target}"
out="${1:-$CARGO_TARGET_DIR/debian}"
maintainer="${DEB_MAINTAINER:-ssock maintainers <ssock-maintainers@localhost.invalid>}"

# [workspace.package] version = "X" in the workspace's Cargo.toml.
version="$(awk '
  /^\[/ { in_pkg = ($0 == "[workspace.package]") }
  in_pkg && /^version *=/ { gsub(/^version *= *"|".*$/, ""); print; exit }
' "$src/Cargo.toml")"
[ -n "$version" ] || { echo "build-deb: no [workspace.package] version in $src/Cargo.toml" >&2; exit 1; }
arch="$(dpkg --print-architecture)"

work="$(mktemp -d "${TMPDIR:-/tmp}/ssock-deb.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# dpkg-shlibdeps wants debian/control and the files under debian/PACKAGE.
root="$work/debian/ssock"
mkdir -p "$root/DEBIAN"
printf 'Source: ssock\n\nPackage: ssock\nArchitecture: any\n' > "$work/debian/control"

make --no-print-directory -C "$src" install DESTDIR="$root" PREFIX=/usr SYSCONFDIR=/etc \
  UNITDIR=/usr/lib/systemd/system ${BUILD_DIR:+BUILD_DIR="$BUILD_DIR"} >&2

bins=("$root"/usr/bin/{devd,ssock-run,ringstat,ssock-bench,ssock-ivshmem-server} "$root/usr/lib/ssock/libssock.so")
strip --strip-debug "${bins[@]}"

doc="$root/usr/share/doc/ssock"
cat > "$doc/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: ssock

Files: *
Copyright: the ssock authors
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF
# A native package's changelog: this build's source commit.
if commit="$(git -C "$src" rev-parse --short=12 HEAD 2>/dev/null)"; then
  when="$(git -C "$src" log -1 --format=%cD HEAD)"
  [ -z "$(git -C "$src" status --porcelain --untracked-files=no 2>/dev/null)" ] || commit="$commit (with uncommitted changes)"
else
  commit="an unknown commit (not a git checkout)"
  when="$(date -R)"
fi
printf 'ssock (%s) unstable; urgency=medium\n\n  * Built from the ssock repository, commit %s.\n\n -- %s  %s\n' \
  "$version" "$commit" "$maintainer" "$when" | gzip -9n > "$doc/changelog.gz"
chmod 0644 "$doc/copyright" "$doc/changelog.gz"

# Depends: the shared libraries the binaries need (libc6, libgcc-s1), and
# adduser, which postinst uses to make the ssock user.
depends="$(cd "$work" && dpkg-shlibdeps -O "${bins[@]/#/-e}" | sed -n 's/^shlibs:Depends=//p')"
[ -n "$depends" ] || { echo "build-deb: dpkg-shlibdeps found no dependencies" >&2; exit 1; }
depends="$depends, adduser"

(cd "$root" && find etc usr -type f -print0 | sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
(cd "$root" && find etc -type f -printf '/%p\n' | sort) > "$root/DEBIAN/conffiles"
size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
# A value as a sed replacement: \, & and the delimiter | escaped.
esc() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }
sed -e "s|@VERSION@|$(esc "$version")|" -e "s|@ARCH@|$(esc "$arch")|" \
  -e "s|@MAINTAINER@|$(esc "$maintainer")|" -e "s|@INSTALLED_SIZE@|$size|" \
  -e "s|@DEPENDS@|$(esc "$depends")|" "$src/packaging/deb/control.in" > "$root/DEBIAN/control"
install -m 0755 "$src"/packaging/deb/{postinst,prerm,postrm} "$root/DEBIAN/"
chmod 0644 "$root"/DEBIAN/{control,md5sums,conffiles}
# Directories as dpkg expects them, whatever the umask.
find "$root" -type d -exec chmod 0755 {} +

mkdir -p "$out"
deb="$out/ssock_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$root" "$deb" >&2
echo "$deb"

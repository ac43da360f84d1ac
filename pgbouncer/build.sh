#!/usr/bin/env bash
# Builds PgBouncer 1.24.1 from Debian's source into .cache/pgbouncer (make pgbouncer).
#
# Why: DATABASE_POOL_MODE=pgbouncer-prepared needs PgBouncer >= 1.21 (max_prepared_statements),
# which is what the chart and k8s/base run (1.25), but Debian 12 packages 1.18 and PyPI has none.
# Debian 13's source package is the nearest trustworthy source this machine can reach; its
# tarball is pinned by SHA-256. The tests and `make bench` use the result for the PgBouncer that
# tracks prepared statements; Debian's 1.18 stays the one for pgbouncer-transaction mode.
#
# Needs a C compiler, make, pkg-config and the libevent, OpenSSL and c-ares headers
# (.ci/run installs them). Idempotent: an existing build of this version is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

version=1.24.1
sha256=da72a3aba13072876d055a3e58dd4aba4a5de4ed6148e73033185245598fd3e0
url="https://deb.debian.org/debian/pool/main/p/pgbouncer/pgbouncer_${version}.orig.tar.gz"
prefix="$PWD/.cache/pgbouncer"
binary="$prefix/bin/pgbouncer"

if [[ -x "$binary" ]] && "$binary" --version 2>/dev/null | grep -q "^PgBouncer ${version}$"; then
  echo "pgbouncer: $binary is ${version} already"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
curl --fail --silent --show-error --location --retry 3 --output "$work/src.tar.gz" "$url"
echo "${sha256}  $work/src.tar.gz" | sha256sum --check --quiet
tar -xzf "$work/src.tar.gz" -C "$work"
(
  cd "$work/pgbouncer-${version}"
  ./configure --prefix="$prefix" --without-systemd --with-cares >"$work/configure.log" 2>&1 ||
    { tail -n 30 "$work/configure.log"; exit 1; }
  make -j"$(nproc)" >"$work/make.log" 2>&1 || { tail -n 30 "$work/make.log"; exit 1; }
  rm -rf "$prefix"
  make install >"$work/install.log" 2>&1 || { tail -n 30 "$work/install.log"; exit 1; }
)
# PgBouncer refuses to run as root, so the tests start it as a system user: let it in.
chmod -R a+rX "$prefix"
"$binary" --version | head -n 1

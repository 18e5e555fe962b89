#!/usr/bin/env bash
# Builds the Debian package: target/debian/turnpike_<version>-1_<arch>.deb (metadata in Cargo.toml,
# [package.metadata.deb]). The man page is generated here, at package time, from the clap definitions
# (`turnpike man`). Needs cargo-deb (`cargo install cargo-deb --locked`).
#
# Usage: scripts/deb/build.sh [cargo-deb options, e.g. --output DIR]
# PROFILE=dev builds from the debug binary (the tests do, to avoid a release build);
# NO_BUILD=1 packages what is already built.
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=${PROFILE:-release}
case "$profile" in
  dev) dir=debug ;;
  *) dir=$profile ;;
esac
target=${CARGO_TARGET_DIR:-target}

if [ -z "${NO_BUILD:-}" ]; then
  cargo build --locked --profile "$profile" --bin turnpike
fi
mkdir -p target/man
"$target/$dir/turnpike" man >target/man/turnpike.1
# A stripped binary in the package (the release profile keeps debug info for perf): its symbols go to a
# separate turnpike-dbgsym .ddeb beside it, for crash analysis.
debug=()
[ "$profile" = release ] && debug=(--dbgsym)
exec cargo deb --locked --no-build --profile "$profile" "${debug[@]}" "$@"

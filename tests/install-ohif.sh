#!/usr/bin/env bash
# Fetches OHIF Viewer's prebuilt web app (npm package @ohif/app, its dist/) for
# tests/test_viewer_ohif.py into a cache folder outside git. Idempotent: once the pinned
# version is unpacked it does nothing (and needs no network); tests/install-system-deps.sh
# runs it on every `make test`. The tarball is checked by npm against the registry and here
# against the pinned SHA-512, so a changed upload cannot slip in.
set -euo pipefail

version=3.13.2
integrity="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
# Same folder as tests/web_helpers.py's ohif_dist().
dest="${HEADSCREEN_OHIF_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/headscreen-test/ohif-$version}"

if [ -f "$dest/.complete" ] && [ -f "$dest/dist/index.html" ]; then
  exit 0
fi

if ! command -v npm >/dev/null; then
  echo "installing Debian package: npm"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq npm >/dev/null
fi

echo "fetching @ohif/app@$version (50 MB) into $dest"
mkdir -p "$(dirname "$dest")"
work=$(mktemp -d "$(dirname "$dest")/.ohif-download.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@ohif/app@$version" >/dev/null)
tarball="$work/ohif-app-$version.tgz"
actual="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
if [ "$actual" != "$integrity" ]; then
  echo "@ohif/app@$version: SHA-512 $actual, expected $integrity" >&2
  exit 1
fi
mkdir "$work/unpacked"
tar -xzf "$tarball" -C "$work/unpacked" package/dist package/LICENSE
touch "$work/unpacked/package/.complete"
rm -rf "$dest"
mv "$work/unpacked/package" "$dest"
echo "OHIF Viewer $version ready in $dest"

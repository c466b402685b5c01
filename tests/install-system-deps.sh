#!/usr/bin/env bash
# Installs the Debian tools the tests and the demo use, and makes sure a local
# PostgreSQL answers on 127.0.0.1:5432. Idempotent; safe to run on every `make`.
set -euo pipefail

packages=(dcmtk orthanc orthanc-dicomweb dicom3tools mricron-data postgresql chromium chromium-driver)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The Debian orthanc package starts a system service on 4242/8042; tests run
# their own Orthanc on free ports, so the packaged one is not needed.
if command -v service >/dev/null && pgrep -x Orthanc >/dev/null 2>&1 && [ -f /etc/init.d/orthanc ]; then
  service orthanc stop >/dev/null 2>&1 || true
fi

if [ "${HEADSCREEN_SKIP_POSTGRES:-0}" != "1" ]; then
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    cluster=$(ls /etc/postgresql | sort -V | tail -n 1)
    pg_ctlcluster --skip-systemctl-redirect "$cluster" main start || pg_ctlcluster "$cluster" main start
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
  pg_isready -h 127.0.0.1 -p 5432
fi

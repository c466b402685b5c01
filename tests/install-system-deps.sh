#!/usr/bin/env bash
# Installs the Debian tools the tests and the demo use, and makes sure a local
# PostgreSQL answers on 127.0.0.1:5432. Idempotent; safe to run on every `make`.
set -euo pipefail

# insighttoolkit5-examples carries the real whole-head T1 (and its brain mask) that the
# real-scan tests and benchmarks use; libpixelmed-java the SR template validator; openssl makes
# the DICOM TLS tests' certificates; systemd brings systemd-analyze for the unit file's check;
# iproute2 the network namespaces of tests/test_multi_machine.py (ip netns, veth, bridge).
packages=(dcmtk orthanc orthanc-dicomweb dicom3tools mricron-data insighttoolkit5-examples libpixelmed-java
          postgresql chromium chromium-driver openssl systemd iproute2)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # policy-rc.d exit 101 keeps the packages' maintainer scripts from starting services
  # (Debian's orthanc would start one on 4242/8042). Only a file we created is removed,
  # and no running service is ever stopped: tests start their own peers on free ports.
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    created_policy=1
  fi
  status=0
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null || status=$?
  [ "$created_policy" = 1 ] && $SUDO rm -f "$policy"
  [ "$status" = 0 ] || exit "$status"
fi

# OHIF Viewer's prebuilt web app for tests/test_viewer_ohif.py: cached outside git, fetched
# with npm only when absent.
bash "$(dirname "${BASH_SOURCE[0]}")/install-ohif.sh"

if [ "${HEADSCREEN_SKIP_POSTGRES:-0}" != "1" ]; then
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    cluster=$(ls /etc/postgresql | sort -V | tail -n 1)
    pg_ctlcluster --skip-systemctl-redirect "$cluster" main start || pg_ctlcluster "$cluster" main start
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
  pg_isready -h 127.0.0.1 -p 5432
fi

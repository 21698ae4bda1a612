#!/usr/bin/env bash
# Sets up everything the node needs in .venv at the repository root (idempotent).
#   deploy/install.sh          the node
#   deploy/install.sh --test   the node, the test tools, and (when root) the Debian peers the tests use
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
[[ "${1:-}" == "--test" ]] && with_tests=1

debian_test_packages=(dicom3tools dcmtk libgdcm-tools orthanc orthanc-gdcm chromium chromium-driver)
if [[ $with_tests == 1 ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        missing=()
        for pkg in "${debian_test_packages[@]}"; do
            dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
        done
        if (( ${#missing[@]} )); then
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        fi
    elif ! command -v dciodvfy >/dev/null || ! command -v storescu >/dev/null || ! command -v gdcmconv >/dev/null; then
        echo "note: the tests need Debian packages ${debian_test_packages[*]}; run as root or: sudo apt-get install ${debian_test_packages[*]}" >&2
    fi
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: Python 3.11 or newer is needed ($python is $("$python" --version 2>&1))" >&2
    exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
    if ! "$python" -c 'import ensurepip, venv' 2>/dev/null && [[ $(id -u) == 0 ]]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    "$python" -m venv .venv
fi
# torch first and pinned, so that pip takes the local build instead of fetching another one.
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
if [[ $with_tests == 1 ]]; then
    .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
else
    .venv/bin/pip install -q --disable-pip-version-check -e .
fi
.venv/bin/python -c "import dicom_node.cli, torch, bm3d, pynetdicom"

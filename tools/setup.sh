#!/usr/bin/env bash
# Install what xdpflow needs on a fresh Debian/Ubuntu machine, then build .venv.
# Idempotent: each step checks before it installs. Needs root for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(python3-bpfcc linux-headers-amd64 netsniff-ng nfdump tshark pmacct softflowd iproute2 libcap2-bin gcc libc6-dev
      python3-dev dnsmasq-base)
case "$(uname -m)" in
  aarch64) PKGS[1]=linux-headers-arm64 ;;
esac
if grep -qi ubuntu /etc/os-release 2>/dev/null; then PKGS[1]=linux-headers-generic; fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages ${missing[*]}; run as root (or apt-get install them)" >&2
    exit 1
  fi
  echo "setup: installing Debian packages ${missing[*]} (apt; a few minutes the first time)"
  export DEBIAN_FRONTEND=noninteractive
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating the virtual environment .venv ($("$PY" --version 2>&1))"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
fi
stamp=.venv/.xdpflow-deps
# The compiled core (exporter/_core.c) is built by the same install: again when its source changes.
# No glob match on a clean clone: `ls` exits 2, which pipefail would turn into a failed setup.
core_built=$(compgen -G 'exporter/_core*.so' | head -n 1 || true)
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
   || [ -z "$core_built" ] || [ exporter/_core.c -nt "$core_built" ]; then
  echo "setup: installing xdpflow, its compiled core and its Python packages into .venv (pip; a minute or two the first time)"
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -q -e '.[dev]' >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; echo "setup: pip install failed" >&2; exit 1
  fi
  rm -f "$log"
  touch "$stamp"
fi

# bcc lives in Debian's dist-packages (it is not on PyPI). Link just that one
# package into the venv instead of exposing all of Debian's site-packages.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
bcc_dir=$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(bcc.__file__))' 2>/dev/null || true)
[ -n "$bcc_dir" ] || bcc_dir=/usr/lib/python3/dist-packages/bcc
if [ ! -d "$bcc_dir" ]; then
  echo "setup: bcc Python package not found; apt-get install python3-bpfcc" >&2
  exit 1
fi
ln -sfn "$bcc_dir" "$site/bcc"
.venv/bin/python -c 'import bcc' || { echo "setup: bcc does not import in .venv" >&2; exit 1; }

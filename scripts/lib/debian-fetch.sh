# shellcheck shell=bash
# Sourced, not run: fetches pinned Debian binary packages without installing them.
#
# One place for what scripts/build-qemu.sh (firmware), scripts/fetch-ovmf.sh and
# scripts/nested-rig.sh all need: `apt-get download` through a PRIVATE apt
# configuration (own sources.list, lists, cache and dpkg status under one build/
# directory; the system's apt configuration and package state are never touched),
# a pin that falls back to the newest served version when Debian drops it. The
# callers unpack with `dpkg-deb` (what they take out differs) and keep their own
# messages (e.g. NESTED-FALLBACK:, the fetch-ovmf WARNING block), cache stamps and
# error handling (die vs. NESTED-CANNOT-RUN): every function here reports failure
# by its return code and leaves the wording to the caller.
#
#   debfetch_init DIR SOURCE...     write DIR's private apt config and set DEBFETCH_APTOPTS
#                                   (no network). SOURCE is a suite ("bookworm": main of
#                                   deb.debian.org/debian) or "URL SUITE".
#   debfetch_update                 apt-get update of DIR's lists (the network part).
#   debfetch_served PKG [SUITE...]  the served versions of PKG, newest first (only those from
#                                   the SUITEs, if given).
#   debfetch_pick PKG PIN [SUITE...]  PIN if it is served, else the newest served version
#                                   (empty: none). The caller warns when the result != PIN.
#   debfetch_download DEST PKG=VER  download into DEST unless DEST already holds that .deb
#                                   (cached by file name), print the .deb's path. Returns 1 if
#                                   apt-get download failed, 2 if it left no such .deb.
#   debfetch_stamp_is FILE TEXT     the cache stamp FILE holds exactly TEXT.

DEBFETCH_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

debfetch_init() {
    local dir=$1 src url suite
    shift
    DEBFETCH_DIR=$dir
    mkdir -p "$dir/etc" "$dir/lists/partial" "$dir/cache/archives/partial"
    for src in "$@"; do
        case "$src" in
            *" "*) url=${src% *} suite=${src##* } ;;
            *) url=http://deb.debian.org/debian suite=$src ;;
        esac
        echo "deb [signed-by=$DEBFETCH_KEYRING] $url $suite main"
    done > "$dir/etc/sources.list"
    touch "$dir/status"
    DEBFETCH_APTOPTS=(-o "Dir::Etc::SourceList=$dir/etc/sources.list"
                      -o "Dir::Etc::SourceParts=$dir/etc/none"
                      -o "Dir::State::Lists=$dir/lists"
                      -o "Dir::State::status=$dir/status"
                      -o "Dir::Cache=$dir/cache"
                      -o "APT::Sandbox::User=root"
                      -o "Acquire::Retries=3")
}

debfetch_update() {
    apt-get "${DEBFETCH_APTOPTS[@]}" -qq update
}

debfetch_served() {
    local pkg=$1
    shift
    apt-cache "${DEBFETCH_APTOPTS[@]}" madison "$pkg" 2>/dev/null |
        while IFS='|' read -r _ v src; do
            v=$(echo "$v" | xargs); src=$(echo "$src" | xargs)
            if [ $# = 0 ]; then echo "$v"; continue; fi
            for s in "$@"; do
                case "$src" in *" $s/"*|*" $s "*) echo "$v"; break ;; esac
            done
        done
}

debfetch_pick() {
    local pkg=$1 pin=$2 served
    shift 2
    served=$(debfetch_served "$pkg" "$@")
    if grep -qxF -- "$pin" <<<"$served"; then echo "$pin"; else head -1 <<<"$served"; fi
}

debfetch_download() {
    local dest=$1 spec=$2 pkg=${2%%=*} ver=${2#*=} f
    mkdir -p "$dest"
    # apt writes an epoch's colon as %3a.
    f=$(ls "$dest/${pkg}_${ver/:/%3a}"_*.deb 2>/dev/null | head -1)
    if [ -z "$f" ]; then
        (cd "$dest" && apt-get "${DEBFETCH_APTOPTS[@]}" -qq download "$spec" >&2) || return 1
        f=$(ls "$dest/${pkg}_${ver/:/%3a}"_*.deb 2>/dev/null | head -1)
        [ -n "$f" ] || return 2
    fi
    echo "$f"
}

debfetch_stamp_is() {
    [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]
}

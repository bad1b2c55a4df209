#!/bin/sh
# Scenarios the nested rig runs inside L1 (busybox sh; run by /init, or by hand from
# `make nested-shell`: `sh /l1.sh single`). Each scenario starts the patched QEMU with
# `-accel kvm -object pagenc` on the guest payload in hypercall mode (`hc`, guest/hypercall.S),
# drives it over QMP with /bin/qmpc, and writes what the host-side test asserts on to fd 3
# (ttyS1) as "=== BEGIN <name>" ... "=== END <name>" sections. Every wait is bounded.
#
#   single    boot sequence + churn, the list against the guest's own model; then a guest
#             reset while paused (list and readiness cleared) and the same again
#   negctl    `hcwrong`: the payload expects a wrong value once; its tally must show it
#   migrate   live migration source -> destination (unix socket) while the guest converts
#             pages with VMMCALL; lists, memory, tallies, the resend trace
#   kvmtests  the library's own tests/kvm_guest.rs binary with PAGENC_HYPERCALL_EXITS=1
set -u
[ -e /proc/self/fd/3 ] || exec 3>/dev/null
say() { echo "[L1 $(cut -d' ' -f1 /proc/uptime)s] $*"; }
fail() { say "FAIL: $*"; echo "FAIL $*" >&3; exit 1; }
begin() { echo "=== BEGIN $1" >&3; }
end() { echo "=== END $1" >&3; }
# (the empty line ends a last line without a newline, e.g. of a guest stopped mid-line)
section() { local sec=$1; shift; begin "$sec"; "$@" >&3 2>&1; echo >&3; end "$sec"; }

MEM_MB=128
GUEST_RAM=$((MEM_MB << 20))
W=/tmp/w
# Series v2 refuses -object pagenc without an SEV guest unless x-testing=on (the payload is
# no SEV guest); v1 has no such property. Ask the binary, so the rig works with either.
PAGENC_OPTS=
if qemu-system-x86_64 -object pagenc,help 2>/dev/null | grep -q x-testing; then
    PAGENC_OPTS=,x-testing=on
fi

# qemu NAME APPEND [ARGS...]: the patched QEMU on /payload.elf, in the background.
qemu() {
    local name=$1 append=$2 i
    shift 2
    rm -f $W/$name.qmp $W/$name.dbg
    qemu-system-x86_64 -accel kvm -M q35 -m $MEM_MB -smp 1 -nodefaults -display none \
        -L /fw -kernel /payload.elf -append "$append" \
        -object pagenc,id=pe0$PAGENC_OPTS -qmp unix:$W/$name.qmp,server=on,wait=off \
        -debugcon file:$W/$name.dbg "$@" >$W/$name.log 2>&1 &
    echo $! > $W/$name.pid
    i=0
    while [ ! -S $W/$name.qmp ]; do
        i=$((i + 1))
        [ $i -le 300 ] || fail "$name: no QMP socket after 30 s: $(cat $W/$name.log)"
        kill -0 "$(cat $W/$name.pid)" 2>/dev/null || fail "$name: QEMU exited: $(cat $W/$name.log)"
        usleep 100000
    done
}
q() { local vm=$1; shift; qmpc $W/$vm.qmp "$@"; }
hmp() { local vm=$1; shift; qmpc $W/$vm.qmp -h "$@"; }
quit() { q "$1" '{"execute":"quit"}' >/dev/null 2>&1; sleep 1; kill -9 "$(cat $W/$1.pid)" 2>/dev/null; true; }

# The payload's tally at 0x7000 (guest/payload.S), as "name=value" words (decimal).
tally() {
    hmp "$1" "xp /12wx 0x7000" | tr -s ' ' '\n' | grep '^0x' | {
        for k in pass checks mismatches vmmcalls conversions stage model model_pages \
                 inflight if_gpa if_npages if_attrs; do
            read -r v || break
            printf '%s=%d ' "$k" "$v"
        done
        echo
    }
}
tally_get() { tally "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }

# wait_dbg NAME PATTERN COUNT SECONDS: until the guest's debug console has COUNT such lines.
wait_dbg() {
    local i=0 c
    while :; do
        c=$(grep -c "$2" $W/$1.dbg 2>/dev/null)
        [ "${c:-0}" -lt "$3" ] || break
        i=$((i + 1))
        if [ $i -gt $(($4 * 5)) ]; then
            say "$1 debug console:"; tail -20 $W/$1.dbg
            fail "$1: '$2' x$3 not seen on the guest's debug console within $4 s"
        fi
        grep -q 'unexpected exception' $W/$1.dbg 2>/dev/null && fail "$1: guest: $(tail -2 $W/$1.dbg)"
        usleep 200000
    done
}

# wait_conv NAME N SECONDS: until the guest has made N churn conversions.
wait_conv() {
    local i=0 c
    while :; do
        c=$(tally_get "$1" conversions)
        [ "${c:-0}" -lt "$2" ] || break
        i=$((i + 1))
        [ $i -le $(($3 * 2)) ] || fail "$1: fewer than $2 conversions after $3 s: $(tally "$1")"
        usleep 500000
    done
}

# The guest's model bitmap (address and size from its tally), as hex lines.
model_hex() {
    local addr pages
    addr=$(tally_get "$1" model) pages=$(tally_get "$1" model_pages)
    rm -f $W/$1.model
    q "$1" "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":$addr,\"size\":$((pages / 8)),\"filename\":\"$W/$1.model\"}}" >/dev/null
    hexdump -v -e '64/1 "%02x" "\n"' $W/$1.model
}

# What one stopped guest looks like: pagenc's view, the guest's tally and model.
snapshot() {
    section "$2-info" hmp "$1" "info pagenc"
    section "$2-tally" tally "$1"
    section "$2-model" model_hex "$1"
}

wait_status() {
    local i=0
    while ! q "$1" '{"execute":"query-status"}' | grep -q "\"status\": *\"$2\""; do
        i=$((i + 1))
        [ $i -le $(($3 * 5)) ] || fail "$1: not $2 after $3 s: $(q "$1" '{"execute":"query-status"}')"
        usleep 200000
    done
}

scenario_single() {
    qemu src "hc mb=8" -D $W/src.trace -trace pagenc_hc_map_gpa_range
    wait_dbg src "hc boot sequence done" 1 60
    say "single: boot sequence done: $(tally src)"
    wait_conv src 300 120
    q src '{"execute":"stop"}' >/dev/null
    say "single: stopped: $(tally src)"
    snapshot src single
    section single-exits grep -c pagenc_hc_map_gpa_range $W/src.trace

    # Reset while paused: pagenc must drop the list and readiness before the guest runs again.
    q src '{"execute":"system_reset"}' >/dev/null
    i=0
    while ! hmp src "info pagenc" | grep -q 'guest not ready'; do
        i=$((i + 1)); [ $i -le 50 ] || break; usleep 200000
    done
    section reset-info hmp src "info pagenc"
    q src '{"execute":"cont"}' >/dev/null
    wait_dbg src "hc boot sequence done" 2 60
    wait_conv src 100 120
    q src '{"execute":"stop"}' >/dev/null
    say "single: after reset: $(tally src)"
    snapshot src reboot
    section single-dbg cat $W/src.dbg
    quit src
}

scenario_negctl() {
    qemu neg "hcwrong mb=8"
    wait_dbg neg "hc boot sequence done" 1 60
    q neg '{"execute":"stop"}' >/dev/null
    section negctl-tally tally neg
    section negctl-dbg cat $W/neg.dbg
    quit neg
}

scenario_migrate() {
    qemu src "hc mb=8" -D $W/src.trace -trace pagenc_ram_page -trace pagenc_pages_changed
    qemu dst "hc mb=8" -incoming unix:$W/mig.sock -S
    wait_dbg src "hc boot sequence done" 1 60
    wait_conv src 50 60
    q src '{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"pause-before-switchover","state":true}]}}' >/dev/null
    # Slow at first, so that the guest converts hundreds of pages while RAM is being sent.
    q src '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":16777216,"downtime-limit":2000}}' >/dev/null
    conv0=$(tally_get src conversions)
    q src "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"unix:$W/mig.sock\"}}" >/dev/null
    say "migrate: started at conversion $conv0"
    released=0 i=0
    while :; do
        mi=$(q src '{"execute":"query-migrate"}')
        st=$(echo "$mi" | sed -n 's/.*"status": *"\([a-z-]*\)".*/\1/p')
        case "$st" in
            pre-switchover)
                conv1=$(tally_get src conversions)
                say "migrate: pre-switchover (source paused) at conversion $conv1"
                q src '{"execute":"migrate-continue","arguments":{"state":"pre-switchover"}}' >/dev/null ;;
            completed) break ;;
            failed|cancelled) fail "migration $st: $mi $(cat $W/src.log)" ;;
        esac
        syncs=$(echo "$mi" | sed -n 's/.*"dirty-sync-count": *\([0-9]*\).*/\1/p')
        if [ $released = 0 ] && [ "$st" = active ] &&
           [ $(($(tally_get src conversions) - conv0)) -ge 300 ] && [ "${syncs:-0}" -ge 3 ]; then
            say "migrate: $(($(tally_get src conversions) - conv0)) conversions, $syncs dirty syncs: bandwidth cap lifted"
            q src '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":8589934592}}' >/dev/null
            released=1
        fi
        i=$((i + 1))
        [ $i -le 1200 ] || { q src '{"execute":"migrate_cancel"}'; fail "migration still $st after 240 s"; }
        usleep 200000
    done
    section migrate-query q src '{"execute":"query-migrate"}'
    wait_status dst paused 30
    echo "conversions_before=$conv0 conversions_at_switchover=${conv1:-unknown}" > $W/conv
    section migrate-conversions cat $W/conv
    snapshot src src
    snapshot dst dst
    say "migrate: completed; comparing the guest RAM of both sides (pmemsave + cmp)"
    rm -f $W/src.mem $W/dst.mem
    q src "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":0,\"size\":$GUEST_RAM,\"filename\":\"$W/src.mem\"}}" >/dev/null
    q dst "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":0,\"size\":$GUEST_RAM,\"filename\":\"$W/dst.mem\"}}" >/dev/null
    section memory sh -c "ls -l $W/src.mem $W/dst.mem; cmp $W/src.mem $W/dst.mem && echo memory-equal"
    rm -f $W/src.mem $W/dst.mem
    say "migrate: the source's trace (resend check data)"
    # The source's trace, compacted to the churn region (96-104 MiB: pages only pagenc's change
    # callback dirties): S gpa enc (page sent) / C gpa npages enc (list changed), in log order.
    section trace-churn sh -c "grep -c pagenc_ram_page $W/src.trace; sed -n \
        -e 's/.*pagenc_ram_page .* gpa=\(0x6[0-7][0-9a-f]\{5\}\) encrypted=\([01]\).*/S \1 \2/p' \
        -e 's/.*pagenc_ram_page .* gpa=\(0x6[0-7][0-9a-f]\{5\}\) page=0.*/S \1 1/p' \
        -e 's/.*pagenc_ram_page .* gpa=\(0x6[0-7][0-9a-f]\{5\}\) page=1.*/S \1 0/p' \
        -e 's/.*pagenc_pages_changed .* gpa=\(0x6[0-7][0-9a-f]\{5\}\) npages=\(0x[0-9a-f]*\) encrypted=\([01]\).*/C \1 \2 \3/p' \
        $W/src.trace"
    # The guest goes on converting on the destination, through the destination's pagenc.
    say "migrate: destination resumes"
    q dst '{"execute":"cont"}' >/dev/null
    c=$(tally_get dst conversions)
    wait_conv dst $((c + 100)) 120
    q dst '{"execute":"stop"}' >/dev/null
    snapshot dst resumed
    section migrate-dbg sh -c "cat $W/src.dbg; echo '--- destination'; cat $W/dst.dbg"
    quit src
    quit dst
}

scenario_kvmtests() {
    section kvmtests sh -c 'PAGENC_REQUIRE_KVM=1 PAGENC_HYPERCALL_EXITS=1 timeout 120 /kvm_guest --test-threads=1 2>&1; echo "exit=$?"'
}

mkdir -p $W
case "${1:-}" in
    single|negctl|migrate|kvmtests) say "scenario $1"; "scenario_$1" ;;
    *) echo "usage: sh /l1.sh single|negctl|migrate|kvmtests" >&2; exit 2 ;;
esac

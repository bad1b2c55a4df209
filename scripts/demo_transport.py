"""The demo's second part: an encrypted-page migration through the simulated SEV firmware.

Called by scripts/demo.py after the list migration (stages 8-11); prints with its `say` and
`stage`.  Two QEMUs whose pagenc objects each hold a simulated SEV firmware with its own
memory key (a different one per side: keyed mode, tests/e2e/keyed.py), the
x-encrypted-pages capability on both, precopy with the return path (or multifd with
--channels N):

  8. source boots, gets the boot list and READY; the destination waits paused;
  9. migration: pages the list calls encrypted go through the firmware
     (SEND_UPDATE_DATA / RECEIVE_UPDATE_DATA), shared pages the ordinary way;
 10. the firmware calls each side made, and the pages each way;
 11. every guest-RAM page compared by the library's verifier: equal to the source where the
     list says shared, the source re-keyed where it says encrypted.

Returns True only if the migration completed and every page is as the list says.
"""

from __future__ import annotations

from pathlib import Path

import keyed
import scenario
from pagenc_vm import MiB, PagencApi, Vm, wait_until


def run(opts, work: Path, vms: list, say, stage) -> bool:
    channels = getattr(opts, "channels", 0)
    stage(8, "encrypted pages: two QEMUs with a simulated SEV firmware, a key per side")
    verifier = keyed.build_verifier()
    say(f"verifier  {verifier.relative_to(keyed.ROOT)} (pagenc::transport::Verifier)")
    src = Vm("tx-source", work, pagenc=False, mem_mb=opts.mem,
             extra_args=keyed.source_args())
    vms.append(src)
    src.launch()
    say(f"source    -object pagenc,...,x-sev-simulated-firmware=on,"
        f"x-sev-sim-memory-key={keyed.K_SRC[:8]}...")
    src.wait_guest_running(2)
    scenario.boot_list(src, [])
    info = src.pagenc_api.query()
    say(f"source    guest READY={PagencApi.ready(info)}; {info['shared-ranges']} shared ranges, "
        f"{info['shared-bytes'] // 4096} of {info['ram-bytes'] // 4096} pages shared")
    sock = work / "tx-mig.sock"
    dst = Vm("tx-destination", work, pagenc=False, mem_mb=opts.mem, paused=True,
             incoming=f"unix:{sock}", extra_args=keyed.destination_args())
    vms.append(dst)
    dst.launch()
    say(f"dest.     -incoming, -S, x-sev-sim-memory-key={keyed.K_DST[:8]}... "
        "(it stays paused: its RAM holds pages under its own key)")

    stage(9, "migrate with x-encrypted-pages + return-path"
          + (f" + multifd ({channels} channels)" if channels else ""))
    for vm in (src, dst):
        keyed.set_capabilities(vm, channels)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
    src.cmd("migrate", uri=f"unix:{sock}")
    mi = wait_until(lambda: (s := src.cmd("query-migrate"))["status"] in
                    ("completed", "failed", "cancelled") and s, 120, "the migration to end")
    say(f"migration {mi['status']} in {mi.get('total-time', 0)} ms, downtime "
        f"{mi.get('downtime', 0)} ms, {mi.get('ram', {}).get('transferred', 0) // MiB} MiB sent"
        + (f": {mi.get('error-desc')}" if mi["status"] != "completed" else ""))
    if mi["status"] != "completed":
        return False
    dst.wait_status("paused")

    stage(10, "firmware calls and pages, each side")
    s, d = keyed.transport_info(src), keyed.transport_info(dst)
    si = src.pagenc_api.query()
    say(f"source    SEND_START {s['send-start']}, SEND_UPDATE_DATA {s['send-update-data']}, "
        f"SEND_FINISH {s['send-finish']}, SEND_CANCEL {s['send-cancel']}; "
        f"guest may run: {s.get('guest-may-run')}")
    say(f"dest.     RECEIVE_START {d['receive-start']}, RECEIVE_UPDATE_DATA "
        f"{d['receive-update-data']}, RECEIVE_FINISH {d['receive-finish']}; "
        f"guest may run: {d.get('guest-may-run')}")
    say(f"pages     {si['pages-sent-encrypted']} sent through the firmware (encrypted), "
        f"{si['pages-sent-shared']} the ordinary way (shared, ROM, device RAM), "
        "counting re-sends")

    stage(11, "compare every guest-RAM page with the verifier")
    lists_ok = PagencApi.ranges(dst.pagenc_api.query()) == PagencApi.ranges(si)
    say(f"list      destination's shared ranges equal the source's: {lists_ok}")
    v = keyed.verify(src, dst, work)
    for line in str(v).splitlines()[:8]:
        say(f"verifier  {line.strip()}")
    ok = lists_ok and v.ok and v.encrypted_ok > 0 and v.shared_ok > 0
    say("keyed check: " + ("every page is as the list says (shared: equal; encrypted: "
                           "re-keyed)" if ok else "FAILED"))
    return ok

"""Init and the fate of processes at kexec: a unit is SIGKILLed, everything it
did not preserve is gone, and init starts it again on the new kernel."""

import json
import os
import socket
import sys

import trio

from luvmm.liveupdate.state import StateDir

SUPPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")

HERE = os.path.dirname(os.path.abspath(__file__))


async def next_report(listener) -> dict:
    conn, _ = await listener.accept()
    with conn:
        data = b""
        while not data.endswith(b"\n"):
            chunk = await conn.recv(4096)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


async def test_a_killed_process_loses_what_it_did_not_preserve(emulated_host):
    host, state = emulated_host.host, emulated_host.state
    report_path = os.path.join(state.path, "report.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(report_path)
    listener.listen(4)
    StateDir(state.path).write_unit("victim", [sys.executable, os.path.join(SUPPORT, "unit_process.py")],
                                    {"LUVMM_TEST_REPORT": report_path})
    with trio.fail_after(60):
        await trio.to_thread.run_sync(host.call, {"op": "unit-start", "name": "victim"})
        first = await next_report(listener)
        assert first["boot"] == "cold"
        before = host.call({"op": "status"})[0]
        assert before["kernel"]["vfio"][0]["bound"] and before["kernel"]["vfio"][0]["bus_master"]
        assert first["ram_inode"] in [m["inode"] for m in before["machine"]["memory"]]
        await trio.to_thread.run_sync(host.kexec)
        second = await next_report(listener)
    assert second["boot"] == "kexec" and second["generation"] == 2 and second["pid"] != first["pid"]
    assert not os.path.exists(f"/proc/{first['pid']}")  # SIGKILLed and reaped
    after = host.call({"op": "status"})[0]
    dev = after["kernel"]["vfio"][0]
    assert not dev["bound"] and not dev["bus_master"]  # the machine cleared Bus Master Enable
    assert after["machine"]["memory"] == [] and after["machine"]["domains"] == []  # pages and tables gone
    units = {u["name"]: u for u in after["units"]}
    assert units["victim"]["running"] and units["victim"]["starts"] == 2
    listener.close()

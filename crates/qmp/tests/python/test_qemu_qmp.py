#!/usr/bin/env python3
"""Drive the qmp crate's example server with the real `qemu.qmp` client and `qmp-shell`.

Usage (from the workspace root):

    python3 -m pip install qemu.qmp          # once (or inside a venv)
    cargo build -p qmp --example qmp_demo
    python3 crates/qmp/tests/python/test_qemu_qmp.py --bin target/debug/examples/qmp_demo

With CARGO_TARGET_DIR set, the binary is under $CARGO_TARGET_DIR/debug/examples/. Exits 0 when
every check passes; prints the failing check otherwise.
"""

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from qmp_testlib import TIMEOUT, Raw, disconnect_after_end, next_event

def wait_for_path(path, proc):
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.02)


def raw_abuse(path):
    """Garbage, a 10 MB string, a disconnect mid-request; the connection survives."""
    c = Raw(path)
    assert "QMP" in c.line()
    c.send(b'{"execute":"qmp_capabilities"}')
    assert c.line() == {"return": {}}
    c.send(b"\x00\xff\xfe garbage }}}")
    # One error each for the stray bytes, the bare word and the stray braces.
    for _ in range(3):
        err = c.line()
        assert err["error"]["class"] == "GenericError", err
        assert err["error"]["desc"].startswith("JSON parse error"), err
    c.send(b'{"execute":"query-status","id":"after-garbage"}')
    assert c.line()["id"] == "after-garbage"
    c.send(b'{"execute":"query-name","arguments":{"x":"' + b"a" * (10 << 20) + b'"}}')
    err = c.line()
    assert err["error"]["class"] == "GenericError", err
    assert "larger than" in err["error"]["desc"], err
    c.send(b'{"execute":"query-status","id":"after-big"}')
    reply = c.line()
    assert reply["id"] == "after-big" and "return" in reply, reply
    c.close()

    gone = Raw(path)
    gone.line()
    gone.send(b'{"execute":"qmp_capabilities"}{"execute":"query-sta')
    gone.close()


async def main_async(args, path):
    qmp = QMPClient("test")
    await qmp.connect(path)
    assert qmp.greeting is not None
    assert qmp.greeting.QMP.capabilities == [], qmp.greeting
    version = qmp.greeting.QMP.version
    qemu = version["qemu"]
    assert (qemu["major"], qemu["minor"], qemu["micro"]) == (7, 2, 0), qemu
    assert version["package"].startswith("enlighten "), version

    status = await qmp.execute("query-status")
    assert status == {"running": False, "singlestep": False, "status": "prelaunch"}, status
    names = {c["name"] for c in await qmp.execute("query-commands")}
    for n in ["qmp_capabilities", "query-commands", "query-version", "query-status",
              "query-name", "query-cpus-fast", "query-kvm", "stop", "cont", "system_reset",
              "quit", "inject-nmi"]:
        assert n in names, (n, names)
    assert (await qmp.execute("query-name")) == {"name": "demo"}
    assert (await qmp.execute("query-kvm")) == {"enabled": True, "present": True}
    cpus = await qmp.execute("query-cpus-fast")
    assert [c["cpu-index"] for c in cpus] == [0, 1], cpus
    assert cpus[1]["qom-path"] == "/machine/unattached/device[1]", cpus
    assert cpus[0]["target"] == "x86_64" and set(cpus[0]["props"]) >= {"core-id", "thread-id",
                                                                        "socket-id"}, cpus
    version = await qmp.execute("query-version")
    assert version["qemu"] == {"major": 7, "minor": 2, "micro": 0}, version

    await qmp.execute("cont")
    await next_event(qmp, "RESUME")
    assert (await qmp.execute("query-status"))["status"] == "running"
    await qmp.execute("stop")
    await next_event(qmp, "STOP")
    assert (await qmp.execute("query-status"))["status"] == "paused"
    await qmp.execute("cont")
    await next_event(qmp, "RESUME")
    await qmp.execute("system_reset")
    reset = await next_event(qmp, "RESET")
    assert reset["data"] == {"guest": False, "reason": "host-qmp-system-reset"}, reset

    try:
        await qmp.execute("no-such-command")
        raise AssertionError("no error for an unknown command")
    except ExecuteError as e:
        assert e.error_class == "CommandNotFound", e
        assert "The command no-such-command has not been found" in str(e), e

    # Abuse on other connections leaves this one working.
    await asyncio.get_running_loop().run_in_executor(None, raw_abuse, path)
    assert (await qmp.execute("query-status"))["status"] == "running"

    # A second library client at the same time, synchronous legacy API.
    # (It runs its own event loop, so it gets a thread of its own.)
    def legacy_client():
        legacy = QEMUMonitorProtocol(path)
        legacy.connect(negotiate=True)
        try:
            return legacy.cmd("query-status")["status"]
        finally:
            legacy.close()

    status = await asyncio.get_running_loop().run_in_executor(None, legacy_client)
    assert status == "running", status

    # qmp-shell against the same socket.
    shell = args.qmp_shell or shutil.which("qmp-shell") or os.path.join(
        os.path.dirname(sys.executable), "qmp-shell")
    out = subprocess.run([shell, path], input="query-status\n", capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out
    assert '"status": "running"' in out.stdout, out.stdout

    # The Hyper-V crash sequence: GUEST_PANICKED with the five values in order, STOP, SHUTDOWN.
    params = {"arg1": 0xD1, "arg2": 0x10, "arg3": 2, "arg4": 0, "arg5": 0xFFFFF80012345678}
    await qmp.execute("x-demo-guest-panic", params)
    panic = await next_event(qmp, "GUEST_PANICKED")
    assert panic["data"] == {"action": "poweroff", "info": {"type": "hyper-v", **params}}, panic
    await next_event(qmp, "STOP")
    shutdown = await next_event(qmp, "SHUTDOWN")
    assert shutdown["data"] == {"guest": True, "reason": "guest-panic"}, shutdown
    assert (await qmp.execute("query-status"))["status"] == "guest-panicked"

    await qmp.execute("quit")
    shutdown = await next_event(qmp, "SHUTDOWN")
    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}, shutdown
    await disconnect_after_end(qmp)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", required=True, help="path to the qmp_demo example binary")
    parser.add_argument("--qmp-shell", help="path to qmp-shell (default: from PATH/venv)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "demo.qmp")
        proc = subprocess.Popen([args.bin, "-S", "-name", "demo", "-smp", "2",
                                 "-chardev", f"socket,id=mon0,path={path},server=on,wait=off",
                                 "-mon", "chardev=mon0,mode=control"])
        try:
            wait_for_path(path, proc)
            mode = os.stat(path).st_mode & 0o777
            assert mode == 0o600, oct(mode)
            asyncio.run(main_async(args, path))
            proc.wait(timeout=TIMEOUT)
            assert proc.returncode == 0, proc.returncode
            assert not os.path.exists(path), "socket not removed at exit"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print("qemu.qmp test: all checks passed")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Drive a real enlighten VM with QEMU's own QMP client (`qemu.qmp`) and `qmp-shell`.

Usage (from the workspace root; `scripts/setup` installs qemu.qmp==0.0.6):

    python3 crates/enlighten/tests/python/test_enlighten_qmp.py SCENARIO \\
        --bin target/debug/enlighten --kernel <qmp_idle.elf>

The guest is `guests/tests/qmp_idle.c`: it prints "qmp_idle: boot", then "qmp_idle: tick N" every
~100 ms while it runs, and reports NMIs, so the script can tell from the serial output whether the
vCPUs run. Scenarios (each a few seconds):

  control   -S/prelaunch, the queries, stop/cont/system_reset with STOP/RESUME/RESET, inject-nmi,
            reset while paused (prelaunch), qmp-shell, quit (SHUTDOWN, exit 0, socket removed)
  abuse     garbage, a 10 MB JSON string, unknown commands, commands before negotiation and a
            disconnect mid-request, while the guest keeps running and another client is unaffected
  panic-shutdown | panic-pause | panic-none | panic-exit-failure
            a guest writing the Hyper-V crash MSRs: GUEST_PANICKED with the five values in order,
            then what -action panic=... asks for
  guest-reset         a guest triple fault: RESET guest-reset, the guest boots again
  no-reboot           --no-reboot: a guest triple fault and system_reset become SHUTDOWN; exit 0
  poweroff            the guest powers off: SHUTDOWN guest-shutdown; exit 0
  tcp                 -qmp tcp:127.0.0.1:PORT,server=on,wait=off: stop (STOP), quit
  wait                -qmp unix:PATH,server=on (wait): the guest starts only once a client connects
  sigterm | sigint    the signal ends the VM with SHUTDOWN host-signal; exit 0, socket removed

Exits 0 when every check passes; otherwise prints the failing check (and the VM's output).
"""

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from qemu.qmp import ExecuteError, QMPClient

# The helpers shared with the qmp crate's own client test.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "qmp", "tests",
                                "python"))
from qmp_testlib import TIMEOUT, Raw, disconnect_after_end, next_event  # noqa: E402

class Vm:
    """An enlighten process with its serial output collected line by line."""

    def __init__(self, args, extra, tmp, transport="qmp"):
        self.path = os.path.join(tmp, "vm.qmp")
        self.address = self.path
        if transport == "tcp":
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            self.address = ("127.0.0.1", port)
            qmp_opts = ["-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"]
        elif transport == "wait":
            qmp_opts = ["-qmp", f"unix:{self.path},server=on"]
        elif transport == "qmp":
            qmp_opts = ["-qmp", f"unix:{self.path},server=on,wait=off"]
        elif transport == "qmp-legacy":
            qmp_opts = ["-qmp", f"unix:{self.path},server,nowait"]
        elif transport == "chardev":
            qmp_opts = ["-chardev", f"socket,id=mon0,path={self.path},server=on,wait=off",
                        "-mon", "chardev=mon0,mode=control"]
        else:
            raise ValueError(transport)
        self.cmd = [args.bin, "-kernel", args.kernel, "-nodefaults", "-serial", "stdio"] + \
            qmp_opts + extra
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, errors="replace")
        self.lines = []
        self.err_lines = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.err_lines),
                         daemon=True).start()
        deadline = time.monotonic() + TIMEOUT
        while not self._listening():
            if self.proc.poll() is not None:
                raise AssertionError(f"enlighten exited early with {self.proc.returncode}: "
                                     f"{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.path} did not appear")
            time.sleep(0.02)

    def _listening(self):
        if isinstance(self.address, str):
            return os.path.exists(self.address)
        try:
            # A probe client: it is greeted and then goes away, as any client may.
            with socket.create_connection(self.address, timeout=1):
                return True
        except OSError:
            return False

    def _read(self, stream, into):
        for line in stream:
            with self.lock:
                into.append(line.rstrip("\n"))

    def output(self):
        with self.lock:
            return "\n--- stdout ---\n" + "\n".join(self.lines[-40:]) + \
                "\n--- stderr ---\n" + "\n".join(self.err_lines[-40:])

    def count(self, pattern):
        with self.lock:
            return sum(1 for l in self.lines if re.search(pattern, l))

    def last_tick(self):
        with self.lock:
            ticks = [int(m.group(1)) for l in self.lines
                     if (m := re.match(r"qmp_idle: tick (\d+)", l))]
        return ticks[-1] if ticks else None

    def wait_line(self, pattern, count=1, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while self.count(pattern) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count}x '{pattern}' on serial{self.output()}")
            if self.proc.poll() is not None and self.count(pattern) < count:
                time.sleep(0.2)
                if self.count(pattern) < count:
                    raise AssertionError(f"VM exited ({self.proc.returncode}) before '{pattern}'"
                                         f"{self.output()}")
            time.sleep(0.02)

    def assert_runs(self):
        """The guest's tick counter advances."""
        before = self.count(r"qmp_idle: tick")
        self.wait_line(r"qmp_idle: tick", before + 2)

    def assert_stopped(self, seconds=0.6):
        """No guest output for a while (after letting output already on its way arrive)."""
        time.sleep(0.2)
        with self.lock:
            before = len(self.lines)
        time.sleep(seconds)
        with self.lock:
            new = self.lines[before:]
        assert not new, f"the guest printed while stopped: {new}"

    def wait_exit(self, status=0):
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"enlighten did not exit{self.output()}")
        time.sleep(0.1)
        assert self.proc.returncode == status, \
            f"exit status {self.proc.returncode}, expected {status}{self.output()}"
        assert not os.path.exists(self.path), "socket not removed at exit"

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def no_pending_events(client):
    assert client.events.empty(), "unexpected pending event"


async def connect(vm, name="test"):
    qmp = QMPClient(name)
    await qmp.connect(vm.address)
    return qmp


async def status(qmp):
    return (await qmp.execute("query-status"))["status"]


# ---------------------------------------------------------------------------------------------
# control


async def control(args, vm):
    mode = os.stat(vm.path).st_mode & 0o777
    assert mode == 0o600, f"socket mode {oct(mode)}"
    qmp = await connect(vm)
    qemu = qmp.greeting.QMP.version["qemu"]
    assert (qemu["major"], qemu["minor"], qemu["micro"]) == (7, 2, 0), qemu
    assert qmp.greeting.QMP.version["package"].startswith("enlighten "), qmp.greeting

    # -S: nothing ran yet.
    assert await qmp.execute("query-status") == \
        {"running": False, "singlestep": False, "status": "prelaunch"}
    assert vm.count(r"qmp_idle: boot") == 0, "the guest ran before cont" + vm.output()
    names = {c["name"] for c in await qmp.execute("query-commands")}
    for n in ["qmp_capabilities", "query-commands", "query-version", "query-status",
              "query-name", "query-cpus-fast", "query-kvm", "query-hyperv", "stop", "cont",
              "system_reset", "system_powerdown", "quit", "inject-nmi"]:
        assert n in names, (n, names)
    assert await qmp.execute("query-name") == {"name": "qmp-test"}
    assert await qmp.execute("query-kvm") == {"enabled": True, "present": True}
    cpus = await qmp.execute("query-cpus-fast")
    assert [c["cpu-index"] for c in cpus] == [0, 1], cpus
    for i, c in enumerate(cpus):
        assert c["qom-path"] == f"/machine/unattached/device[{i}]", c
        assert c["target"] == "x86_64", c
        assert c["props"] == {"core-id": 0, "socket-id": i, "thread-id": 0}, c
        # thread-id is the Linux TID of the vCPU thread of this very process.
        comm = f"/proc/{vm.proc.pid}/task/{c['thread-id']}/comm"
        with open(comm) as f:
            assert f.read().strip() == f"vcpu{i}", (comm, c)
    hv = await qmp.execute("query-hyperv")
    assert hv["enabled"] is False and hv["vps"] == [] and hv["cpuid"] == [], hv

    # stop in prelaunch does nothing (QEMU: no STOP); cont starts the guest.
    await qmp.execute("stop")
    assert await status(qmp) == "prelaunch"
    await qmp.execute("cont")
    await next_event(qmp, "RESUME")
    assert await status(qmp) == "running"
    vm.wait_line(r"qmp_idle: boot")
    vm.assert_runs()

    # stop/cont: STOP/RESUME, and the guest really stops and resumes.
    await qmp.execute("stop")
    await next_event(qmp, "STOP")
    assert await qmp.execute("query-status") == \
        {"running": False, "singlestep": False, "status": "paused"}
    vm.assert_stopped()
    await qmp.execute("cont")
    await next_event(qmp, "RESUME")
    vm.assert_runs()

    # inject-nmi reaches every vCPU.
    await qmp.execute("inject-nmi")
    vm.wait_line(r"qmp_idle: nmi cpu=0 count=1")
    vm.wait_line(r"qmp_idle: nmi cpu=1 count=1")

    # system_reset while running: RESET after the reply, the guest boots again and keeps running.
    await qmp.execute("system_reset")
    reset = await next_event(qmp, "RESET")
    assert reset["data"] == {"guest": False, "reason": "host-qmp-system-reset"}, reset
    vm.wait_line(r"qmp_idle: boot", 2)
    assert await status(qmp) == "running"
    vm.assert_runs()

    # system_reset while paused: the VM comes back in prelaunch, stopped, until cont.
    await qmp.execute("stop")
    await next_event(qmp, "STOP")
    await qmp.execute("system_reset")
    reset = await next_event(qmp, "RESET")
    assert reset["data"]["reason"] == "host-qmp-system-reset", reset
    assert await status(qmp) == "prelaunch"
    vm.assert_stopped()
    boots = vm.count(r"qmp_idle: boot")
    await qmp.execute("cont")
    await next_event(qmp, "RESUME")
    vm.wait_line(r"qmp_idle: boot", boots + 1)

    # cont while running: QEMU reports a STOP/RESUME pair.
    await qmp.execute("cont")
    await next_event(qmp, "STOP")
    await next_event(qmp, "RESUME")

    # system_powerdown without ACPI: POWERDOWN is reported, the guest does not react.
    await qmp.execute("system_powerdown")
    await next_event(qmp, "POWERDOWN")
    vm.assert_runs()

    try:
        await qmp.execute("no-such-command")
        raise AssertionError("no error for an unknown command")
    except ExecuteError as e:
        assert e.error_class == "CommandNotFound", e

    # qmp-shell on the same socket (a second client), driven through stdin.
    shell = args.qmp_shell or os.path.join(os.path.dirname(sys.executable), "qmp-shell")
    if not os.path.exists(shell):
        shell = shutil.which("qmp-shell")
    assert shell, "qmp-shell not found (it comes with the qemu.qmp package)"
    out = await asyncio.get_running_loop().run_in_executor(None, lambda: subprocess.run(
        [shell, vm.path], input="query-status\nquery-name\n", capture_output=True, text=True,
        timeout=TIMEOUT))
    assert out.returncode == 0, out
    assert '"status": "running"' in out.stdout, out.stdout
    assert '"name": "qmp-test"' in out.stdout, out.stdout

    no_pending_events(qmp)
    await qmp.execute("quit")
    shutdown = await next_event(qmp, "SHUTDOWN")
    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}, shutdown
    await disconnect_after_end(qmp)
    vm.wait_exit(0)


# ---------------------------------------------------------------------------------------------
# abuse


def abuse_connections(path):
    # Commands before negotiation.
    c = Raw(path)
    assert "QMP" in c.line()
    c.send(b'{"execute":"stop","id":1}')
    err = c.reply()
    assert err["error"]["class"] == "CommandNotFound" and err["id"] == 1, err
    assert "qmp_capabilities" in err["error"]["desc"], err
    c.send(b'{"execute":"qmp_capabilities"}')
    assert c.reply() == {"return": {}}
    # Garbage bytes: answered, the connection survives.
    c.send(b"\x00\xff\xfe garbage }}}")
    for _ in range(3):
        err = c.reply()
        assert err["error"]["class"] == "GenericError", err
        assert err["error"]["desc"].startswith("JSON parse error"), err
    c.send(b'{"execute":"query-status","id":"after-garbage"}')
    reply = c.reply()
    assert reply["id"] == "after-garbage" and reply["return"]["status"] == "running", reply
    # A 10 MB JSON string.
    c.send(b'{"execute":"query-name","arguments":{"x":"' + b"a" * (10 << 20) + b'"}}')
    err = c.reply()
    assert "larger than" in err["error"]["desc"], err
    c.send(b'{"execute":"query-status","id":"after-big"}')
    reply = c.reply()
    assert reply["id"] == "after-big" and "return" in reply, reply
    # Unknown commands and bad arguments.
    c.send(b'{"execute":"x-no-such-thing","id":"u"}')
    err = c.reply()
    assert err["error"]["class"] == "CommandNotFound" and err["id"] == "u", err
    c.send(b'{"execute":"query-status","arguments":{"bogus":1}}')
    err = c.reply()
    assert err["error"]["desc"] == "Parameter 'bogus' is unexpected", err
    c.close()
    # Disconnects mid-request, with and without negotiation.
    for payload in [b'{"execute":"qmp_capabilities"}{"execute":"query-sta',
                    b'{"execute":"qmp_capabilities"}{"execute":"stop"}',
                    b'{"exec']:
        gone = Raw(path)
        gone.line()
        gone.send(payload)
        gone.close()


async def abuse(args, vm):
    qmp = await connect(vm, "observer")
    vm.wait_line(r"qmp_idle: boot")
    vm.assert_runs()
    await asyncio.get_running_loop().run_in_executor(None, abuse_connections, vm.path)
    # One of the vanished clients sent a complete "stop": QEMU executes it; the observer sees it.
    await next_event(qmp, "STOP")
    assert await status(qmp) == "paused"
    await qmp.execute("cont")
    await next_event(qmp, "RESUME")
    # The guest runs and the other client is unaffected.
    vm.assert_runs()
    assert await status(qmp) == "running"
    no_pending_events(qmp)
    assert vm.proc.poll() is None, "enlighten died" + vm.output()
    await qmp.execute("quit")
    await next_event(qmp, "SHUTDOWN")
    await disconnect_after_end(qmp)
    vm.wait_exit(0)


# ---------------------------------------------------------------------------------------------
# guest panic


def crash_params():
    rng = random.Random(os.getpid())
    return [rng.getrandbits(64) for _ in range(5)]


async def panic(args, vm, action, params):
    qmp = await connect(vm)
    assert await status(qmp) == "prelaunch"
    hv = await qmp.execute("query-hyperv")
    assert hv["enabled"] is True and "hv-crash" in hv["enlightenments"], hv
    assert [l["function"] for l in hv["cpuid"]][:1] == [0x40000000], hv
    assert len(hv["vps"]) == 1, hv
    await qmp.execute("cont")
    await next_event(qmp, "RESUME")
    event = await next_event(qmp, "GUEST_PANICKED")
    info = {"type": "hyper-v", **{f"arg{i + 1}": p for i, p in enumerate(params)}}
    qapi_action = {"shutdown": "poweroff", "exit-failure": "poweroff", "pause": "pause",
                   "none": "run"}[action]
    assert event["data"] == {"action": qapi_action, "info": info}, (event, params)
    if action in ("shutdown", "exit-failure"):
        await next_event(qmp, "STOP")
        shutdown = await next_event(qmp, "SHUTDOWN")
        assert shutdown["data"] == {"guest": True, "reason": "guest-panic"}, shutdown
        await disconnect_after_end(qmp)
        vm.wait_exit(0 if action == "shutdown" else 1)
        return
    if action == "pause":
        await next_event(qmp, "STOP")
        assert await qmp.execute("query-status") == \
            {"running": False, "singlestep": False, "status": "guest-panicked"}
        # The vCPU stopped right after its CRASH_CTL write: the line after it is not printed.
        vm.assert_stopped()
        assert vm.count(r"qmp_idle: crashed") == 0, vm.output()
        assert vm.proc.poll() is None, "the VM ended on panic=pause"
        # The crash parameters stay readable.
        hv = await qmp.execute("query-hyperv")
        assert hv["crash"]["params"] == params, hv
        # QEMU allows cont from guest-panicked.
        await qmp.execute("cont")
        await next_event(qmp, "RESUME")
        assert await status(qmp) == "running"
        vm.wait_line(r"qmp_idle: crashed")
        vm.assert_runs()
        # A reset of the stopped VM clears the Hyper-V state (crash parameters read 0) and leaves
        # it in prelaunch; RESET is sent once the reset is done, as QEMU does.
        await qmp.execute("stop")
        await next_event(qmp, "STOP")
        await qmp.execute("system_reset")
        await next_event(qmp, "RESET")
        assert await status(qmp) == "prelaunch"
        hv = await qmp.execute("query-hyperv")
        assert hv["crash"]["params"] == [0] * 5, hv
        vm.assert_stopped()
        await qmp.execute("cont")
        await next_event(qmp, "RESUME")
        vm.wait_line(r"qmp_idle: boot", 2)
        # The guest panics again after the reboot.
        event = await next_event(qmp, "GUEST_PANICKED")
        assert event["data"]["info"] == info, event
        await next_event(qmp, "STOP")
    else:
        assert await status(qmp) == "running"
        vm.wait_line(r"qmp_idle: crashed")
        vm.assert_runs()
    no_pending_events(qmp)
    await qmp.execute("quit")
    await next_event(qmp, "SHUTDOWN")
    await disconnect_after_end(qmp)
    vm.wait_exit(0)


# ---------------------------------------------------------------------------------------------
# resets and power-off


async def guest_reset(args, vm):
    qmp = await connect(vm)
    await qmp.execute("cont")
    await next_event(qmp, "RESUME")
    reset = await next_event(qmp, "RESET")
    assert reset["data"] == {"guest": True, "reason": "guest-reset"}, reset
    vm.wait_line(r"qmp_idle: boot", 2)
    assert await status(qmp) == "running"
    await qmp.execute("quit")
    # The guest may reset again meanwhile: skip RESETs until the SHUTDOWN.
    while True:
        event = await asyncio.wait_for(qmp.events.get(), TIMEOUT)
        if event["event"] != "RESET":
            break
    assert event["event"] == "SHUTDOWN" and event["data"]["reason"] == "host-qmp-quit", event
    await disconnect_after_end(qmp)
    vm.wait_exit(0)


async def guest_ends_vm(vm, reason, line):
    """Resumes the guest, which then ends the VM itself: SHUTDOWN with `reason`, exit 0, and the
    serial line `line` seen exactly once."""
    qmp = await connect(vm)
    await qmp.execute("cont")
    await next_event(qmp, "RESUME")
    shutdown = await next_event(qmp, "SHUTDOWN")
    assert shutdown["data"] == {"guest": True, "reason": reason}, shutdown
    await disconnect_after_end(qmp)
    vm.wait_exit(0)
    assert vm.count(line) == 1, vm.output()


async def no_reboot_guest(args, vm):
    await guest_ends_vm(vm, "guest-reset", r"qmp_idle: boot")


async def no_reboot_host(args, vm):
    qmp = await connect(vm)
    vm.wait_line(r"qmp_idle: boot")
    await qmp.execute("system_reset")
    shutdown = await next_event(qmp, "SHUTDOWN")
    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-system-reset"}, shutdown
    await disconnect_after_end(qmp)
    vm.wait_exit(0)


async def poweroff(args, vm):
    await guest_ends_vm(vm, "guest-shutdown", r"qmp_idle: power off")


async def tcp(args, vm):
    qmp = await connect(vm)
    vm.wait_line(r"qmp_idle: boot")
    assert await status(qmp) == "running"
    await qmp.execute("stop")
    await next_event(qmp, "STOP")
    vm.assert_stopped()
    await qmp.execute("quit")
    await next_event(qmp, "SHUTDOWN")
    await disconnect_after_end(qmp)
    vm.wait_exit(0)


async def wait_on(args, vm):
    # server=on without wait=off: startup waits for the first client; the guest has not run.
    vm.assert_stopped()
    assert vm.count(r"qmp_idle: boot") == 0, vm.output()
    qmp = await connect(vm)
    vm.wait_line(r"qmp_idle: boot")
    assert await status(qmp) == "running"
    await qmp.execute("quit")
    await next_event(qmp, "SHUTDOWN")
    await disconnect_after_end(qmp)
    vm.wait_exit(0)


async def host_signal(args, vm, sig):
    qmp = await connect(vm)
    vm.wait_line(r"qmp_idle: boot")
    vm.proc.send_signal(sig)
    shutdown = await next_event(qmp, "SHUTDOWN")
    assert shutdown["data"] == {"guest": False, "reason": "host-signal"}, shutdown
    await disconnect_after_end(qmp)
    vm.wait_exit(0)


# ---------------------------------------------------------------------------------------------


def run_scenario(args, tmp):
    s = args.scenario
    if s == "control":
        vm = Vm(args, ["-S", "-smp", "2", "-name", "guest=qmp-test,debug-threads=on"], tmp,
                "chardev")
        return vm, control(args, vm)
    if s == "abuse":
        return (vm := Vm(args, [], tmp, "qmp-legacy")), abuse(args, vm)
    if s.startswith("panic-"):
        action = s[len("panic-"):]
        params = crash_params()
        append = "crash=5 " + " ".join(f"p{i}={p:#x}" for i, p in enumerate(params))
        vm = Vm(args, ["-S", "-cpu", "host,hv-crash", "-action", f"panic={action}",
                       "-append", append], tmp)
        return vm, panic(args, vm, action, params)
    if s == "guest-reset":
        return (vm := Vm(args, ["-S", "-append", "triple=3"], tmp)), guest_reset(args, vm)
    if s == "no-reboot-guest":
        vm = Vm(args, ["-S", "--no-reboot", "-append", "triple=3"], tmp)
        return vm, no_reboot_guest(args, vm)
    if s == "no-reboot-host":
        return (vm := Vm(args, ["--no-reboot"], tmp)), no_reboot_host(args, vm)
    if s == "tcp":
        return (vm := Vm(args, [], tmp, "tcp")), tcp(args, vm)
    if s == "wait":
        return (vm := Vm(args, [], tmp, "wait")), wait_on(args, vm)
    if s in ("sigterm", "sigint"):
        sig = signal.SIGTERM if s == "sigterm" else signal.SIGINT
        return (vm := Vm(args, [], tmp)), host_signal(args, vm, sig)
    if s == "poweroff":
        return (vm := Vm(args, ["-S", "-append", "poweroff=3"], tmp)), poweroff(args, vm)
    raise SystemExit(f"unknown scenario {s}")


SCENARIOS = ["control", "abuse", "panic-shutdown", "panic-pause", "panic-none",
             "panic-exit-failure", "guest-reset", "no-reboot-guest", "no-reboot-host", "poweroff", "tcp", "wait", "sigterm", "sigint"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--bin", required=True, help="the enlighten binary")
    parser.add_argument("--kernel", required=True, help="the qmp_idle guest (Multiboot image)")
    parser.add_argument("--qmp-shell", help="path to qmp-shell (default: next to python, or PATH)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        vm, coro = run_scenario(args, tmp)
        try:
            asyncio.run(asyncio.wait_for(coro, 4 * TIMEOUT))
        except BaseException as e:
            vm.kill()
            time.sleep(0.2)
            print(f"FAIL ({args.scenario}): {e!r}{vm.output()}", file=sys.stderr)
            raise
        finally:
            vm.kill()
    print(f"enlighten QMP scenario {args.scenario}: all checks passed")


if __name__ == "__main__":
    main()

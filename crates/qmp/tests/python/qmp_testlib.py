"""Helpers shared by the QMP client tests (`test_qemu_qmp.py` here and enlighten's
`crates/enlighten/tests/python/test_enlighten_qmp.py`): event checks and a bare socket client."""

import asyncio
import json
import socket

TIMEOUT = 10


async def next_event(client, name):
    """The next event of a `qemu.qmp` client, which must be `name`, with a plausible timestamp."""
    event = await asyncio.wait_for(client.events.get(), TIMEOUT)
    assert event["event"] == name, f"expected {name}, got {event}"
    ts = event["timestamp"]
    assert ts["seconds"] > 1_600_000_000 and 0 <= ts["microseconds"] < 1_000_000, ts
    return event


async def disconnect_after_end(qmp):
    """Disconnects a client whose server is ending: the server may close the connection first, which
    qemu.qmp reports as EOFError from disconnect() (QEMU's own harness tolerates it the same way)."""
    try:
        await qmp.disconnect()
    except EOFError:
        pass


class Raw:
    """A bare Unix-socket client reading CRLF-terminated JSON lines, for input no library sends."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.buf = b""

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return json.loads(line)

    def reply(self):
        """The next line that is not an event."""
        while True:
            msg = self.line()
            if "event" not in msg:
                return msg

    def send(self, data):
        self.sock.sendall(data)

    def close(self):
        self.sock.close()

"""A TCP forwarder run as its own process:
`python -m tests.tcp_proxy LISTEN_PORT TARGET_PORT [HOLD_PATTERN RELEASE_FILE]`.

Tests put it in front of the S3 endpoint; killing its process group is an endpoint outage
(connections refused, open ones cut) that leaves the stored objects in place, and starting it
again on the same port brings the endpoint back.

With HOLD_PATTERN (a regex over the bytes a client sends) a slow store: a request that matches
is held, with everything after it on its connection, until RELEASE_FILE exists; the proxy
prints `held` once when it first holds one. Other connections go on.
"""

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                hold: tuple[re.Pattern, str] | None = None) -> None:  # fmt: skip
    try:
        while data := await reader.read(65536):
            if hold is not None and hold[0].search(data):
                await _wait_for_release(hold[1])
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


_announced = False


async def _wait_for_release(release_file: str) -> None:
    global _announced
    if not os.path.exists(release_file) and not _announced:
        _announced = True
        print("held", flush=True)
    while not os.path.exists(release_file):
        await asyncio.sleep(0.02)


async def main(listen_port: int, target_port: int,
               hold: tuple[re.Pattern, str] | None) -> None:  # fmt: skip
    async def handle(client_reader, client_writer):
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1",
                                                                             target_port)  # fmt: skip
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, upstream_writer, hold),
                             _pipe(upstream_reader, client_writer))  # fmt: skip

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port, reuse_address=True)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


class Proxy:
    """This forwarder in its own process group, in front of the S3 endpoint `target`
    (http://host:port); `hold` = (HOLD_PATTERN, RELEASE_FILE) makes it a slow store."""

    def __init__(self, target: str, hold: tuple[str, str] | None = None) -> None:
        from tests.conftest import free_port

        self.port, self.target_port = free_port(), int(target.rsplit(":", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.hold = hold
        self.process = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.tcp_proxy", str(self.port), str(self.target_port),
             *(self.hold or ())],
            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        assert self.process.stdout.readline().strip() == b"listening"

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


if __name__ == "__main__":
    hold = (re.compile(sys.argv[3].encode()), sys.argv[4]) if len(sys.argv) > 4 else None
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), hold))

"""An HTTP proxy in front of an S3 endpoint that counts requests by operation and by client
process, and adds a fixed latency to each request: what bench/scale.py measures the stages'
object-store costs with.

    python bench/s3_meter.py LISTEN_PORT TARGET_PORT LATENCY_MS

Each request's line and headers are parsed (its body is passed through, framed by
Content-Length or chunked encoding) to classify it: LIST (a GET with `list-type` or `prefix`
in its query), HEAD, GET, PUT, POST, DELETE; then it waits LATENCY_MS and goes on to the
endpoint. Responses are passed through untouched. The client process of every connection is
found from its port (psutil), so the driver's requests and bytes can be told from the
workers'. `GET /__meter` on the proxy returns the counts as JSON ({pid: {op: n, "bytes_in":
..., "bytes_out": ...}}); `POST /__meter` resets them; `GET /__meter?log` gives the last 2,000
requests; `POST /__meter?latency_ms=N` changes the latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import defaultdict

import psutil

COUNTS: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
LOG: list[str] = []  # the last requests, "pid OP target", for GET /__meter?log
LATENCY = [0.0]  # seconds added to each request; POST /__meter?latency_ms=N sets it


def _operation(method: str, target: str) -> str:
    query = target.split("?", 1)[1] if "?" in target else ""
    if method == "GET" and ("list-type" in query or "prefix=" in query or "delimiter" in query):
        return "LIST"
    return method


def _pid_of(port: int) -> int:
    for connection in psutil.net_connections("tcp"):
        if connection.laddr and connection.laddr.port == port and connection.pid:
            return connection.pid
    return 0


async def _body(reader: asyncio.StreamReader, headers: dict[str, str],
                forward: asyncio.StreamWriter) -> int:  # fmt: skip
    """Pass a request's body through; its length."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        total = 0
        while True:
            line = await reader.readline()
            forward.write(line)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            chunk = await reader.readexactly(size + 2)  # the chunk and its CRLF
            forward.write(chunk)
            total += size
            if size == 0:
                return total
    length = int(headers.get("content-length", "0"))
    if length:
        forward.write(await reader.readexactly(length))
    return length


async def _respond(writer: asyncio.StreamWriter, method: str, target: str) -> None:
    if method == "POST" and "latency_ms=" in target:
        LATENCY[0] = float(target.split("latency_ms=", 1)[1]) / 1000
    elif method == "POST":
        COUNTS.clear()
        LOG.clear()
    if "log" in target:
        body = "\n".join(LOG).encode()
    else:
        body = json.dumps({str(pid): dict(ops) for pid, ops in COUNTS.items()}).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
    await writer.drain()


async def _requests(reader, upstream_writer, client_writer, pid: int) -> None:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target = lines[0].split(" ")[:2]
        headers = {k.strip().lower(): v.strip() for k, v in
                   (line.split(":", 1) for line in lines[1:] if ":" in line)}  # fmt: skip
        if target.startswith("/__meter"):
            await _respond(client_writer, method, target)
            continue
        counts = COUNTS[pid]
        counts[_operation(method, target)] += 1
        LOG.append(f"{pid} {_operation(method, target)} {target[:200]}")
        del LOG[:-2000]
        await asyncio.sleep(LATENCY[0])
        upstream_writer.write(head)
        counts["bytes_in"] += len(head) + await _body(reader, headers, upstream_writer)
        await upstream_writer.drain()


async def _responses(reader, client_writer, pid: int) -> None:
    while data := await reader.read(65536):
        COUNTS[pid]["bytes_out"] += len(data)
        client_writer.write(data)
        await client_writer.drain()


async def main(listen_port: int, target_port: int, latency_ms: float) -> None:
    LATENCY[0] = latency_ms / 1000

    async def handle(client_reader, client_writer):
        pid = _pid_of(client_writer.get_extra_info("peername")[1])
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1",
                                                                             target_port)  # fmt: skip
        except OSError:
            client_writer.close()
            return
        tasks = [asyncio.ensure_future(_requests(client_reader, upstream_writer, client_writer,
                                                 pid)),
                 asyncio.ensure_future(_responses(upstream_reader, client_writer, pid))]  # fmt: skip
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        client_writer.close()
        upstream_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port, reuse_address=True,
                                        limit=2**20)  # fmt: skip
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))

"""Load for the reliability tests: closed loop to measure capacity, open loop (a fixed arrival rate) to press.

Requests carry several real Fashion-MNIST PNGs in one multipart upload, so that the model, not the client or
the HTTP layer, is what saturates on a 2-core machine: a modest request rate is then several times capacity.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import time
import urllib.parse
from dataclasses import dataclass

import httpx


@dataclass
class Outcome:
    started: float  # time.monotonic() when the request was sent
    seconds: float  # client-side latency
    status: int  # 0 when no HTTP answer came (the exception's name is in `error`)
    error: str = ""
    body: dict | None = None
    headers: dict | None = None


IDLE_LIMIT_S = 4.0  # below the server's keep-alive timeout


class _Connection:
    """One keep-alive HTTP/1.1 connection over asyncio streams: cheap enough that the client never saturates
    first (httpx spends ~1 ms of CPU a request, which on 2 cores caps the load below the server's capacity)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.last_used = time.monotonic()

    async def request(self, raw: bytes) -> tuple[int, dict, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body


class Client:
    """Pre-encoded POST /classify requests with several images as multipart, over a pool of connections."""

    def __init__(self, url: str, pngs: list[bytes], images_per_request: int, query: str = "", keep_bodies=True):
        self.keep_bodies = keep_bodies
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname, parsed.port
        self.pool: list[_Connection] = []
        self.bodies = []
        for k in range(len(pngs)):
            boundary = f"puppet{k:08d}"
            parts = (
                b"".join(
                    f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i}.png"\r\n'
                    f"Content-Type: image/png\r\n\r\n".encode()
                    + pngs[(k + i) % len(pngs)]
                    + b"\r\n"
                    for i in range(images_per_request)
                )
                + f"--{boundary}--\r\n".encode()
            )
            head = (
                f"POST /classify{query} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(parts)}\r\n\r\n"
            )
            self.bodies.append(head.encode() + parts)

    def _idle(self) -> _Connection | None:
        while self.pool:
            conn = self.pool.pop()
            # not one the server has closed, or is about to close, for being idle (uvicorn: after 5 s)
            if not conn.reader.at_eof() and time.monotonic() - conn.last_used < IDLE_LIMIT_S:
                return conn
            conn.writer.close()
        return None

    async def post(self, i: int) -> Outcome:
        t0 = time.monotonic()
        conn = self._idle()
        reused = conn is not None
        for attempt in (1, 2):
            try:
                if conn is None:
                    conn = _Connection(*await asyncio.open_connection(self.host, self.port))
                status, headers, body = await conn.request(self.bodies[i % len(self.bodies)])
                break
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                if conn is not None:
                    conn.writer.close()
                # a kept-alive connection the server closed just as we sent: nothing was read, try a fresh one
                closed = isinstance(e, ConnectionResetError | BrokenPipeError) or (
                    isinstance(e, asyncio.IncompleteReadError) and not e.partial
                )
                stale = attempt == 1 and reused and closed
                if not stale:
                    return Outcome(t0, time.monotonic() - t0, 0, type(e).__name__)
                conn = None
        conn.last_used = time.monotonic()
        if headers.get("connection", "").lower() == "close":
            conn.writer.close()
        else:
            self.pool.append(conn)
        keep = self.keep_bodies or status != 200
        parsed = json.loads(body) if keep and headers.get("content-type", "").startswith("application/json") else None
        return Outcome(t0, time.monotonic() - t0, status, body=parsed, headers=headers if keep else None)

    def close(self) -> None:
        for conn in self.pool:
            conn.writer.close()
        self.pool.clear()


def capacity(url: str, pngs: list[bytes], *, images_per_request: int, seconds: float, concurrency: int = 16) -> float:
    """Requests per second the server completes with `concurrency` clients always waiting on it."""

    async def run() -> float:
        client = Client(url, pngs, images_per_request)
        done = 0
        stop = time.monotonic() + seconds

        async def worker(k: int) -> None:
            nonlocal done
            i = k
            while time.monotonic() < stop:
                o = await client.post(i)
                assert o.status == 200, f"capacity run failed: {o}"
                done += 1
                i += concurrency

        t0 = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        rate = done / (time.monotonic() - t0)
        client.close()
        return rate

    return asyncio.run(run())


class LoadRun(list):
    """The outcomes of an open-loop run, and the client's own worst lateness (`client_lag_s`): how late its event
    loop woke for a 10 ms tick. An answer can reach the client's code that much after it arrived."""

    client_lag_s: float = 0.0


def open_loop(
    url: str,
    pngs: list[bytes],
    *,
    rate: float,
    seconds: float,
    images_per_request: int,
    query: str = "",
    keep_bodies: bool = True,
) -> LoadRun:
    """Send `rate` requests per second for `seconds`, whatever the answers, and wait for every answer.

    The client's garbage collector is off meanwhile: a pause of the client would otherwise be followed by a
    burst of overdue requests that the server never saw coming. `keep_bodies=False` keeps only the bodies
    of failed answers (a long run's memory). The outcomes carry the client's worst lateness (`LoadRun`).
    """

    async def run() -> LoadRun:
        client = Client(url, pngs, images_per_request, query, keep_bodies=keep_bodies)
        tasks = []
        lag = 0.0

        async def ticker() -> None:
            nonlocal lag
            while True:
                due = time.monotonic() + 0.01
                await asyncio.sleep(0.01)
                lag = max(lag, time.monotonic() - due)

        ticking = asyncio.create_task(ticker())
        t0 = time.monotonic()
        for i in range(int(rate * seconds)):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(client.post(i)))
        outcomes = LoadRun(await asyncio.gather(*tasks))
        ticking.cancel()
        client.close()
        outcomes.client_lag_s = lag
        return outcomes

    gc.disable()
    try:
        return asyncio.run(run())
    finally:
        gc.enable()


def p50_latency(url: str, png: bytes, n: int = 30) -> float:
    """Median latency of `n` sequential one-image requests on one connection (seconds)."""
    times = []
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            t0 = time.monotonic()
            r = client.post(url + "/classify", content=png, headers={"Content-Type": "image/png"})
            times.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
    return statistics.median(times)

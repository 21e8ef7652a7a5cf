"""Uploaded images to one uint8 batch, within the pixel budget and without stalling the event loop.

All headers are read before any bitmap is decoded, so what is over the limits is refused (413) at the cost of
reading headers. Small images decode on the event loop (a thread hand-off costs more than decoding 28x28);
the rest in a pool of a few low-priority threads per worker process, which bounds both the loop's stalls and
the memory decoding holds, whatever is uploaded or how many at once.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from service import metrics
from service.errors import ApiError
from service.imaging import ImageError, OpenedImage, decode_opened, discard, open_image, opens_cheaply
from service.state import ServiceState

# What a request may do on the event loop, in all: read the headers of its first 16 KB of uploads (a PNG's
# compressed text chunks are inflated as its header is read, so the cost grows with the bytes), and decode its
# first 256 K declared pixels of those: a hand-off to a thread costs more than decoding 28x28, and these bounds
# cap what a request costs the loop (docs/design.md). Everything else is read and decoded in threads.
INLINE_OPEN_BYTES = 16 * 1024
INLINE_DECODE_PIXELS = 256 * 1024
DECODE_NICE = 10  # decoding threads' CPU priority, below the event loop's and the inference thread's (0)
_decode_pools: dict[int, ThreadPoolExecutor] = {}


async def decode_all(state: ServiceState, blobs: list[bytes]) -> torch.Tensor:
    """Decode every image (in order) to one uint8 batch; 4xx naming the image that failed.

    All headers are read first: an image over `max_pixels`, or images together over `max_request_pixels`, are
    refused (413) before any bitmap is decoded. Small images decode on the event loop (a thread hand-off costs
    more than decoding 28x28); large ones in at most `max_concurrent_decodes` threads of this process, so
    neither the event loop (health checks, other requests) nor memory depends on what is uploaded."""
    s, pre = state.settings, state.ckpt.preprocessing
    where = (lambda i: f"image {i}: ") if len(blobs) > 1 else (lambda i: "")
    opened, i, started = [], 0, -1  # started: the last image handed to a decoder (which releases it)
    try:
        opened, inline = await _open_all(blobs, s.max_pixels)
        total = sum(o.pixels for o in opened)
        if total > s.max_request_pixels:
            sizes = ", ".join(f"image {k}: {o.dimensions}" for k, o in enumerate(opened[:8]))
            more = f" and {len(opened) - 8} more" if len(opened) > 8 else ""
            raise ApiError(
                413,
                "too_many_pixels",
                f"the request's {len(opened)} images hold {total:,} pixels in all ({sizes}{more}); "
                f"the limit is {s.max_request_pixels:,} per request",
            )
        out, inline_pixels = [], 0
        pool = _decode_pool(s.max_concurrent_decodes)
        loop = asyncio.get_running_loop()
        for i, o in enumerate(opened):
            started = i
            if i in inline and inline_pixels + o.pixels <= INLINE_DECODE_PIXELS:
                inline_pixels += o.pixels
                out.append(decode_opened(o, pre))
            else:
                out.append(await loop.run_in_executor(pool, decode_opened, o, pre))
    except ImageError as e:
        metrics.REJECTIONS.labels("bad_input").inc()
        raise ApiError(e.status, e.code, where(i if e.index is None else e.index) + e.message) from None
    except ApiError:
        metrics.REJECTIONS.labels("bad_input").inc()
        raise
    finally:  # refused, failed or cancelled: the images not reached are released (off the loop: may trim)
        if any(o.image is not None for o in opened[started + 1 :]):
            await asyncio.to_thread(discard, opened[started + 1 :])
    return torch.stack(out)


async def _open_all(blobs: list[bytes], max_pixels: int) -> tuple[list[OpenedImage], set[int]]:
    """Every image's header, in order, and which were read on the event loop: uploads while their bytes add
    up to INLINE_OPEN_BYTES (and whose header is cheap to read whatever their size); the rest in one thread.
    An ImageError names the image that failed (`index`); what was opened before it is released."""
    opened: list[OpenedImage | None] = [None] * len(blobs)
    inline_bytes, inline, later = 0, set(), []
    try:
        for i, blob in enumerate(blobs):
            if inline_bytes + len(blob) <= INLINE_OPEN_BYTES and opens_cheaply(blob):
                inline_bytes += len(blob)
                opened[i] = _open_one(i, blob, max_pixels)
                inline.add(i)
            else:
                later.append(i)
        if later:
            for i, o in zip(later, await asyncio.to_thread(_open_many, blobs, later, max_pixels), strict=True):
                opened[i] = o
    except BaseException:
        if any(o is not None for o in opened):
            await asyncio.to_thread(discard, opened)
        raise
    return opened, inline


def _open_many(blobs: list[bytes], which: list[int], max_pixels: int) -> list[OpenedImage]:
    """In a thread: the headers of blobs[i] for i in `which`; on a failure, those read so far are released."""
    out: list[OpenedImage] = []
    try:
        for i in which:
            out.append(_open_one(i, blobs[i], max_pixels))
    except BaseException:
        discard(out)
        raise
    return out


def _open_one(i: int, blob: bytes, max_pixels: int) -> OpenedImage:
    try:
        return open_image(blob, max_pixels=max_pixels)
    except ImageError as e:
        e.index = i
        raise


def _decode_pool(threads: int) -> ThreadPoolExecutor:
    """This process's decoding threads: at most `threads` large images are decoded at once (memory), in
    arrival order; one whose request was cancelled before its turn is never decoded."""
    pool = _decode_pools.get(threads)
    if pool is None:
        pool = _decode_pools[threads] = ThreadPoolExecutor(
            threads, thread_name_prefix="puppet-decode", initializer=_yield_cpu
        )
    return pool


def _yield_cpu() -> None:
    """A decoding thread runs at a lower CPU priority than the event loop and the inference thread (Linux:
    each thread has its own nice value), so they get a core at once when they wake, however many decodes
    are running."""
    if sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICE)
        except OSError:
            pass

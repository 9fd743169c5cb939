"""What one request may send and ask for, in one place, and the body reader that enforces the
HTTP-edge part while the body arrives.

A body is refused before anything parses it when it is too large (413), too slow (408), nested
too deeply or holds too many JSON items (400): json.loads and pydantic hold the GIL for as long as
they run, so their cost must be bounded before they start. The shape scan is vectorised over each
received chunk, with its state (inside a string? after a backslash? depth) carried from chunk to
chunk; a chunk inside one long string is skipped at memchr speed.
"""
import asyncio
import json
import re
from dataclasses import dataclass

import numpy as np
from starlette.requests import ClientDisconnect

from server.api.errors import APIError, bad_request, client_gone

MiB = 1 << 20
SCAN_SLICE = MiB  # bytes scanned per numpy pass: bounds the scan's temporary arrays

_STEP = np.zeros(256, np.int8)  # +1 opens an array or object, -1 closes one
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
_ITEM = np.zeros(256, bool)  # a comma starts one more member; an opening bracket is an item itself
_ITEM[[ord(","), ord("["), ord("{")]] = True
QUOTE, BACKSLASH = ord('"'), ord("\\")
# a \uD800-\uDFFF escape: half of a pair (an escaped emoji) or alone, which json.loads keeps as a lone surrogate
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass
class RequestLimits:
    max_body_bytes: int = 32 * MiB
    """Largest request body; a larger one gets 413 before it is read to the end (vLLM leaves this to a proxy)."""
    max_json_depth: int = 64
    """Deepest nesting of arrays and objects; a chat request with content parts needs 4."""
    max_json_items: int = 1 << 18
    """Array elements and object members in one body (each token id of a prompt is one): bounds the
    time json.loads and pydantic hold the GIL, about a second per million items on one core."""
    body_timeout: float = 60.0
    """Seconds a client may take to send its body; a slower one gets 408."""
    max_prompts: int = 256
    """Prompts in one /v1/completions request."""
    max_request_tokens: int = 1 << 20
    """Tokens one request may put through the model: prompt + max_tokens, summed over its sequences."""
    max_stop: int = 32
    """Stop strings per request; each one is matched against the text after every token."""
    max_stop_chars: int = 256
    """Characters per stop string."""
    max_stop_token_ids: int = 1024
    """Entries of stop_token_ids."""

    def __post_init__(self):
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, not {value}")


class JSONShape:
    """Nesting depth and item count of a JSON text fed in pieces; brackets and commas inside strings
    do not count. Raises a 400 as soon as a limit is passed."""

    def __init__(self, max_depth: int, max_items: int):
        self.max_depth = max_depth
        self.max_items = max_items
        self.in_string = 0  # 1 while inside a string
        self.odd_backslashes = 0  # the text so far ends in an odd run of backslashes
        self.depth = 0
        self.num_items = 0

    def feed(self, data: bytes) -> None:
        if self.in_string and b'"' not in data:  # all of it inside one string: only a trailing backslash run matters
            trailing = len(data) - len(data.rstrip(b"\\"))
            self.odd_backslashes = (self.odd_backslashes + trailing if trailing == len(data) else trailing) & 1
            return
        for start in range(0, len(data), SCAN_SLICE):
            self._scan(np.frombuffer(data, np.uint8, count=min(SCAN_SLICE, len(data) - start), offset=start))

    def _scan(self, chars: np.ndarray) -> None:
        quotes = chars == QUOTE
        backslashes = chars == BACKSLASH
        if self.odd_backslashes or backslashes.any():
            quotes &= ~self._escaped(backslashes)
        inside = (np.cumsum(quotes, dtype=np.int64) + self.in_string) & 1  # 1 inside a string and at its opening quote
        self.in_string = int(inside[-1])
        outside = inside == 0
        levels = self.depth + np.cumsum(np.where(outside, _STEP[chars], 0), dtype=np.int64)
        deepest, self.depth = int(levels.max()), int(levels[-1])
        self.num_items += int(np.count_nonzero(_ITEM[chars] & outside))
        if deepest > self.max_depth:
            raise bad_request(f"the JSON body is nested more than {self.max_depth} levels deep")
        if self.num_items > self.max_items:
            raise bad_request(f"the JSON body holds more than {self.max_items} items (array elements and object "
                              "members)")

    def _escaped(self, backslashes: np.ndarray) -> np.ndarray:
        """Per position: whether an odd run of backslashes precedes it (the run may start in an earlier piece)."""
        index = np.arange(len(backslashes), dtype=np.int64)
        last_other = np.maximum.accumulate(np.where(backslashes, -1, index))  # last non-backslash at or before i
        run = index - last_other  # backslashes ending at i
        run[last_other < 0] += self.odd_backslashes
        before = np.empty_like(run)
        before[0], before[1:] = self.odd_backslashes, run[:-1]
        self.odd_backslashes = int(run[-1] & 1)
        return (before & 1).astype(bool)


async def read_json(request, limits: RequestLimits) -> dict:
    """The request's JSON object, read within the limits; every malformed body is a 4xx APIError."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise bad_request(f"Content-Type must be application/json, not {content_type or 'missing'!r}")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise APIError(415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed",
                       code="unsupported_encoding")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_large(int(declared), limits)
    shape = JSONShape(limits.max_json_depth, limits.max_json_items)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise too_large(size, limits)
                shape.feed(chunk)
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {limits.body_timeout:g} s",
                       code="request_timeout") from None
    except ClientDisconnect:
        raise client_gone() from None
    if await request.is_disconnected():  # it gave up while the request queued here: parse nothing
        raise client_gone()
    body = b"".join(chunks)
    data = parse_json(body)
    if SURROGATE_ESCAPE.search(body):  # rare: look for a lone one, in Python, so on a worker thread
        if (found := await asyncio.to_thread(unencodable_string, data)) is not None:
            raise bad_request(f"{found[0]}: a lone UTF-16 surrogate (\\ud800-\\udfff without its pair) is not text",
                              found[1])
    return data


def too_large(size: int, limits: RequestLimits) -> APIError:
    return APIError(413, f"the request body has {size} bytes or more; this server takes at most "
                    f"{limits.max_body_bytes} (--max-body-size)", code="request_too_large")


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, NaN, 5000-digit numbers
        raise bad_request(f"malformed JSON body: {err}") from None
    if not isinstance(data, dict):
        raise bad_request("the JSON body must be an object")
    return data


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def unencodable_string(value, path: str = "", top: str | None = None) -> tuple[str, str] | None:
    """(path, top-level field) of the first string or key in `value` that is not valid Unicode text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path, top
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and unencodable_string(key) is not None:
            return f"{path}.{key!r}" if path else repr(key), top
        sub = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        if (found := unencodable_string(item, sub, top if top is not None else key)) is not None:
            return found
    return None

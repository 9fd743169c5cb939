"""The body-shape scan against a plain character-by-character reference, on random JSON cut into
random chunks; and the serve flags that set the limits."""
import json
import random

import pytest

from server.api.errors import APIError
from server.api.limits import SCAN_SLICE, JSONShape, RequestLimits
from server.api.serve import engine_config, request_limits
from server.cli import build_parser

TRICKY_TEXT = ['a"b', "a\\", "\\\\", '\\"', "[{,}]", "x\\\\\"y", "\u00e9\u2603", "", "\\u005b", "]]]", ","]


def reference_shape(text: bytes) -> tuple[int, int]:
    """(deepest nesting, items) by walking the text one character at a time."""
    depth = deepest = items = 0
    in_string = escaped = False
    for char in text.decode("utf-8"):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            items += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
        elif char == ",":
            items += 1
    return deepest, items


def random_value(rng: random.Random, depth: int):
    kind = rng.random()
    if depth > 6 or kind < 0.3:
        return rng.choice([1, -2.5, True, None, rng.choice(TRICKY_TEXT) * rng.randint(1, 3)])
    if kind < 0.65:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(TRICKY_TEXT) + str(i): random_value(rng, depth + 1) for i in range(rng.randint(0, 4))}


def scan(text: bytes, cuts: list[int], max_depth: int = 10 ** 9) -> JSONShape:
    shape = JSONShape(max_depth=max_depth, max_items=10 ** 9)
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        shape.feed(text[start:end])
    return shape


@pytest.mark.parametrize("seed", range(40))
def test_the_scan_matches_the_reference_however_the_body_is_cut(seed):
    rng = random.Random(seed)
    text = json.dumps(random_value(rng, 0), ensure_ascii=rng.random() < 0.5).encode()
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []
    deepest, items = reference_shape(text)
    shape = scan(text, cuts, max_depth=deepest)
    assert (shape.num_items, shape.depth, shape.in_string) == (items, 0, 0)
    if deepest:
        with pytest.raises(APIError, match="nested"):
            scan(text, cuts, max_depth=deepest - 1)


@pytest.mark.parametrize("text", [b'["' + b"\\" * 2 * SCAN_SLICE + b'", [[1]]]',   # a backslash run across slices
                                  b'["' + b"a" * (SCAN_SLICE + 7) + b'\\"[[[[", [[1]]]'])
def test_long_strings_and_backslash_runs_across_slices(text):
    for cuts in ([], [3], [SCAN_SLICE - 1, SCAN_SLICE + 1], list(range(1, len(text), 65536))):
        shape = JSONShape(max_depth=3, max_items=10)
        for start, end in zip([0, *cuts], [*cuts, len(text)]):
            shape.feed(text[start:end])
        assert (shape.num_items, shape.depth, shape.in_string, shape.odd_backslashes) == (4, 0, 0, 0)


def test_limits_raise_as_soon_as_they_are_passed():
    with pytest.raises(APIError, match="nested more than 3"):
        JSONShape(max_depth=3, max_items=100).feed(b'{"a": [[[1]]]}')
    JSONShape(max_depth=3, max_items=100).feed(b'{"a": [[1]], "b": "[[[[[["}')
    with pytest.raises(APIError, match="more than 5 items"):
        JSONShape(max_depth=3, max_items=5).feed(b"[1,2,3,4,5,6]")


def test_serve_flags_set_the_limits():
    args = build_parser().parse_args(["serve"])
    assert request_limits(args) == RequestLimits()
    args = build_parser().parse_args(["serve", "--max-body-size", "1MiB", "--max-prompts-per-request", "8",
                                      "--max-request-tokens", "4096"])
    assert request_limits(args) == RequestLimits(max_body_bytes=1 << 20, max_prompts=8, max_request_tokens=4096)
    with pytest.raises(ValueError, match="max_prompts must be positive"):
        request_limits(build_parser().parse_args(["serve", "--max-prompts-per-request", "0"]))


def test_no_text_has_fewer_tokens_than_its_bytes_over_the_longest_token(engine_and_info):
    """The bound that lets a long prompt be refused untokenized: tokens >= bytes / max_token_bytes."""
    engine, info = engine_and_info
    rng = random.Random(0)
    pieces = ["the", " quick", " brown fox", "  ", "\n\n", "\t", "é", "😀", "ß", "12345", "<|im_start|>",
              "<|im_end|>", "def f(x):", "aaaaaaaa", " " * 9, "ǅ"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        num_tokens = len(engine.tokenizer.encode(text, add_special_tokens=False))
        assert num_tokens * info.max_token_bytes >= len(text.encode("utf-8")), text


def test_the_step_token_budget_is_a_flag():
    def budget(*flags: str) -> int:
        return engine_config(build_parser().parse_args(["serve", *flags])).max_num_batched_tokens

    assert budget() == 1024 and budget("--max-num-batched-tokens", "256") == 256
    assert budget("--max-num-seqs", "2048") == 2048
    with pytest.raises(ValueError, match="at least max_num_seqs"):
        budget("--max-num-seqs", "64", "--max-num-batched-tokens", "32")

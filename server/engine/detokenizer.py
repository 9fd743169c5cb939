"""Incremental detokenisation and stop strings.

Text grows token by token without re-decoding the whole output: decode a short window ending at the
new token and keep what it adds beyond the window's previous text (a window holding a partial UTF-8
character waits for the next token). Stop strings are matched on the text; the part of the text
that could still become a stop string is held back, so a stop string is never shown.
"""
from server.engine.sequence import Sequence

REPLACEMENT_CHAR = "\ufffd"


def detokenize_incrementally(tokenizer, seq: Sequence) -> str:
    """Append the text of seq's newest token to seq.text; returns the new characters."""
    ids = seq.token_ids
    prefix_text = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset])
    full_text = tokenizer.decode(ids[seq.prefix_offset:])
    if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
        new_text = full_text[len(prefix_text):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        seq.text += new_text
        return new_text
    return ""


def find_stop_string(text: str, num_new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends within the last num_new_chars characters: (index, stop)."""
    best = None
    for stop in stops:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of text that are the start of some stop string."""
    hold = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:length]):
                hold = length
                break
    return hold

"""Detokenisation, stop strings, stop tokens, EOS and min_tokens."""
from server.engine.detokenizer import detokenize_incrementally, find_stop_string, held_back
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Request, Sequence
from tests.engine.helpers import random_prompts

SAMPLED = dict(max_tokens=40, temperature=1.5, seed=4, ignore_eos=True, early_exit=False)


def test_incremental_detokenisation_equals_full_decode(tiny):
    tokenizer = tiny.tokenizer
    text = "Héllo, naïve café! 😀 ü ß def f(x):\n    return x * 2\n  spaces   and\ttabs"
    ids = tokenizer.encode(text)
    seq = Sequence(0, Request("r", tokenizer.encode("the cat"), SamplingParams()), 0, [])
    pieces = []
    for token in ids:
        seq.token_ids.append(token)
        pieces.append(detokenize_incrementally(tokenizer, seq))
    assert "".join(pieces) == seq.text == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)  # a split character waits for its last byte


def test_stop_string_helpers():
    assert find_stop_string("abc STOP def", 4, ["STOP"]) is None  # ends before the new characters
    assert find_stop_string("abc STOP def", 5, ["STOP", "c S"]) == (4, "STOP")
    assert find_stop_string("abc STOP def", 8, ["STOP", "c S"]) == (2, "c S")  # the earliest wins
    assert held_back("hello wor", ["world", "xyz"]) == 3 and held_back("hello", ["world"]) == 0


def _streamed(engine, prompt, params):
    engine.add_request("r", prompt, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    return outputs


def test_stop_string_is_never_shown(make_engine):
    prompt = random_prompts([7], seed=12)[0]
    free = make_engine().generate([prompt], SamplingParams(**SAMPLED))[0].outputs[0]
    text = free.text
    start = len(text) // 2
    stop = text[start:start + 3]
    first = text.find(stop)
    outputs = _streamed(make_engine(), prompt, SamplingParams(**SAMPLED, stop=["zzzz", stop]))
    final = outputs[-1].outputs[0]
    assert final.text == text[:first] and final.finish_reason == "stop" and final.stop_reason == stop
    for output in outputs:  # every streamed text is a prefix of the final one: nothing is taken back
        assert final.text.startswith(output.outputs[0].text) and stop not in output.outputs[0].text
    assert final.token_ids == free.token_ids[:len(final.token_ids)]


def test_stop_token_and_min_tokens(make_engine):
    prompt = random_prompts([7], seed=12)[0]
    free = make_engine().generate([prompt], SamplingParams(**SAMPLED))[0].outputs[0]
    stop_token = free.token_ids[5]
    index = free.token_ids.index(stop_token)
    got = make_engine().generate([prompt], SamplingParams(**SAMPLED, stop_token_ids=[stop_token]))[0].outputs[0]
    assert got.token_ids == free.token_ids[:index + 1]
    assert (got.finish_reason, got.stop_reason) == ("stop", stop_token)
    late = make_engine().generate([prompt], SamplingParams(**SAMPLED, stop_token_ids=[stop_token],
                                                           min_tokens=index + 3))[0].outputs[0]
    assert stop_token not in late.token_ids[:index + 2]  # suppressed, not merely ignored
    assert len(late.token_ids) >= index + 3


def test_eos_stops_unless_ignored(make_engine):
    prompt = random_prompts([7], seed=12)[0]
    engine = make_engine()
    free = engine.generate([prompt], SamplingParams(**SAMPLED))[0].outputs[0]
    eos = free.token_ids[8]
    engine.eos_token_ids = engine.runner.eos_token_ids = [eos]  # the tiny model never says <|im_end|> by itself
    params = dict(SAMPLED, ignore_eos=False)
    got = engine.generate([prompt], SamplingParams(**params))[0].outputs[0]
    assert got.token_ids == free.token_ids[:free.token_ids.index(eos) + 1] and got.finish_reason == "stop"
    assert got.stop_reason is None
    assert engine.generate([prompt], SamplingParams(**SAMPLED))[0].outputs[0].token_ids == free.token_ids
    held = engine.generate([prompt], SamplingParams(**params, min_tokens=30))[0].outputs[0]
    assert eos not in held.token_ids[:29]

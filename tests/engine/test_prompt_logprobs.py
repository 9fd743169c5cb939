"""Prompt logprobs equal the model's own teacher-forced log-softmax, whatever the chunking, the batch,
early exit of other rows, n > 1 or preemption; logits are never made for more than SUB_CHUNK rows.

Tolerance: both sides are fp32 on the CPU and differ only in how attention is evaluated (paged
store vs one dense causal matmul) and in batch shapes, so about 1e-6 apart; 1e-4 is far below
any difference that would mean a wrong row or a wrong target (those are >= 0.01 on this model).
With int4 weights (the `tiny` fixture's second run) every projection's input is rounded to bf16 for the
kernel, so a 1e-6 difference can move one activation by a bf16 step (2^-8 relative): about 4e-4 in the
logprobs was seen, and 2e-3 still sits 5x below a wrong row's 0.01.
"""
import pytest
import torch

from server.engine import prompt_logprobs
from server.engine.sampling_params import SamplingParams, SamplingParamsError
from server.model.quantize import is_quantized
from tests.engine.helpers import random_prompts

ATOL, ATOL_QUANTIZED = 1e-4, 2e-3


def teacher_forced(model, prompt: list[int]) -> torch.Tensor:
    """[T, V] log-softmax of the full model at each position (row p predicts token p + 1)."""
    with torch.inference_mode():
        return model(torch.tensor([prompt]))[0].float().log_softmax(-1)


def assert_matches_model(model, prompt, recorded, num_top):
    assert len(recorded) == len(prompt) and recorded[0] is None
    expected = teacher_forced(model, prompt)
    atol = ATOL_QUANTIZED if is_quantized(model) else ATOL
    for p, entry in enumerate(recorded[1:]):
        assert entry.token_id == prompt[p + 1]
        assert entry.logprob == pytest.approx(float(expected[p, prompt[p + 1]]), abs=atol), p
        assert entry.rank == int((expected[p] > expected[p, prompt[p + 1]]).sum()) + 1, p
        values, tokens = expected[p].topk(num_top)
        assert list(entry.top) == tokens.tolist(), p  # best first
        assert list(entry.top.values()) == pytest.approx(values.tolist(), abs=atol)


def test_chunked_prefill_gives_the_full_models_logprobs(make_engine, tiny):
    engine = make_engine(max_num_batched_tokens=32, max_num_seqs=8)  # the 150-token prompt runs in 5 chunks
    prompts = random_prompts([150, 9, 2], seed=3)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=4)
    outputs = engine.generate(prompts, params)
    for prompt, output in zip(prompts, outputs):
        assert_matches_model(tiny.model, prompt, output.prompt_logprobs, 4)


def test_other_rows_exiting_early_change_nothing(make_engine, tiny):
    """A prompt prefilled while other requests decode with early exit (eps 0.9 exits at 2 and 4)."""
    engine = make_engine(max_num_batched_tokens=24, max_num_seqs=8)
    decoding = random_prompts([5, 7, 6], seed=11)
    for i, prompt in enumerate(decoding):
        engine.add_request(f"decode-{i}", prompt, SamplingParams(max_tokens=40, temperature=0, exit_epsilon=0.9,
                                                                 ignore_eos=True))
    for _ in range(3):
        engine.step()
    prompt = random_prompts([70], seed=12)[0]
    engine.add_request("scored", prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2,
                                                        exit_epsilon=0.9))
    final, exited = None, 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            exited += output.num_tokens_exited_early if output.finished else 0
            if output.request_id == "scored" and output.finished:
                final = output
    assert exited > 0  # the decode rows did leave early meanwhile
    assert_matches_model(tiny.model, prompt, final.prompt_logprobs, 2)


def test_n_choices_share_one_computation(make_engine, tiny, monkeypatch):
    engine = make_engine()
    prompt = random_prompts([30], seed=4)[0]
    rows_computed = []
    compute = prompt_logprobs.compute

    def counting(model, hidden, rows, *args):
        rows_computed.append(len(rows.rows))
        return compute(model, hidden, rows, *args)

    monkeypatch.setattr(prompt_logprobs, "compute", counting)
    (output,) = engine.generate([prompt], SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=1,
                                                         prompt_logprobs=0))
    assert sum(rows_computed) == len(prompt) - 1  # choice 0 only, each position once
    assert len(output.outputs) == 3
    assert_matches_model(tiny.model, prompt, output.prompt_logprobs, 0)


def test_preempted_prompts_record_each_position_once(make_engine, tiny):
    """Sequences preempted mid-prompt and mid-decode recompute their prompts; each prompt position
    is still recorded once, with the full model's value."""
    from server.engine.kv_cache import KVPool

    block_bytes = KVPool.bytes_per_block(tiny.config, 16, torch.float32)
    prompts = random_prompts([60, 45, 70, 30], seed=9)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, prompt_logprobs=1)
    tight = make_engine(kv_cache_memory=8 * block_bytes, max_num_batched_tokens=32, max_num_seqs=8)
    recorded_at_preemption = []  # (prompt logprobs recorded, prompt length) of each victim
    preempt = tight.scheduler.preempt

    def recording_preempt(seq):
        recorded_at_preemption.append((len(seq.request.prompt_logprobs), seq.num_prompt_tokens))
        preempt(seq)

    tight.scheduler.preempt = recording_preempt
    for i, prompt in enumerate(prompts):
        tight.add_request(str(i), prompt, params)
    final = {}
    while tight.has_unfinished_requests():
        for output in tight.step():
            if output.finished:
                final[output.request_id] = output
    assert any(1 < done < length for done, length in recorded_at_preemption)  # mid-prompt
    assert any(done == length for done, length in recorded_at_preemption)  # mid-decode
    for i, prompt in enumerate(prompts):
        assert_matches_model(tiny.model, prompt, final[str(i)].prompt_logprobs, 1)


def test_logits_are_made_one_sub_chunk_at_a_time(tiny):
    """The memory bound: final_logits never sees more than sub_chunk rows, and the answer does not
    depend on the sub-chunk size."""
    model = tiny.model
    prompt = random_prompts([40], seed=2)[0]
    hidden = torch.randn(39, model.config.hidden_size)

    class Owner:
        index, num_prompt_tokens, token_ids = 0, len(prompt), prompt
        params = SamplingParams(prompt_logprobs=3)
        request = type("R", (), {"prompt_logprobs": [None]})()

    rows = prompt_logprobs.PromptRows()
    rows.add(Owner, first_row=0, start=0, end=len(prompt))
    assert rows.rows == list(range(39)) and rows.targets == prompt[1:]
    seen = []
    original = model.final_logits
    model.final_logits = lambda h: (seen.append(len(h)), original(h))[1]
    try:
        with torch.inference_mode():
            small = prompt_logprobs.compute(model, hidden, rows, sub_chunk=8)[0][1]
            whole = prompt_logprobs.compute(model, hidden, rows, sub_chunk=1000)[0][1]
    finally:
        del model.final_logits
    assert seen[:5] == [8, 8, 8, 8, 7] and seen[5:] == [39]
    for a, b in zip(small, whole):
        assert (a.token_id, list(a.top)) == (b.token_id, list(b.top))
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_prompt_logprobs_over_the_limit_is_refused():
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(prompt_logprobs=21)
    assert err.value.param == "prompt_logprobs"

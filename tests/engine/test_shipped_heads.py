"""The shipped head set on the real default model (slow): at every shipped ε a request's output does not
depend on what else is in the batch, and it equals the reference generator's early-exit path.

"Alone" runs each request by itself; "together" runs 8 at once (staggered arrivals, so prefill and
decode rows mix). Both are greedy. Exact equality is asserted: the exit decision is per row (the
default, no whole-batch gate), so a row's tokens and exit layers can only differ through the float
sums of a different batch shape, ~1e-6 on margins and logits; a margin or a top-2 gap that close to a
threshold or a tie did not occur on these prompts, and if it ever did the test would name the request.
"""
import pytest

from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine, load_heads
from server.engine.sampling_params import SamplingParams
from server.model.generate import generate as reference_generate
from tests.engine.helpers import run_staggered

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
             "Explain in two sentences why the sky is blue.", "Translate 'good morning' into Spanish.",
             "Write a Python function that reverses a string.", "Tell me a very short story about a cat.",
             "What are the first five planets from the sun?"]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def shipped(smollm2):
    heads = load_heads("auto", smollm2)
    assert heads is not None, "the default model ships a head set"
    return heads


def run(smollm2, heads, prompts, epsilon, arrivals):
    engine = LLMEngine(smollm2.model, smollm2.tokenizer, EngineConfig(max_num_seqs=8, max_model_len=1024), heads)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, exit_epsilon=epsilon)
    final = run_staggered(engine, prompts, params, arrivals)
    assert engine.block_manager.num_used_blocks == 0
    return [final[str(i)] for i in range(len(prompts))]  # RequestOutput


@pytest.mark.slow
def test_shipped_heads_are_batch_invariant_and_equal_the_reference(smollm2, shipped):
    tokenizer = smollm2.tokenizer
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    num_layers = smollm2.model.num_layers
    left_early = 0  # tokens that left before the last layer or skipped the full LM head
    for eps in shipped.epsilons():
        together = run(smollm2, shipped, prompts, eps, arrivals=[0, 0, 1, 1, 2, 3, 5, 8])
        for i, prompt in enumerate(prompts):
            alone = run(smollm2, shipped, [prompt], eps, arrivals=[0])[0]
            a, t = alone.outputs[0], together[i].outputs[0]
            assert (t.token_ids, t.exit_layers) == (a.token_ids, a.exit_layers), (eps, i)
            assert together[i].num_tokens_lm_head_skipped == alone.num_tokens_lm_head_skipped, (eps, i)
            expected = reference_generate(smollm2.model, prompt, MAX_TOKENS, eos_token_ids=tokenizer.eos_token_ids,
                                          heads=shipped, thresholds=shipped.thresholds(eps))
            assert (a.token_ids, a.exit_layers) == (expected.token_ids, expected.exit_layers), (eps, i)
            left_early += alone.num_tokens_lm_head_skipped + sum(layer < num_layers for layer in a.exit_layers)
    assert left_early > 0, "no token left early at any shipped epsilon: the shipped set does nothing"

"""The engine on the real default model (slow): greedy outputs equal the reference generator."""
import pytest

from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.model.generate import generate as reference_generate
from tests.engine.helpers import run_staggered

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
             "Give me a short recipe for pancakes with a list of ingredients and numbered steps."]


@pytest.mark.slow
def test_engine_equals_reference_generate_on_smollm2(smollm2):
    tokenizer = smollm2.tokenizer
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    prompts[-1] = prompts[-1] * 3  # a long prompt, prefilled in chunks
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=96, max_model_len=1024)
    engine = LLMEngine(smollm2.model, tokenizer, config, None)
    params = SamplingParams(max_tokens=24, temperature=0, early_exit=False)
    final = run_staggered(engine, prompts, params, arrivals=[0, 2, 5, 9])
    for i, prompt in enumerate(prompts):
        expected = reference_generate(smollm2.model, prompt, 24, eos_token_ids=tokenizer.eos_token_ids)
        assert final[str(i)].outputs[0].token_ids == expected.token_ids, i
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.slow
def test_engine_early_exit_equals_reference_on_smollm2(smollm2):
    """Logit-lens heads at layers 12 and 20 with synthetic margin thresholds (not calibrated)."""
    from server.model.exit_head import AdapterSpec
    from server.model.exit_heads import ExitHeadSet

    heads = ExitHeadSet.create(smollm2.model, [12, 20], AdapterSpec("norm"),
                               {"name": smollm2.name, "fingerprint": smollm2.fingerprint})
    heads.set_calibration("margin", {0.9: {"thresholds": {12: 0.6, 20: 0.3}}}, default_epsilon=0.9, synthetic=True)
    tokenizer = smollm2.tokenizer
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    config = EngineConfig(max_num_seqs=8, max_model_len=1024)
    engine = LLMEngine(smollm2.model, tokenizer, config, heads)
    final = run_staggered(engine, prompts, SamplingParams(max_tokens=24, temperature=0), arrivals=[0, 1, 1, 3])
    exited = 0
    for i, prompt in enumerate(prompts):
        expected = reference_generate(smollm2.model, prompt, 24, eos_token_ids=tokenizer.eos_token_ids,
                                      heads=heads, thresholds=heads.thresholds(0.9))
        got = final[str(i)].outputs[0]
        assert (got.token_ids, got.exit_layers) == (expected.token_ids, expected.exit_layers), i
        exited += sum(layer < 30 for layer in got.exit_layers)
    assert exited >= 10

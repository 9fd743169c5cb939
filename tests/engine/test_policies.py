"""Exit policies other than margin, taken from the head set (server/engine/exit_policies.py)."""
import copy

import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from tests.engine.helpers import context_cache, random_prompts, run_staggered


def heads_with_policy(tiny_heads, policy, thresholds, params=None):
    heads = copy.deepcopy(tiny_heads)
    heads.set_calibration(policy, {0.5: {"thresholds": thresholds}}, default_epsilon=0.5,
                          **({"policy_params": params} if params else {}))
    return heads


def engine_for(tiny, heads):
    return LLMEngine(tiny.model, tiny.tokenizer, EngineConfig(model="tiny", max_num_seqs=16), heads)


@torch.inference_mode()
def test_maxprob_policy_decides_every_exit(tiny, tiny_heads):
    heads = heads_with_policy(tiny_heads, "maxprob", {2: 0.999, 4: 0.8})
    model, num_layers = tiny.model, tiny.config.num_hidden_layers
    engine = engine_for(tiny, heads)
    engine.add_request("a", random_prompts([9], seed=15)[0], SamplingParams(max_tokens=100, temperature=0,
                                                                          ignore_eos=True))
    for _ in range(25):
        engine.step()
    seq = engine.requests["a"].seqs[0]
    seen = set()
    for i in range(len(seq.exit_layers) - 1):
        exit_layer, position = seq.exit_layers[i + 1], seq.num_prompt_tokens + i
        cache, pos = context_cache(engine, seq, position), torch.tensor([position])
        hidden, done = model.embed(torch.tensor([seq.token_ids[position]])), 0
        for layer, threshold in heads.thresholds(0.5).items():
            if layer > exit_layer:
                break
            hidden = model.run_layers(hidden, pos, done, layer, cache.at(pos))
            done = layer
            max_prob = float(heads.head(layer).logits(hidden, model.lm_head.weight).softmax(-1).max())
            assert (max_prob >= threshold) == (layer == exit_layer), (i, layer, max_prob)
        seen.add(exit_layer)
    assert seen == {2, 4, num_layers}  # every kind of decision was checked


@pytest.mark.parametrize("policy, thresholds, params", [("monotonic", {2: 0.999, 4: 0.5}, {"min_layer": 2}),
                                                        ("saturation", {2: 0.72, 4: 0.77}, None),
                                                        ("entropy", {2: -0.01, 4: -1.0}, None)])
def test_stateful_policies_are_batch_invariant(tiny, tiny_heads, policy, thresholds, params):
    heads = heads_with_policy(tiny_heads, policy, thresholds, params)
    prompts = random_prompts([5, 12, 20, 8, 3, 30], seed=16)
    sampling = [SamplingParams(max_tokens=12 + i, temperature=0, ignore_eos=True, early_exit=i != 2)
                for i in range(6)]
    together = run_staggered(engine_for(tiny, heads), prompts, sampling, arrivals=[0, 0, 1, 2, 4, 4])
    layers = []
    for i in range(6):
        alone = engine_for(tiny, heads).generate([prompts[i]], sampling[i])[0].outputs[0]
        got = together[str(i)].outputs[0]
        assert (got.token_ids, got.exit_layers) == (alone.token_ids, alone.exit_layers), i
        layers += got.exit_layers[1:]
    assert len(set(layers)) >= 2  # thresholds give a mix, so the policy decided something

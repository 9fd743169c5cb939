"""lm-evaluation-harness through a real `offramp serve` (tiny model), offline, on the repo's local
tasks: its log-likelihoods are the model's own, its generations are the engine's.

lm-eval runs in process through `simple_evaluate`, the function its command line calls, with the
same `local-completions` model and model_args; only the task index is limited to the repo's
folder (the command line indexes every built-in task first, which takes most of a minute).
bench/lm_eval_run.py runs the command line itself on the real model.

Tolerance: lm-eval sums per-token logprobs the server computed in fp32; the direct forward is fp32
too and differs only in the attention path, about 1e-6 per token, so 1e-4 per token.
"""
import pytest
import requests

from bench.lm_eval_run import (GENERATE_TASK, LOGLIKELIHOOD_TASK, OFFLINE_ENV, TASKS_DIR, direct_loglikelihood,
                               encode_pair, write_hf_tokenizer)
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.model.loader import load_model

lm_eval = pytest.importorskip("lm_eval")
NUM_DOCS = 4


@pytest.fixture(scope="module")
def tiny_loaded(tiny_folders):
    return load_model(str(tiny_folders[0]))


def evaluate(server, tokenizer_dir, gen_kwargs: str) -> dict:
    from lm_eval.tasks import TaskManager

    model_args = (f"base_url={server.url}/v1/completions,tokenizer_backend=huggingface,tokenizer={tokenizer_dir},"
                  "model=tiny")
    return lm_eval.simple_evaluate(
        model="local-completions", model_args=model_args, tasks=[LOGLIKELIHOOD_TASK, GENERATE_TASK],
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False), limit=NUM_DOCS,
        gen_kwargs=gen_kwargs, log_samples=True, random_seed=None, numpy_random_seed=None, torch_random_seed=None)


def test_lm_eval_runs_through_the_server(server, tiny_loaded, tmp_path, monkeypatch):
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    tokenizer_dir = write_hf_tokenizer(tiny_loaded.tokenizer, tmp_path / "tokenizer")
    out = evaluate(server, tokenizer_dir, "early_exit=False")
    results, samples = out["results"], out["samples"]
    assert 0.0 <= results[LOGLIKELIHOOD_TASK]["acc,none"] <= 1.0
    assert 0.0 <= results[GENERATE_TASK]["exact_match,none"] <= 1.0
    assert len(samples[LOGLIKELIHOOD_TASK]) == len(samples[GENERATE_TASK]) == NUM_DOCS

    encode = tiny_loaded.tokenizer.encode
    scored = 0
    for sample in samples[LOGLIKELIHOOD_TASK]:
        for argument, response in zip(sample["arguments"], sample["resps"]):
            served, served_greedy = response[0]  # (sum of token_logprobs[ctxlen:-1], is_greedy)
            context_ids, continuation_ids = encode_pair(encode, *argument)
            direct, direct_greedy = direct_loglikelihood(tiny_loaded.model, context_ids, continuation_ids)
            assert served == pytest.approx(direct, abs=1e-4 * len(continuation_ids))
            assert served_greedy == direct_greedy
            scored += 1
    assert scored == 4 * NUM_DOCS  # four endings per story

    engine = LLMEngine(tiny_loaded.model, tiny_loaded.tokenizer, EngineConfig(model="tiny"))
    for sample in samples[GENERATE_TASK]:
        ((context, gen_kwargs),) = sample["arguments"]
        params = SamplingParams(temperature=0, max_tokens=gen_kwargs["max_gen_toks"],
                                stop=[*gen_kwargs["until"], "<|im_end|>"])
        (direct,) = engine.generate([encode(context)], params)
        assert sample["resps"][0][0] == direct.outputs[0].text


def test_early_exit_reaches_the_server_through_gen_kwargs(server, tiny_loaded, tmp_path, monkeypatch):
    """eps 0.9 lets the tiny model's tokens exit at layers 2 and 4: lm-eval's extra generation
    arguments arrive as Offramp's body fields, and the answers may differ from full depth."""
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    tokenizer_dir = write_hf_tokenizer(tiny_loaded.tokenizer, tmp_path / "tokenizer")
    payloads = []
    post = requests.post  # what local-completions sends with, one request at a time

    def recording_post(url, json=None, **kwargs):
        payloads.append(json)
        return post(url, json=json, **kwargs)

    monkeypatch.setattr(requests, "post", recording_post)
    out = evaluate(server, tokenizer_dir, "early_exit=True,exit_epsilon=0.9")
    assert 0.0 <= out["results"][GENERATE_TASK]["exact_match,none"] <= 1.0
    generate = [p for p in payloads if not p.get("echo")]
    score = [p for p in payloads if p.get("echo")]
    assert len(generate) == NUM_DOCS and all(p["exit_epsilon"] == 0.9 and p["early_exit"] is True for p in generate)
    assert len(score) == 4 * NUM_DOCS
    assert all(p["max_tokens"] == 1 and p["logprobs"] == 1 and isinstance(p["prompt"][0], list) for p in score)

"""Reference generation: one sequence, a contiguous KV cache, no scheduler.

This is the correctness oracle for the serving engine, not the serving path. With `heads`
and `thresholds` it also runs early exit the plain way (one token at a time, KV of skipped
layers filled from the exit hidden state), which calibration uses for on-policy checks.
"""
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from server.model.llama import ContiguousKVCache, LlamaForCausalLM


@dataclass
class GenerationResult:
    token_ids: list[int]
    exit_layers: list[int] = field(default_factory=list)  # per generated token; L = full depth
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


def sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """logits [V] -> token id; temperature 0 is greedy."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model: LlamaForCausalLM, prompt_ids: list[int], max_tokens: int, *, temperature: float = 0.0,
             seed: int | None = None, eos_token_ids: list[int] = (), heads=None,
             thresholds: dict[int, float] | None = None, gate_cuts: dict[int, float] | None = None,
             on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Generate up to max_tokens after prompt_ids at full depth, or with early exit when
    `heads` (an ExitHeadSet) and per-layer `thresholds` (margin; inf = off) are given; with
    `gate_cuts` a head is evaluated only where its gate probe scores >= the cut (-inf = no gate)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    device, dtype = model.device, model.dtype
    num_layers = model.num_layers
    cache = ContiguousKVCache(model.config, len(prompt_ids) + max_tokens, device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    exits = sorted(k for k, t in (thresholds or {}).items() if math.isfinite(t)) if heads is not None else []

    start = time.perf_counter()
    positions = torch.arange(len(prompt_ids), device=device)
    hidden = model.run_layers(model.embed(torch.tensor(prompt_ids, device=device)), positions, 0, num_layers,
                              cache.at(positions))
    logits = model.final_logits(hidden[-1:])[0]
    result = GenerationResult([])
    while True:
        token = sample_token(logits, temperature, generator)
        result.token_ids.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos_token_ids or len(result.token_ids) >= max_tokens:
            break
        position = torch.tensor([len(prompt_ids) + len(result.token_ids) - 1], device=device)
        logits, exit_layer = _decode_one(model, token, position, cache, heads, exits, thresholds, gate_cuts or {})
        result.exit_layers.append(exit_layer)
    result.seconds = time.perf_counter() - start
    # exit_layers[i] is the depth that produced token i+1; the first token comes from the prefill.
    result.exit_layers.insert(0, num_layers)
    result.exit_layers = result.exit_layers[:len(result.token_ids)]
    return result


def _decode_one(model, token, position, cache, heads, exits, thresholds, gate_cuts):
    """One decode step; returns (logits [V] of the next token, depth that produced them). A shortlist
    head decides over its listed tokens and "other" (never exiting on "other"); its logits come back
    as [V] with -inf outside the list. A head at layer L decides after the last layer."""
    num_layers = model.num_layers
    cache.at(position)
    hidden = model.embed(torch.tensor([token], device=position.device))
    done = 0
    for layer in exits:
        hidden = model.run_layers(hidden, position, done, layer, cache)
        done = layer
        head = heads.head(layer)
        cut = gate_cuts.get(layer, -math.inf)
        if math.isfinite(cut) and float(head.gate_score(hidden)[0]) < cut:
            continue
        if head.has_shortlist:
            scores = head.shortlist_logits(hidden)[0]  # [K + 1], "other" last
            logits = torch.full((model.config.vocab_size,), float("-inf"), device=scores.device)
            logits[head.shortlist_ids] = scores[:-1]
            probs = torch.softmax(scores, dim=-1)
            if int(probs.argmax()) == len(scores) - 1:
                continue
        else:
            logits = head.logits(hidden, model.head_weight)[0]
            probs = torch.softmax(logits.float(), dim=-1)
        top2 = probs.topk(2).values
        if float(top2[0] - top2[1]) >= thresholds[layer]:
            for deeper in range(layer, num_layers):  # fill the KV the skipped layers would have written
                cache.write(deeper, *model.layer_kv(deeper, hidden, position))
            return logits, layer
    hidden = model.run_layers(hidden, position, done, num_layers, cache)
    return model.final_logits(hidden)[0], num_layers

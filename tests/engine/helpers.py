"""Helpers shared by the engine tests."""
import torch

from server.model.llama import ContiguousKVCache


def random_prompts(lengths, seed=0, vocab=300) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def run_staggered(engine, prompts, params, arrivals) -> dict[str, list]:
    """Add prompt i before step arrivals[i]; run to the end. Returns request id -> final RequestOutput."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    final, step = {}, 0
    while len(final) < len(prompts):
        for i, arrival in enumerate(arrivals):
            if arrival == step:
                engine.add_request(str(i), prompts[i], params[i])
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
        step += 1
        assert step < 10_000
    return final


def context_cache(engine, seq, upto: int) -> ContiguousKVCache:
    """A contiguous cache holding the pool's K/V of positions [0, upto) of seq, all layers."""
    config = engine.model_config
    cache = ContiguousKVCache(config, upto + 1)
    slots = torch.tensor(engine.block_manager.slots(seq, 0, upto))
    for layer in range(config.num_hidden_layers):
        cache.k[layer, :upto] = engine.pool.k[layer].flatten(0, 1)[slots]
        cache.v[layer, :upto] = engine.pool.v[layer].flatten(0, 1)[slots]
    return cache

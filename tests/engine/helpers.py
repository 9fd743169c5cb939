"""Helpers shared by the engine tests."""
import torch


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

"""Token choice from logits: greedy, temperature, top-k, top-p, per-row seeds, logprobs.

Sampling is Gumbel-max keyed by a per-row seed, with the exit kernel's own noise: a token sampled
here from the final layer and one sampled by the kernel at an exit head follow the same recipe, and
a row's draw depends on nothing but its seed, so a seeded request is reproducible in any batch.
Each step's row seed comes from the sequence's torch.Generator (seeded with seed + choice index).
"""
from dataclasses import dataclass

import torch

from kernels.exit_head import filter_top_k_top_p, gumbel_noise, inverse_temperature


@dataclass
class SamplingTensors:
    """Per-row controls for R rows, on the CPU."""
    temperature: torch.Tensor  # [R] f32, 0 = greedy
    top_k: torch.Tensor  # [R] int64, 0 = off
    top_p: torch.Tensor  # [R] f32, 1 = off
    seeds: torch.Tensor  # [R] int64
    num_logprobs: torch.Tensor  # [R] int64, top alternatives to report; 0 = only the chosen token's; -1 = no logprobs
    suppressed: list[list[int]]  # per row, token ids that may not be chosen (EOS before min_tokens)

    @property
    def all_greedy(self) -> bool:
        return not bool((self.temperature > 0).any())

    def rows(self, index: torch.Tensor) -> "SamplingTensors":
        picked = [self.suppressed[i] for i in index.tolist()]
        return SamplingTensors(self.temperature[index], self.top_k[index], self.top_p[index], self.seeds[index],
                               self.num_logprobs[index], picked)


@dataclass
class SamplerOutput:
    token: torch.Tensor  # [R] int64
    logprob: torch.Tensor  # [R] f32: temperature-1 log-softmax of the chosen token
    top_tokens: torch.Tensor | None = None  # [R, n] int64 (-1 pads rows that asked for fewer)
    top_logprobs: torch.Tensor | None = None  # [R, n] f32 (-inf pads)


def sample(logits: torch.Tensor, controls: SamplingTensors) -> SamplerOutput:
    """logits [R, V] -> one token per row."""
    logits = logits.float()
    if any(controls.suppressed):
        logits = logits.clone()  # never write into the caller's logits
    for row, banned in enumerate(controls.suppressed):
        if banned:
            logits[row, banned] = float("-inf")
    token = logits.argmax(-1)
    if not controls.all_greedy:
        rows = (controls.temperature > 0).nonzero()[:, 0]
        device_rows = rows.to(logits.device)
        scaled = logits[device_rows] * inverse_temperature(controls.temperature[rows]).to(logits.device)[:, None]
        scaled = filter_top_k_top_p(scaled, controls.top_k[rows], controls.top_p[rows])
        noise = gumbel_noise(controls.seeds[rows].to(logits.device), logits.shape[1])
        token[device_rows] = (scaled + noise).argmax(-1)
    out = SamplerOutput(token, torch.zeros(len(token)))
    if not bool((controls.num_logprobs >= 0).any()):
        return out
    logprobs = logits.log_softmax(-1)  # [R, V]
    out.logprob = logprobs.gather(-1, token[:, None])[:, 0]
    n = int(controls.num_logprobs.max())
    if n > 0:
        values, tokens = logprobs.topk(n, dim=-1)
        keep = (torch.arange(n)[None, :] < controls.num_logprobs[:, None]).to(logits.device)
        out.top_logprobs, out.top_tokens = values.masked_fill(~keep, float("-inf")), tokens.masked_fill(~keep, -1)
    return out

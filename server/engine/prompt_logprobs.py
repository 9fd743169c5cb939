"""Prompt logprobs: log P(prompt token p + 1 | tokens <= p) for every prompt token, for `echo` with
`logprobs` and vLLM's `prompt_logprobs`.

Prompt tokens run every layer in prefill, so the last-layer hidden state of prompt row p gives the
full model's distribution over the token at p + 1 (early exit never touches these numbers). The
first prompt token has no context and no logprob.

Only choice 0 of a request computes them (its choices share the prompt), and a position is computed
once: when a preempted sequence recomputes its prompt, positions already recorded are skipped.

Memory: the forward hands back [H, d] hidden states of the wanted rows (H <= one prefill chunk, at
most max_num_batched_tokens rows: 1024 x 576 x 4 bytes = 2.4 MB for SmolLM2 in fp32). Logits are made
SUB_CHUNK rows at a time and each row keeps only its token's logprob, its rank and its top-n, so the
peak is per block, whatever the prompt's length: the [SUB_CHUNK, V] logits (in fp16/bf16 also their
f32 copy), one f32 temporary of that size inside logsumexp, and a [SUB_CHUNK, V] bool for the rank.
For V = 49,152 in fp32: 2 x 25.2 MB + 6.3 MB = 57 MB (bf16: 69 MB). Never [prompt_len, V].
"""
from dataclasses import dataclass, field

import torch

from server.engine.outputs import TokenLogprob
from server.engine.sequence import Request, Sequence

SUB_CHUNK = 128  # rows per logits block


@dataclass
class PromptRows:
    """The rows of one step whose last hidden state yields a prompt token's logprob, ascending."""
    rows: list[int] = field(default_factory=list)  # row ids within the step
    targets: list[int] = field(default_factory=list)  # per row: the prompt token it predicts (position + 1)
    num_top: list[int] = field(default_factory=list)  # per row: top alternatives wanted
    requests: list[Request] = field(default_factory=list)  # per row

    def add(self, seq: Sequence, first_row: int, start: int, end: int) -> None:
        """A prefill chunk of `seq` covering positions [start, end) at rows first_row...: takes the
        positions whose next prompt token has no logprob recorded yet."""
        recorded = seq.request.prompt_logprobs
        if seq.index != 0 or recorded is None:
            return
        positions = range(max(start, len(recorded) - 1), min(end, seq.num_prompt_tokens - 1))
        self.rows += [first_row + p - start for p in positions]
        self.targets += [seq.token_ids[p + 1] for p in positions]
        self.num_top += [seq.params.prompt_logprobs] * len(positions)
        self.requests += [seq.request] * len(positions)

    def mask(self, num_rows: int) -> torch.Tensor | None:
        """[num_rows] bool marking these rows, or None when there are none (the common case)."""
        if not self.rows:
            return None
        mask = torch.zeros(num_rows, dtype=torch.bool)
        mask[self.rows] = True
        return mask


def compute(model, hidden: torch.Tensor, prompt_rows: PromptRows,
            sub_chunk: int = SUB_CHUNK) -> list[tuple[Request, list[TokenLogprob]]]:
    """hidden [H, d]: last-layer hidden states of prompt_rows' rows, in the same order. Returns per
    request its new prompt-token logprobs, in position order (temperature-1 log-softmax, as vLLM)."""
    targets = torch.tensor(prompt_rows.targets, dtype=torch.long, device=hidden.device)
    n = max(prompt_rows.num_top)
    token_logprob, token_rank, top_tokens, top_logprobs = [], [], [], []
    for start in range(0, len(hidden), sub_chunk):
        logits = model.final_logits(hidden[start:start + sub_chunk]).float()  # [S, V]
        normaliser = logits.logsumexp(-1)  # [S]
        target_logit = logits.gather(-1, targets[start:start + sub_chunk, None])  # [S, 1]
        token_logprob.append(target_logit[:, 0] - normaliser)
        token_rank.append((logits > target_logit).sum(-1) + 1)  # a [S, V] bool temporary, a quarter of the logits
        if n > 0:
            values, tokens = logits.topk(n, dim=-1)  # [S, n]
            top_logprobs.append(values - normaliser[:, None])
            top_tokens.append(tokens)
        del logits  # freed before the next block is made, so the peak stays one block
    logprob, rank = torch.cat(token_logprob).tolist(), torch.cat(token_rank).tolist()
    tops = (torch.cat(top_tokens).tolist(), torch.cat(top_logprobs).tolist()) if n > 0 else None
    grouped: dict[int, tuple[Request, list[TokenLogprob]]] = {}
    for i, (target, k, request) in enumerate(zip(prompt_rows.targets, prompt_rows.num_top, prompt_rows.requests)):
        top = dict(zip(tops[0][i][:k], tops[1][i][:k])) if tops is not None and k > 0 else {}
        grouped.setdefault(id(request), (request, []))[1].append(TokenLogprob(target, logprob[i], top, rank[i]))
    return list(grouped.values())

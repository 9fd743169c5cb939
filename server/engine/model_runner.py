"""Turns a scheduled batch into tensors, runs the early-exit forward, samples, and prices each token.

Prefill rows run at full depth (every layer's K/V is context for what follows); decode rows run
with early exit. The first token of a sequence comes from its prompt's last row at full depth.
"""
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from server.engine import early_exit, prompt_logprobs
from server.engine.block_manager import BlockManager
from server.engine.kv_cache import KVPool, PagedKVStore, StepMetadata
from server.engine.outputs import TokenLogprob
from server.engine.sampler import SamplerOutput, SamplingTensors, sample
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Request, Sequence
from server.model.costs import CostModel
from server.model.exit_heads import ExitHeadSet
from server.model.llama import LlamaForCausalLM


@dataclass
class StepInputs:
    """One step's rows as tensors. Rows: one per decode sequence, then each prefill chunk's tokens;
    sequences: `seqs` in the same order (decode first), num_decode of them decoding."""
    seqs: list[Sequence]
    num_decode: int
    input_ids: torch.Tensor  # [N] int64 on the model's device
    positions: torch.Tensor  # [N] int64 on the model's device
    meta: StepMetadata
    plan: early_exit.StepPlan
    controls: SamplingTensors  # per sequence of `seqs`
    row_seq: torch.Tensor  # [N] int64 on the CPU: index into `seqs` of each row's sequence
    prompt_rows: prompt_logprobs.PromptRows = field(default_factory=prompt_logprobs.PromptRows)


@dataclass
class StepOutput:
    """Tokens produced in one step, one entry per sequence that got a token, in row order."""
    seqs: list[Sequence] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)  # decode tokens: what it cost; first tokens: 0
    flops_full_depth: list[float] = field(default_factory=list)  # the same token at full depth, no heads
    lm_head_skipped: list[bool] = field(default_factory=list)  # decode tokens that never ran the full LM head
    margins: list[tuple[int, float]] = field(default_factory=list)
    deepest_layer: int = 0
    forward_seconds: float = 0.0  # inside the model, the exit kernel and the sampler
    # per request whose prompt rows ran: its new prompt-token logprobs, in position order
    prompt_logprobs: list[tuple[Request, list[TokenLogprob]]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, heads: ExitHeadSet | None, pool: KVPool,
                 block_manager: BlockManager, eos_token_ids: list[int], gate_whole_batch: bool = True):
        self.model = model
        self.gate_whole_batch = gate_whole_batch
        self.heads = heads
        self.pool = pool
        self.block_manager = block_manager
        self.eos_token_ids = eos_token_ids
        self.policy = exit_policy(heads)
        self.device = model.lm_head.weight.device
        self.num_layers = model.num_layers
        self.num_heads = len(heads.layers) if heads is not None else 0
        meta = heads.meta if heads is not None else {}
        self.costs = CostModel.from_config(model.config, head_kind=meta.get("head_kind", "norm"),
                                           adapter_rank=meta.get("adapter_rank", 0))
        self.head_costs = np.array(heads.evaluation_flops(self.costs) if heads is not None else [], dtype=np.float64)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepOutput:
        inputs = self.prepare(batch)
        start = time.perf_counter()
        result = early_exit.forward(self.model, self.heads, PagedKVStore(self.pool, inputs.meta), inputs.input_ids,
                                    inputs.positions, inputs.plan, self.policy)
        final_seq = inputs.row_seq[result.final_rows]
        final = sample(result.final_logits, inputs.controls.rows(final_seq)) if len(final_seq) else None
        final_tokens = final.token.tolist() if final is not None else []  # the step's one device sync
        prompt = (prompt_logprobs.compute(self.model, result.final_hidden, inputs.prompt_rows)
                  if result.final_hidden is not None else [])  # a second sync, only when prompt logprobs are asked
        forward_seconds = time.perf_counter() - start
        out = self.collect(inputs, result, final_seq.tolist(), final_tokens, final)
        out.forward_seconds = forward_seconds
        out.prompt_logprobs = prompt
        return out

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Rows, KV slots and attention metadata of the step, and each row's exit plan."""
        decode, prefill = batch.decode_seqs, batch.prefill_seqs
        # sequences that may take a token now: every decode row, and prefills that finish a fresh prompt
        first_token = [end == seq.prefill_target and seq.num_output_tokens == 0
                       for seq, (_, end) in zip(prefill, batch.prefill_chunks)]
        input_ids, positions, slots, depths = [], [], [], []
        row_seq = list(range(len(decode)))
        needs_logits = [True] * len(decode)
        prompt_rows = prompt_logprobs.PromptRows()
        for seq in decode:
            input_ids.append(seq.token_ids[-1])
            positions.append(seq.num_tokens - 1)
            slots += self.block_manager.slots(seq, seq.num_tokens - 1, seq.num_tokens)
        for i, (seq, (start, end), first) in enumerate(zip(prefill, batch.prefill_chunks, first_token)):
            prompt_rows.add(seq, len(input_ids), start, end)
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += self.block_manager.slots(seq, start, end)
            depths += ([self.num_layers] * (end - start) if not seq.num_output_tokens
                       else [seq.input_exit_layer(p, self.num_layers) for p in range(start, end)])
            row_seq += [len(decode) + i] * (end - start)
            needs_logits += [False] * (end - start - 1) + [first]
        meta = StepMetadata.build(slots, [s.block_table for s in decode], [s.num_tokens for s in decode],
                                  [s.block_table for s in prefill], batch.prefill_chunks,
                                  self.pool.block_size, self.device)
        controls = self._controls(decode + prefill, [True] * len(decode) + first_token)
        num_decode = len(decode)
        plan = early_exit.StepPlan(
            thresholds=torch.tensor([s.thresholds for s in decode]).float().view(num_decode, self.num_heads),
            gate_cuts=torch.tensor([s.gate_cuts for s in decode]).float().view(num_decode, self.num_heads),
            gate_whole_batch=self.gate_whole_batch,
            controls=controls.rows(torch.arange(num_decode)), prefill_depths=torch.tensor(depths, dtype=torch.long),
            needs_logits=torch.tensor(needs_logits, dtype=torch.bool), needs_hidden=prompt_rows.mask(len(input_ids)))
        to_device = lambda values: torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)
        return StepInputs(decode + prefill, num_decode, to_device(input_ids), to_device(positions), meta, plan,
                          controls, torch.tensor(row_seq, dtype=torch.long), prompt_rows)

    def _controls(self, seqs: list[Sequence], draws: list[bool]) -> SamplingTensors:
        """Per-sequence sampling controls; a row seed is drawn only for a sequence that takes a token now,
        so each sequence's generator advances once per token whatever the batch looks like."""
        params = [s.params for s in seqs]
        seeds = [s.next_row_seed() if draw and p.temperature > 0 else 0 for s, p, draw in zip(seqs, params, draws)]
        return SamplingTensors(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
            top_k=torch.tensor([max(p.top_k, 0) for p in params], dtype=torch.long),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            seeds=torch.tensor(seeds, dtype=torch.long),
            num_logprobs=torch.tensor([-1 if p.logprobs is None else p.logprobs for p in params], dtype=torch.long),
            suppressed=[s.suppressed_token_ids(self.eos_token_ids) for s in seqs])

    def collect(self, inputs: StepInputs, result: early_exit.ExitResult, final_seq: list[int],
                final_tokens: list[int], final: SamplerOutput | None) -> StepOutput:
        """One entry per sequence that got a token: from its exit head, or from the final logits."""
        chosen = {}  # index into inputs.seqs -> (token, logprob, (top tokens, top logprobs) | None)
        if final is not None:
            final_logprob = final.logprob.tolist()
            top_tokens = final.top_tokens.tolist() if final.top_tokens is not None else None
            top_logprobs = final.top_logprobs.tolist() if final.top_tokens is not None else None
            for i, index in enumerate(final_seq):
                chosen[index] = (final_tokens[i], final_logprob[i], top_tokens and (top_tokens[i], top_logprobs[i]))
        head_logprob = result.head_logprob.tolist()
        for i, token in enumerate(result.head_token.tolist()):
            if token >= 0:
                chosen[i] = (token, head_logprob[i], result.head_top.get(i))
        num_decode = inputs.num_decode
        context = [s.num_tokens for s in inputs.seqs[:num_decode]]
        flops, full, ran_lm_head = token_costs(self.costs, self.head_costs, result, context)
        exit_layers = result.exit_layers.tolist()
        out = StepOutput(margins=result.margins, deepest_layer=max(exit_layers, default=0))
        for index in sorted(chosen):
            seq, (token, logprob, top) = inputs.seqs[index], chosen[index]
            is_decode = index < num_decode
            out.seqs.append(seq)
            out.token_ids.append(token)
            out.exit_layers.append(exit_layers[index] if is_decode else self.num_layers)
            out.flops.append(float(flops[index]) if is_decode else 0.0)
            out.flops_full_depth.append(float(full[index]) if is_decode else 0.0)
            out.lm_head_skipped.append(bool(is_decode and not ran_lm_head[index]))
            if seq.logprobs is None:
                out.logprobs.append(None)
            else:
                n = seq.params.logprobs
                alternatives = dict(zip(top[0][:n], top[1][:n])) if top else {}
                out.logprobs.append(TokenLogprob(token, logprob, alternatives))
        return out


def token_costs(costs: CostModel, per_head: np.ndarray, result: early_exit.ExitResult, context_lens: list[int]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per decode row: (FLOPs its token cost, FLOPs it would cost at full depth without heads, whether
    it ran the full LM head). Counted: the layers run, each head and gate evaluated (per_head [E]: the
    FLOPs of one evaluation of each head), the KV fill of the layers skipped, and the final norm and
    LM head for the rows that reached them (not for a row that left at a head after the last layer)."""
    num_decode = len(context_lens)
    ran_lm_head = np.zeros(num_decode, dtype=bool)
    final_rows = result.final_rows.numpy()
    ran_lm_head[final_rows[final_rows < num_decode]] = True
    if not num_decode:
        return np.zeros(0), np.zeros(0), ran_lm_head
    context = np.asarray(context_lens)
    spent = costs.token_flops(result.exit_layers.numpy(), context_len=context,
                              gates_evaluated=result.gates_evaluated.numpy().sum(1),
                              head_flops=result.heads_evaluated.numpy().astype(np.float64) @ per_head,
                              full_head=ran_lm_head)
    return np.atleast_1d(spent), np.atleast_1d(costs.full_depth_flops(context)), ran_lm_head


def exit_policy(heads: ExitHeadSet | None):
    """The head set's exit policy (server/engine/exit_policies.py), or None for margin, which the exit
    kernel decides itself."""
    if heads is None or heads.policy == "margin":
        return None
    from server.engine.exit_policies import get_policy

    return get_policy(heads.policy, heads.policy_params)

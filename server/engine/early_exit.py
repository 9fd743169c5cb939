"""One forward step with per-token early exit.

Rows of the step are tokens: [0, D) decode rows (one per decoding sequence; D = num_decode_rows),
[D, N) prefill rows (prompt chunks, or the tokens of a preempted sequence being recomputed). The
layers run in segments that end at the exit layers of the head set; a head at layer L (after the
last layer) decides before the LM head does.

Invariants, at every point of `forward`:
  live        original row ids of the rows still running, ascending (so decode rows come first);
              `hidden` [n_live, d], `positions` [n_live] and `store` hold exactly these rows.
  num_decode  how many of the live rows are decode rows (live[:num_decode] < D).
  left        rows that have left: the hidden state they left with, their positions and pool slots.
              Before each deeper layer runs, its K/V for all of them is computed from that hidden
              state (input norm, k/v projections, RoPE) and written to the pool, one batched call
              per layer, so later tokens attend to them as if they had run every layer.
  policy_state  per live decode row, the memory of a stateful exit policy (None for margin).

At exit layer k: decode rows with a finite threshold at k whose gate passes (score >= the row's
gate cut; a cut of -inf means no gate) ask the exit kernel (rows with
early_exit off carry +inf everywhere and are never asked); rows whose decision says exit leave
with the kernel's token (a token that min_tokens forbids keeps the row going). Prefill rows whose
recorded depth is k leave too: a recomputed token goes exactly as deep as it went the first time,
so recomputing a preempted sequence reproduces its cache. At a head after the last layer only
decode rows are asked, and a row that exits there has nothing deeper to fill: it skips just the
full LM head. After the last layer the live decode rows, and the prefill rows that yield a first
token, take the final norm and LM head, only those rows; their logits go to the sampler. Rows
marked `needs_hidden` (prompt rows whose logprobs are wanted: full depth, so always live at the
end) hand back their last-layer hidden state.
"""
from dataclasses import dataclass, field

import torch

from kernels.exit_head import exit_head
from server.engine.kv_cache import PagedKVStore
from server.engine.sampler import SamplingTensors
from server.model.exit_heads import ExitHeadSet
from server.model.llama import LlamaForCausalLM


@dataclass
class StepPlan:
    """What each row of one step may do: decode rows' thresholds, gate cuts and sampling controls,
    prefill rows' depths, and which rows want final logits."""
    thresholds: torch.Tensor  # [D, E] f32 per decode row and head (in layer order); inf = never exit there
    gate_cuts: torch.Tensor  # [D, E] f32: ask the head only where gate score >= cut; -inf = no gate
    controls: SamplingTensors  # per decode row, for the kernel's sampling at an exit
    prefill_depths: torch.Tensor  # [P] int64: how deep each prefill row runs (L for prompt tokens)
    needs_logits: torch.Tensor  # [N] bool: rows whose final logits are wanted if they reach the end
    gate_whole_batch: bool = False  # a gated head is asked only if every live decode row is asked and passes
    needs_hidden: torch.Tensor | None = None  # [N] bool: full-depth rows whose last hidden state is wanted


@dataclass
class ExitResult:
    exit_layers: torch.Tensor  # [D] int64: layer each decode row left at (L = it ran every layer)
    heads_evaluated: torch.Tensor  # [D, E] bool: head e (layer order) was evaluated for the row
    gates_evaluated: torch.Tensor  # [D, E] bool: head e's gate probe ran for the row
    head_token: torch.Tensor  # [D] int64: the token chosen at an exit head (-1 for rows that ran the LM head)
    head_logprob: torch.Tensor  # [D] f32
    final_rows: torch.Tensor  # [R] int64: original rows whose logits follow: the only rows that ran the LM head
    final_logits: torch.Tensor  # [R, V]
    head_top: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)  # row -> top logprobs
    margins: list[tuple[int, float]] = field(default_factory=list)  # (layer, margin) per head evaluation
    final_hidden: torch.Tensor | None = None  # [H, d] the needs_hidden rows after the last layer, in row order

    @classmethod
    def start(cls, num_decode_rows: int, num_heads: int, num_layers: int, no_logits: torch.Tensor) -> "ExitResult":
        """Before any exit: every decode row at full depth, nothing evaluated; no_logits [0, V]."""
        none = lambda: torch.zeros(num_decode_rows, num_heads, dtype=torch.bool)
        return cls(exit_layers=torch.full((num_decode_rows,), num_layers), heads_evaluated=none(),
                   gates_evaluated=none(), head_token=torch.full((num_decode_rows,), -1),
                   head_logprob=torch.zeros(num_decode_rows), final_rows=torch.zeros(0, dtype=torch.long),
                   final_logits=no_logits)


@dataclass
class LeftRows:
    hidden: torch.Tensor  # [F, d] hidden state each row left with
    positions: torch.Tensor  # [F]
    slots: torch.Tensor  # [F] pool slots of their tokens

    def add(self, hidden, positions, slots) -> "LeftRows":
        return LeftRows(torch.cat([self.hidden, hidden]), torch.cat([self.positions, positions]),
                        torch.cat([self.slots, slots]))


def forward(model: LlamaForCausalLM, heads: ExitHeadSet | None, store: PagedKVStore, input_ids: torch.Tensor,
            positions: torch.Tensor, plan: StepPlan, policy=None) -> ExitResult:
    num_layers, num_rows, num_decode_rows = model.num_layers, input_ids.shape[0], plan.thresholds.shape[0]
    device = input_ids.device
    hidden = model.embed(input_ids)  # [N, d]
    live, num_decode = torch.arange(num_rows), num_decode_rows  # on the CPU: they drive Python decisions
    policy_state = policy.init_state(hidden[:num_decode]) if policy is not None else None  # rows = live decode rows
    left = LeftRows(hidden[:0], positions[:0], store.meta.slots[:0])
    head_layers = heads.layers if heads is not None else []
    result = ExitResult.start(num_decode_rows, len(head_layers), num_layers,
                              hidden.new_zeros(0, model.config.vocab_size))
    done = 0
    for layer in sorted({*head_layers, num_layers}):
        hidden = _run_segment(model, hidden, positions, store, done, layer, left)
        done = layer
        if layer not in head_layers or not len(live):
            continue
        head_index = head_layers.index(layer)
        leave = torch.zeros(len(live), dtype=torch.bool)
        decode_rows = live[:num_decode]
        asked = decode_rows[torch.isfinite(plan.thresholds[decode_rows, head_index])]
        asked = _pass_gate(heads.head(layer), hidden[:num_decode], decode_rows, asked, head_index, plan, result)
        if len(asked):
            leave[:num_decode] = _ask_head(model, heads.head(layer), hidden[:num_decode], decode_rows, asked,
                                           head_index, plan, result, policy, policy_state)
        if layer < num_layers:  # at the end every prefill row stays: it may want logits or its hidden state
            leave[num_decode:] = plan.prefill_depths[live[num_decode:] - num_decode_rows] == layer
        if leave.any():
            gone, keep = leave.to(device), (~leave).to(device)
            if layer < num_layers:  # after the last layer there is no deeper K/V to fill
                left = left.add(hidden[gone], positions[gone], store.meta.slots[gone])
                store = store.select(~leave)
            hidden, positions = hidden[keep], positions[keep]
            if policy_state is not None:
                policy_state = policy_state.select(keep[:num_decode])
            live, num_decode = live[~leave], int((~leave[:num_decode]).sum())
    wanted = plan.needs_logits[live]
    result.final_rows = live[wanted]
    if len(result.final_rows):
        result.final_logits = model.final_logits(hidden[wanted.to(device)])
    if plan.needs_hidden is not None:
        result.final_hidden = hidden[plan.needs_hidden[live].to(device)]
    return result


def _run_segment(model, hidden, positions, store, start: int, end: int, left: LeftRows) -> torch.Tensor:
    """Layers [start, end) for the live rows; before each one, its K/V for the rows that left."""
    if not len(left.slots):
        return model.run_layers(hidden, positions, start, end, store) if len(hidden) else hidden
    for layer in range(start, end):
        fill_kv(model, store, layer, left)
        if len(hidden):
            hidden = model.run_layers(hidden, positions, layer, layer + 1, store)
    return hidden


def fill_kv(model, store: PagedKVStore, layer: int, left: LeftRows) -> None:
    """Layer `layer`'s K/V for every row that left before it, written to the pool at their own slots.

    The K/V come from the hidden state each row left with: the layer's input norm, its k and v
    projections and RoPE at the row's own position, one batched call for all of them. A later token
    then attends to an exited token at this layer as if it had run every layer (CALM's state
    propagation); without it, deeper layers would attend to whatever a slot held before."""
    store.pool.write(layer, left.slots, *model.layer_kv(layer, left.hidden, left.positions))


def _pass_gate(head, hidden, rows, asked, head_index, plan, result) -> torch.Tensor:
    """The asked rows (original ids, ascending) whose gate lets them ask the head: those with no gate
    (cut -inf) and those whose gate score [n] on their hidden state reaches their cut; with
    gate_whole_batch, all of them or none. The gate only saves head evaluations; the threshold
    still decides every exit."""
    if head.gate is None or not len(asked):  # the common case (no gate probes) costs nothing here
        return asked
    cuts = plan.gate_cuts[asked, head_index]
    gated = torch.isfinite(cuts)
    if not bool(gated.any()):
        return asked
    position = torch.searchsorted(rows, asked[gated]).to(hidden.device)
    score = head.gate_score(hidden[position]).cpu()
    result.gates_evaluated[asked[gated], head_index] = True
    keep = ~gated
    keep[gated] = score >= cuts[gated]
    if plan.gate_whole_batch and not (bool(keep.all()) and len(asked) == len(rows)):
        return asked[:0]
    return asked[keep]


def _ask_head(model, head, hidden, rows, asked, head_index, plan, result, policy, policy_state) -> torch.Tensor:
    """Exit decision at one head for the live decode rows `rows` (original ids; hidden [len(rows), d]),
    evaluated on the `asked` subset. Records tokens and statistics; returns the leave mask [len(rows)].
    The margin policy is the kernel's own exit flag; another policy scores the kernel's decision. A
    shortlist head reads its own [K, d] rows and estimates the rest; its "other" (token -1) never exits."""
    position = torch.searchsorted(rows, asked)  # where each asked row sits among the live decode rows
    device_position = position.to(hidden.device)
    thresholds = plan.thresholds[asked, head_index].to(hidden.device)
    controls = plan.controls.rows(asked)
    sampled = not controls.all_greedy
    logprob_rows = controls.num_logprobs > 0
    shortlist = dict(token_ids=head.shortlist_ids, other_logit=head.mass) if head.has_shortlist else {}
    decision = exit_head(
        hidden[device_position], head.norm_weight, head.bound_weight if head.has_shortlist else model.head_weight,
        thresholds, eps=head.eps, **shortlist,
        temperature=controls.temperature if sampled else None, seed=controls.seeds if sampled else None,
        adapter=head.adapted if head.adapter is not None else None,
        top_k=controls.top_k if bool((controls.top_k > 0).any()) else None,
        top_p=controls.top_p if bool((controls.top_p < 1).any()) else None,
        num_logprobs=controls.num_logprobs.clamp(min=0) if bool(logprob_rows.any()) else None)
    if policy is None:
        exits = decision.exit.cpu()
    else:  # decide on the asked subset; rows not asked keep their memory unchanged
        asked_state = policy_state.select(device_position)
        exits = policy.decide(decision, hidden[device_position], asked_state, thresholds, head.layer).cpu()
        policy_state.assign(device_position, asked_state)
    token = decision.token.cpu()
    exits &= token >= 0  # "other": the head cannot say which token (the kernel's own flag already knows)
    for i, banned in enumerate(controls.suppressed):  # EOS before min_tokens: such a row does not exit here
        if banned and exits[i] and int(token[i]) in banned:
            exits[i] = False
    result.heads_evaluated[asked, head_index] = True
    result.margins.extend(zip([head.layer] * len(asked), decision.margin.tolist()))
    gone = asked[exits]
    result.exit_layers[gone] = head.layer
    result.head_token[gone] = token[exits]
    result.head_logprob[gone] = decision.logprob.cpu()[exits]
    if decision.top_tokens is not None:
        for i in exits.nonzero()[:, 0].tolist():
            n = int(controls.num_logprobs[i])
            top = (decision.top_tokens[i, :n].tolist(), decision.top_logprobs[i, :n].tolist())
            result.head_top[int(asked[i])] = top
    leave = torch.zeros(len(rows), dtype=torch.bool)
    leave[position[exits]] = True
    return leave

"""Fit exit heads on a frozen model. One forward of the frozen model over the fitting data gives
everything the heads learn from (no gradient through it); only the heads train.

States cache (`collect_states`), per counted position: the hidden state after k layers at every
candidate layer (float16) and the final distribution's top-K tokens and probabilities. The mass
outside the top-K is kept as one remainder bucket, so the KL target is p truncated to K tokens
plus "everything else" (K = 32 holds all but a few percent of the mass on chat replies).

Losses per position, p = the final distribution, q = the head's:
  kl            KL(p || q) = sum_topK p_i log(p_i / q_i) + r log(r / q_rest)     (the default)
  ce-entropy:λ  CE(q, argmax p) - λ H(q), the self-supervised recipe of arXiv 2407.21082; λ > 0
                rewards entropy where the head cannot match the final top-1, keeping its margin
                low on the tokens it would get wrong; λ < 0 sharpens every margin.

Shortlist softmax: q is normalised over a shortlist of the vocabulary (the tokens seen in the
cached top-K, most probable first, capped), not over all V tokens. The d x V projection is nearly
the whole cost of a step and the shortlist divides it by V / |shortlist|; targets outside the
shortlist count as remainder. A shallow head's top-1 is mostly a token no final top-K ever holds,
so optionally (refresh_rows > 0) every refresh_every steps the tokens the heads currently rank highest over the full vocabulary
on a few random positions join the shortlist (hard negatives). Calibration and evaluation use the
full vocabulary, so anything the shortlist still misses costs agreement there and is caught.

Gates (optional, `fit_gates`): per head, a logistic probe on the normalised hidden state, fitted
to the trained head's full-vocabulary margin on the cached positions (soft labels).
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from calibration.data import Sample, batches
from server.model.llama import rms_norm

LOSSES = ("kl", "ce-entropy")


@dataclass
class StateCache:
    layers: list[int]
    hidden: torch.Tensor  # [N, H, d] float16, hidden state after layers[h] decoder layers
    top_ids: torch.Tensor  # [N, K] int64, the final distribution's K most probable tokens, descending
    top_probs: torch.Tensor  # [N, K] float32, their probabilities (remainder = 1 - sum)
    is_reply: torch.Tensor | None = None  # [N] bool: the position is in a chat reply (else in text)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def save(self, path) -> None:
        torch.save({"layers": self.layers, "hidden": self.hidden, "top_ids": self.top_ids.int(),
                    "top_probs": self.top_probs, "is_reply": self.is_reply}, path)

    @classmethod
    def load(cls, path) -> "StateCache":
        state = torch.load(path, weights_only=True)
        return cls(state["layers"], state["hidden"], state["top_ids"].long(), state["top_probs"], state.get("is_reply"))


@torch.no_grad()
def collect_states(model, samples: list[Sample], layers: list[int], *, top_k: int = 32, batch_tokens: int = 2048,
                   shard_dir: Path | None = None, progress=None) -> StateCache:
    """Run the frozen model over the samples once and keep what the heads learn from.

    shard_dir: each batch's states are saved there as it finishes, so a killed run resumes."""
    device = model.lm_head.weight.device
    parts = []
    for index, (group, ids, mask, counted) in enumerate(batches(samples, batch_tokens)):
        shard = shard_dir / f"states-{index:05d}.pt" if shard_dir is not None else None
        if shard is not None and shard.is_file():
            parts.append(StateCache.load(shard))
        else:
            logits, hidden = model.forward(ids.to(device), mask.to(device), output_hidden_states=True)
            where = counted.to(device)
            probs = torch.softmax(logits[where].float(), dim=-1)  # [n, V]
            top_probs, top_ids = probs.topk(top_k, dim=-1)
            states = torch.stack([hidden[k][where] for k in layers], dim=1).half().cpu()  # [n, H, d]
            is_reply = torch.tensor([samples[i].source == "reply" for i in group for _ in samples[i].counted])
            parts.append(StateCache(layers, states, top_ids.cpu(), top_probs.cpu(), is_reply))
            if shard is not None:
                shard.parent.mkdir(parents=True, exist_ok=True)
                parts[-1].save(shard)
        if progress is not None:
            progress.update(sum(len(samples[i].counted) for i in group))
    return StateCache(layers, torch.cat([p.hidden for p in parts]), torch.cat([p.top_ids for p in parts]),
                      torch.cat([p.top_probs for p in parts]), torch.cat([p.is_reply for p in parts]))


@dataclass
class FitConfig:
    loss: str = "kl"  # kl | ce-entropy:LAMBDA
    steps: int = 300
    batch_size: int = 256  # positions per step (every head sees the same ones)
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_shortlist: int = 8192
    refresh_every: int = 50  # steps between hard-negative refreshes of the shortlist
    refresh_rows: int = 0  # cached positions each refresh looks at (0 = no hard negatives)
    seed: int = 0
    entropy_weight: float = field(init=False, default=0.0)

    def __post_init__(self):
        name, _, arg = self.loss.partition(":")
        if name not in LOSSES or (name == "kl" and arg):
            raise ValueError(f"unknown loss {self.loss!r}; expected kl or ce-entropy:LAMBDA")
        if name == "ce-entropy":
            try:
                self.entropy_weight = float(arg or 0.0)
            except ValueError:
                raise ValueError(f"ce-entropy:LAMBDA needs a number, got {arg!r}") from None
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be at least 1")

    @property
    def loss_kind(self) -> str:
        return self.loss.partition(":")[0]


def shortlist(cache: StateCache, max_size: int) -> torch.Tensor:
    """[S] token ids: those in the cached top-K, by total probability mass, at most max_size."""
    mass = torch.zeros(int(cache.top_ids.max()) + 1).index_add_(0, cache.top_ids.flatten(), cache.top_probs.flatten())
    ids = torch.nonzero(mass).flatten()
    ids = ids[mass[ids].argsort(descending=True)][:max_size]
    return ids.sort().values


def head_loss(logits: torch.Tensor, target_pos: torch.Tensor, target_probs: torch.Tensor, kind: str,
              entropy_weight: float = 0.0) -> torch.Tensor:
    """logits [B, S] over the shortlist; target_pos [B, K] index into it (-1 = not listed);
    target_probs [B, K] descending, target_pos[:, 0] the final top-1 (listed) -> mean loss."""
    logq = torch.log_softmax(logits.float(), dim=-1)  # [B, S]
    listed = target_pos >= 0
    logq_top = logq.gather(1, target_pos.clamp(min=0)) * listed  # [B, K]
    if kind == "ce-entropy":
        entropy = -(logq.exp() * logq).sum(-1)
        return (-logq_top[:, 0] - entropy_weight * entropy).mean()
    p = target_probs * listed
    q_top = (logq_top.exp() * listed).sum(-1)
    remainder = (1 - p.sum(-1)).clamp(min=0)
    log_q_rest = torch.log1p(-q_top.clamp(max=1 - 1e-6))
    kl = (p * (torch.log(p.clamp(min=1e-12)) - logq_top)).sum(-1)
    kl = kl + remainder * (torch.log(remainder.clamp(min=1e-12)) - log_q_rest)
    return kl.mean()


def fit_heads(heads, lm_head_weight: torch.Tensor, cache: StateCache, config: FitConfig, progress=None) -> list[dict]:
    """Train the heads of the set on the cache (in place): norm and adapter of every head before the last
    layer (a head after it reads through the model's own final norm, and the mass estimators and gates
    are fitted apart). Returns the loss history (one entry per 10 steps)."""
    device = lm_head_weight.device
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    listed_ids = shortlist(cache, config.max_shortlist)
    trained = [head for head in heads.heads.values() if head.layer < heads.num_layers]
    columns = [cache.layers.index(head.layer) for head in trained]
    params = [p for head in trained for name, p in head.named_parameters()
              if p.requires_grad and not name.startswith(("mass.", "gate."))]
    if not params:
        return []
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / config.steps)))
    heads.train()
    history = []
    for step in range(config.steps):
        if step % config.refresh_every == 0:
            if step and config.refresh_rows:
                listed_ids = torch.cat([listed_ids, hard_negatives(heads, lm_head_weight, cache, columns, generator,
                                                                   config.refresh_rows)]).unique()
            position = torch.full((lm_head_weight.shape[0],), -1, dtype=torch.long)
            position[listed_ids] = torch.arange(len(listed_ids))
            weight = lm_head_weight.detach()[listed_ids.to(device)].float()  # [S, d]
        rows = torch.randint(len(cache), (config.batch_size,), generator=generator)
        target_pos = position[cache.top_ids[rows]].to(device)
        target_probs = cache.top_probs[rows].to(device)
        losses = {}
        for head, column in zip(trained, columns):
            hidden = cache.hidden[rows, column].to(device).float()
            logits = rms_norm(head.adapted(hidden), head.norm_weight, head.eps) @ weight.T
            losses[head.layer] = head_loss(logits, target_pos, target_probs, config.loss_kind, config.entropy_weight)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        schedule.step()
        values = {k: float(v.detach()) for k, v in losses.items()}
        if step % 10 == 0 or step == config.steps - 1:
            history.append({"step": step, "loss": values, "shortlist": len(listed_ids)})
        if progress is not None:
            progress.update(1)
            progress.set_postfix({f"loss{k}": f"{v:.3f}" for k, v in values.items()})
    heads.eval()
    return history


@torch.no_grad()
def hard_negatives(heads, lm_head_weight, cache: StateCache, columns, generator, num_rows: int, top: int = 4):
    """Tokens the heads now rank in their full-vocabulary top few on random cached positions:
    added to the shortlist so that training pushes them down too (a head's mistakes lie mostly
    outside the final model's top-K, where the shortlist would never look)."""
    rows = torch.randint(len(cache), (num_rows,), generator=generator)
    found = []
    for head, column in zip([h for h in heads.heads.values() if h.layer < heads.num_layers], columns):
        hidden = cache.hidden[rows, column].to(lm_head_weight.device).float()
        found.append(head.logits(hidden, lm_head_weight).topk(top, dim=-1).indices.flatten().cpu())
    return torch.cat(found)


@torch.no_grad()
def head_margins(heads, lm_head_weight: torch.Tensor, cache: StateCache, rows: torch.Tensor,
                 chunk: int = 512) -> torch.Tensor:
    """[H, n] top-2 margin of each head's full-vocabulary softmax at the given cached positions."""
    device = lm_head_weight.device
    out = []
    for head in heads.heads.values():
        column = cache.layers.index(head.layer)
        margins = []
        for start in range(0, len(rows), chunk):
            hidden = cache.hidden[rows[start:start + chunk], column].to(device).float()
            top2 = torch.softmax(head.logits(hidden, lm_head_weight).float(), dim=-1).topk(2).values
            margins.append((top2[:, 0] - top2[:, 1]).cpu())
        out.append(torch.cat(margins))
    return torch.stack(out)


def fit_gates(heads, lm_head_weight: torch.Tensor, cache: StateCache, *, num_tokens: int = 4096, steps: int = 400,
              lr: float = 0.05, seed: int = 0) -> dict[int, float]:
    """Add a gate probe to every head, fitted to predict its margin; returns each gate's mean
    absolute error on the positions it was fitted on."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(cache), generator=generator)[:num_tokens]
    margins = head_margins(heads, lm_head_weight, cache, rows)  # [H, n]
    heads.add_gates()
    errors = {}
    for (k, head), target in zip(heads.heads.items(), margins):
        hidden = cache.hidden[rows, cache.layers.index(head.layer)].float().to(lm_head_weight.device)
        target = target.to(hidden.device)
        optimizer = torch.optim.Adam(head.gate.parameters(), lr=lr)
        for _ in range(steps):
            normed = rms_norm(hidden, torch.ones(hidden.shape[1], device=hidden.device), head.eps)
            loss = F.binary_cross_entropy_with_logits(head.gate(normed)[:, 0], target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            errors[head.layer] = float((head.gate_score(hidden) - target).abs().mean())
    return errors

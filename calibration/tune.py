"""Depth-tuning: train the backbone (LoRA or all weights) together with the exit heads, so that
early layers learn to predict what the original model's last layer predicts.

Loss of one batch, over its non-padding tokens, with p = the original model's final distribution
(the teacher: the same weights with the deltas bypassed, or a frozen copy for full tuning):
  anchored (the default):  sum_k w_k KL(p || exit_k) + w_L KL(p || final) + beta KL(p || final)
  no anchor:               sum_k w_k CE(next token, exit_k) + w_L CE(next token, final)
The anchor's targets are p itself (self-distillation, no labels) and its beta term holds the tuned
final layer near the original whatever the weighting gives the final output; without it the
recipe is the seeds' (LayerSkip, CALM) training on the data's next tokens, and the tuned model
drifts towards the data. Agreement is always counted against p, never against the tuned model.

Layer dropout (LayerSkip): during training only, each sequence skips decoder layer i (0-based)
with a probability rising with depth up to p at the last layer.
"""
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from calibration.lora import attach_lora, lora_disabled, lora_state, load_lora_state
from server.model.exit_heads import ExitHeadSet
from server.model.llama import DenseCausalStore

WEIGHT_SCHEMES = ("uniform", "calm", "asym")
METHODS = ("lora", "full", "heads")


def exit_loss_weights(scheme: str, exit_layers: list[int], num_layers: int) -> dict[int, float]:
    """Loss weight per exit layer and the final layer L (summing to 1), as the seeds define them.

    uniform: every output alike. calm: weight of the output at layer k proportional to k.
    asym:a:  a on the shallowest exit, 1 - a on the final output, nothing on the exits between."""
    if len(set(exit_layers)) != len(exit_layers) or not all(1 <= k < num_layers for k in exit_layers):
        raise ValueError(f"exit layers must be distinct and in 1..{num_layers - 1}, got {exit_layers}")
    outputs = sorted(exit_layers) + [num_layers]
    name, _, arg = scheme.partition(":")
    if name == "uniform" and not arg:
        return {k: 1.0 / len(outputs) for k in outputs}
    if name == "calm" and not arg:
        return {k: k / sum(outputs) for k in outputs}
    if name == "asym":
        alpha = float(arg) if arg else 0.7
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"asym:alpha needs alpha in [0, 1], got {alpha}")
        weights = {k: 0.0 for k in outputs}
        weights[outputs[0]] += alpha
        weights[num_layers] += 1.0 - alpha
        return weights
    raise ValueError(f"unknown loss weighting {scheme!r}; expected uniform, calm or asym:ALPHA")


def layer_dropout_rates(num_layers: int, p: float, curve: str = "linear") -> list[float]:
    """Skip probability of each decoder layer (0-based), 0 at the first and p at the last.

    linear: p * i / (L - 1). exp (LayerSkip's exponential curve): p * (2 ** (i / (L - 1)) - 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"layer dropout must be in [0, 1), got {p}")
    if num_layers == 1:
        return [0.0]
    scale = [i / (num_layers - 1) for i in range(num_layers)]
    if curve == "linear":
        return [p * s for s in scale]
    if curve == "exp":
        return [p * (math.exp(s * math.log(2)) - 1) for s in scale]
    raise ValueError(f"unknown layer-dropout curve {curve!r}; expected linear or exp")


def parse_method(method: str) -> tuple[str, int]:
    """"lora:R" -> ("lora", R); "full"; "heads" (backbone frozen, heads only: the frozen-heads baseline)."""
    name, _, arg = method.partition(":")
    if name == "lora":
        rank = int(arg) if arg else 16
        if rank < 1:
            raise ValueError(f"lora:R needs R >= 1, got {rank}")
        return name, rank
    if name in ("full", "heads") and not arg:
        return name, 0
    raise ValueError(f"unknown method {method!r}; expected lora:RANK, full or heads")


def parse_anchor(anchor: str) -> float | None:
    """"kl:BETA" -> beta; "none" -> None."""
    if anchor == "none":
        return None
    name, _, arg = anchor.partition(":")
    if name != "kl" or not arg or float(arg) < 0:
        raise ValueError(f"--anchor must be kl:BETA (BETA >= 0) or none, got {anchor!r}")
    return float(arg)


@dataclass
class TuneConfig:
    layers: list[int]
    method: str = "lora:16"
    lora_alpha: float | None = None  # None = 2 * rank
    weights: str = "uniform"
    layer_dropout: float = 0.0
    dropout_curve: str = "linear"
    anchor: str = "kl:1.0"
    tokens: int = 1_000_000
    lr: float = 2e-4  # backbone (LoRA or full)
    head_lr: float = 1e-3
    warmup_tokens: int = 20_000
    max_grad_norm: float = 1.0
    seed: int = 0
    extra: dict = field(default_factory=dict)  # recorded, not interpreted (data sources, sequence length)

    def __post_init__(self):
        self.method_kind, self.rank = parse_method(self.method)
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.rank
        self.beta = parse_anchor(self.anchor)
        layer_dropout_rates(2, self.layer_dropout, self.dropout_curve)
        if self.tokens < 1:
            raise ValueError("--tokens must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)


def run_backbone(model, input_ids, attention_mask, keep_layers, dropout=None, generator=None):
    """input_ids / attention_mask [B, T] -> {layer k: hidden [B*T, d]} for k in keep_layers.

    dropout: per decoder layer (0-based) skip probability, drawn per sequence (training only)."""
    batch, length = input_ids.shape
    padded = not bool(attention_mask.all())
    positions = ((attention_mask.long().cumsum(-1) - 1).clamp(min=0)).reshape(-1)
    store = DenseCausalStore(batch, length, attention_mask if padded else None)
    hidden = model.embed(input_ids.reshape(-1))
    states = {}
    for i, layer in enumerate(model.model.layers):
        if dropout is not None and dropout[i] > 0:
            skip = torch.rand(batch, generator=generator) < dropout[i]  # [B]
            if not skip.all():
                rows = skip.to(hidden.device).repeat_interleave(length)[:, None]  # [B*T, 1]
                hidden = torch.where(rows, hidden, model.run_layers(hidden, positions, i, i + 1, store))
        else:
            hidden = model.run_layers(hidden, positions, i, i + 1, store)
        if i + 1 in keep_layers:
            states[i + 1] = hidden
    return states


class Tuner:
    """One model, its exit heads and their optimiser; `train_step(batch)` and checkpoint state."""

    def __init__(self, model, heads: ExitHeadSet, config: TuneConfig, teacher=None):
        self.model, self.heads, self.config = model, heads, config
        self.num_layers = model.config.num_hidden_layers
        self.layers = heads.layers
        self.weights = exit_loss_weights(config.weights, self.layers, self.num_layers)
        self.dropout = (layer_dropout_rates(self.num_layers, config.layer_dropout, config.dropout_curve)
                        if config.layer_dropout > 0 else None)
        self.device = model.lm_head.weight.device
        self.generator = torch.Generator().manual_seed(config.seed)
        self.teacher = teacher  # a frozen copy of the original (full tuning); None = bypass the deltas
        if config.method_kind == "lora":
            attach_lora(model, config.rank, config.lora_alpha)
            backbone = [p for n, p in model.named_parameters() if "lora_" in n]
        elif config.method_kind == "full":
            if teacher is None:
                raise ValueError("full tuning needs a frozen copy of the original model as teacher")
            backbone = [p for n, p in model.named_parameters()
                        if n.startswith("model.layers.") or n == "model.norm.weight"]
            for p in model.parameters():
                p.requires_grad_(False)
            for p in backbone:
                p.requires_grad_(True)
        else:
            backbone = []
            for p in model.parameters():
                p.requires_grad_(False)
        groups = [{"params": list(heads.parameters()), "lr": config.head_lr, "base_lr": config.head_lr}]
        if backbone:
            groups.append({"params": backbone, "lr": config.lr, "base_lr": config.lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.99))
        self.backbone = backbone
        self.tokens_seen, self.steps, self.batches_seen = 0, 0, 0
        self.autocast = self.device.type == "cuda"

    def lr_scale(self) -> float:
        """Linear warm-up over warmup_tokens, then cosine decay to 10% at the token budget."""
        cfg = self.config
        warm = min(1.0, (self.tokens_seen + 1) / max(cfg.warmup_tokens, 1))
        progress = min(1.0, self.tokens_seen / cfg.tokens)
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def reference_logits(self, input_ids, attention_mask=None):
        """[B*T, V] logits of the original model: the frozen copy, or this one with the deltas bypassed."""
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        model = self.teacher if self.teacher is not None else self.model
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=self.autocast), lora_disabled(model):
            final = run_backbone(model, input_ids, attention_mask, {self.num_layers})
            return model.final_logits(final[self.num_layers])

    def _teacher_logprobs(self, input_ids, attention_mask, valid):
        logits = self.reference_logits(input_ids, attention_mask)[valid]
        return F.log_softmax(logits.float(), dim=-1)  # [n, V]

    def losses(self, input_ids, attention_mask, train: bool = True):
        """(total loss, {term: float}, {layer: agreement with the original's top-1}) of one batch."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        valid = attention_mask.reshape(-1).bool()  # [B*T]
        teacher = self._teacher_logprobs(input_ids, attention_mask, valid)  # [n, V]
        target = teacher.argmax(-1)
        labels = torch.full_like(input_ids, -100)
        labels[:, :-1] = torch.where(attention_mask[:, 1:].bool(), input_ids[:, 1:], -100)
        labels = labels.reshape(-1)[valid]  # [n] next token, -100 where none
        keep = set(self.layers) | {self.num_layers}
        with torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
            states = run_backbone(self.model, input_ids, attention_mask, keep,
                                  self.dropout if train else None, self.generator)
        lm_head = self.model.lm_head.weight
        total, terms, agreement = 0.0, {}, {}
        for k in self.layers + [self.num_layers]:
            with torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
                hidden = states[k][valid]
                logits = (self.model.final_logits(hidden) if k == self.num_layers
                          else self.heads.head(k).logits(hidden, lm_head))
            logprobs = F.log_softmax(logits.float(), dim=-1)
            agreement[k] = float((logprobs.argmax(-1) == target).float().mean())
            if self.config.beta is None:
                loss = F.nll_loss(logprobs, labels, ignore_index=-100)
            else:
                loss = F.kl_div(logprobs, teacher, log_target=True, reduction="batchmean")
            terms[f"L{k}"] = float(loss.detach())
            weight = self.weights[k] + (self.config.beta or 0.0) * (k == self.num_layers)
            if weight:
                total = total + weight * loss
        return total, terms, agreement

    def train_step(self, input_ids, attention_mask) -> tuple[dict, dict]:
        self.model.train()
        self.heads.train()
        scale = self.lr_scale()
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale
        total, terms, agreement = self.losses(input_ids, attention_mask, train=True)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.steps += 1
        self.batches_seen += 1
        self.tokens_seen += int(attention_mask.sum())
        terms["loss"] = float(total.detach())
        return terms, agreement

    @torch.no_grad()
    def evaluate(self, batches) -> dict:
        """Mean agreement per output layer with the original's top-1, over batches of (ids, mask)."""
        self.model.eval()
        self.heads.eval()
        agreed, count = {}, 0
        for input_ids, attention_mask in batches:
            _, _, agreement = self.losses(input_ids, attention_mask, train=False)
            n = int(attention_mask.sum())
            for k, a in agreement.items():
                agreed[k] = agreed.get(k, 0.0) + a * n
            count += n
        return {k: v / count for k, v in agreed.items()}

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """What the delta file holds: LoRA A/B, or every trained tensor under its model name."""
        if self.config.method_kind == "lora":
            return lora_state(self.model)
        if self.config.method_kind == "full":
            names = {id(p): n for n, p in self.model.named_parameters()}
            return {names[id(p)]: p.detach().float().cpu() for p in self.backbone}
        return {}

    def state_dict(self) -> dict:
        return {"config": self.config.to_dict(), "backbone": self.backbone_state(),
                "heads": {k: v.cpu() for k, v in self.heads.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "tokens_seen": self.tokens_seen,
                "steps": self.steps, "batches_seen": self.batches_seen,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if self.config.method_kind == "lora":
            load_lora_state(self.model, state["backbone"])
        elif self.config.method_kind == "full":
            self.model.load_state_dict(state["backbone"], strict=False)
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_seen, self.steps = state["tokens_seen"], state["steps"]
        self.batches_seen = state["batches_seen"]
        self.generator.set_state(state["generator"])


@torch.no_grad()
def exit_features(model, heads: ExitHeadSet, samples, reference_logits):
    """Teacher-forced exit statistics on calibration.data Samples, judged against the original model.

    Each sample's counted positions are scored (for a reply: the rows a decode step runs).
    reference_logits(ids [1, T]) -> [T, V] logits of the ORIGINAL model.
    Returns margin [H, N] (p1 - p2 of each head's softmax, what the exit kernel compares with the
    threshold) and correct [H, N] (the head's top-1 is the original model's top-1)."""
    margins, correct = [[] for _ in heads.layers], [[] for _ in heads.layers]
    lm_head = model.lm_head.weight
    for sample in samples:
        input_ids = torch.tensor([sample.token_ids], device=lm_head.device)
        scored = slice(sample.counted.start, sample.counted.stop)
        target = reference_logits(input_ids)[scored].argmax(-1)  # [n]
        states = run_backbone(model, input_ids, torch.ones_like(input_ids), set(heads.layers))
        for i, k in enumerate(heads.layers):
            probs = heads.head(k).logits(states[k][scored], lm_head).float().softmax(-1)  # [n, V]
            top2 = probs.topk(2, dim=-1)
            margins[i].append((top2.values[:, 0] - top2.values[:, 1]).cpu())
            correct[i].append((top2.indices[:, 0] == target).cpu())
    return (torch.stack([torch.cat(m) for m in margins]).numpy(),
            torch.stack([torch.cat(c) for c in correct]).numpy())


def calibrate_heads(heads: ExitHeadSet, margins, correct, cost_model, epsilons=(0.9, 0.95, 0.99),
                    delta=None, default_epsilon=0.95) -> dict:
    """Margin thresholds per epsilon (cost-aware head subset), agreement counted against the original
    model; written into heads' calibration. Returns eps -> report (exits and compute saved per head)."""
    from calibration.thresholds import cost_aware_select

    entries, reports = {}, {}
    for eps in epsilons:
        thresholds, report = cost_aware_select(margins, correct, heads.layers, cost_model, eps, delta)
        entries[eps] = {"thresholds": dict(zip(heads.layers, thresholds)), "exit_fraction": report["exit_fraction"],
                        "saved_fraction": report["saved_fraction"], "num_tokens": report["num_tokens"]}
        reports[eps] = report
    heads.set_calibration("margin", entries, default_epsilon=default_epsilon, agreement_with="original model",
                          delta=delta)
    return reports

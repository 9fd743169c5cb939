"""Shortlists and mass estimators for shortlist exit heads (offline; the heads themselves are in
server/model/exit_heads.py).

Shortlist: the K tokens the full model most often predicts (its top-1) on the fitting positions,
replies and text weighted separately: chat replies are what the server decodes, text widens the
list to words the replies did not happen to use.

Mass estimator: the head's "other" logit must stand for log sum_{j not listed} exp(w_j . y). Its
exact value is cheap offline (one full projection per cached position), so the estimator is fitted
to it directly: a log-sum-exp of C linear pieces, started from k-means clusters of the unlisted
LM-head rows (piece = centroid, bias = log cluster size, which by Jensen starts at or below the
truth) and trained with a pinball loss at quantile tau > 0.5, so that it leans high: an
overestimate only costs exits, an underestimate where the true top-1 is unlisted costs agreement.
"""
import math
from dataclasses import dataclass

import torch

from server.model.exit_head import ExitHead


@dataclass
class MassFitConfig:
    components: int = 256
    """C: linear pieces of the estimator."""
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 3e-3
    quantile: float = 0.9
    """Pinball-loss quantile: the share of positions the fitted estimate should lie above the truth."""
    kmeans_iterations: int = 15
    seed: int = 0


def rank_tokens(top1: torch.Tensor, is_reply: torch.Tensor, vocab_size: int, text_weight: float = 0.25) -> torch.Tensor:
    """[V] token ids, most often predicted first: frequencies of the full model's top-1 over reply
    positions plus text_weight times those over text positions (each normalised to sum 1); ties and
    never-predicted tokens follow in token-id order (byte-level BPE ids roughly follow merge order)."""
    def share(ids):
        counts = torch.zeros(vocab_size, dtype=torch.float64).index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
        return counts / counts.sum().clamp(min=1)

    score = share(top1[is_reply]) + text_weight * share(top1[~is_reply])
    score -= torch.arange(vocab_size, dtype=torch.float64) * 1e-15  # stable: lower id first on ties
    return torch.argsort(score, descending=True)


def coverage(order: torch.Tensor, top1: torch.Tensor, sizes) -> dict[int, float]:
    """Share of positions whose top-1 is among the first K of `order`, for each K."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    at = rank[top1]
    return {int(k): float((at < k).float().mean()) for k in sizes}


@torch.no_grad()
def unlisted_log_mass(y: torch.Tensor, lm_head: torch.Tensor, listed: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Exact targets: y [n, d] (the head's normed input) -> [n] f32 log sum_{j not listed} exp(w_j . y)."""
    mask = torch.ones(lm_head.shape[0], dtype=torch.bool, device=lm_head.device)
    mask[listed.to(lm_head.device)] = False
    rows = lm_head[mask].float()
    return torch.cat([torch.logsumexp(y[i:i + chunk].float() @ rows.T, dim=-1) for i in range(0, len(y), chunk)])


@torch.no_grad()
def kmeans(rows: torch.Tensor, k: int, iterations: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on rows [m, d] -> (centroids [k, d], cluster sizes [k]); an emptied cluster
    keeps its previous centroid."""
    generator = torch.Generator().manual_seed(seed)
    centroids = rows[torch.randperm(len(rows), generator=generator)[:k]].clone()

    def assign():
        return torch.cat([torch.cdist(rows[i:i + 8192], centroids).argmin(1) for i in range(0, len(rows), 8192)])

    for _ in range(iterations):
        cluster = assign()
        sizes = torch.bincount(cluster, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, cluster, rows)
        centroids = torch.where(sizes[:, None] > 0, sums / sizes.clamp(min=1)[:, None], centroids)
    return centroids, torch.bincount(assign(), minlength=k).float()


def pinball(residual: torch.Tensor, quantile: float) -> torch.Tensor:
    """Mean quantile loss of residual = target - estimate: minimised when a share `quantile` of the
    targets lie below the estimate."""
    return torch.maximum(quantile * residual, (quantile - 1) * residual).mean()


def fit_mass_estimator(head: ExitHead, lm_head: torch.Tensor, y_fit: torch.Tensor, target_fit: torch.Tensor,
                       config: MassFitConfig, progress=None) -> None:
    """Initialise head.mass from clusters of the unlisted LM-head rows and fit it (in place) to the
    exact log-mass targets [n] at the positions y_fit [n, d] (the head's normed input)."""
    mask = torch.ones(lm_head.shape[0], dtype=torch.bool, device=lm_head.device)
    mask[head.shortlist_ids.to(lm_head.device)] = False
    centroids, sizes = kmeans(lm_head[mask].detach().float().cpu(), config.components, config.kmeans_iterations,
                              config.seed)
    proj = head.mass.proj
    with torch.no_grad():
        proj.weight.copy_(centroids.to(proj.weight))
        proj.bias.copy_(torch.log(sizes.clamp(min=1)).to(proj.bias))
    optimizer = torch.optim.Adam(head.mass.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / config.steps)))
    generator = torch.Generator().manual_seed(config.seed)
    head.mass.train()
    for _ in range(config.steps):
        rows = torch.randint(len(y_fit), (config.batch_size,), generator=generator)
        estimate = head.mass(y_fit[rows].to(proj.weight.device))
        loss = pinball(target_fit[rows].to(estimate.device) - estimate, config.quantile)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress.update(1)
    head.mass.eval()


@torch.no_grad()
def mass_error(head: ExitHead, y: torch.Tensor, target: torch.Tensor) -> dict:
    """How the estimate misses the exact log-mass on positions y [n, d]: RMS, mean (bias) and the
    share of underestimates, in nats."""
    estimate = torch.cat([head.mass(y[i:i + 8192]) for i in range(0, len(y), 8192)]).cpu()
    residual = estimate - target.cpu()
    return {"positions": len(y), "rms": float(residual.pow(2).mean().sqrt()), "bias": float(residual.mean()),
            "under_share": float((residual < 0).float().mean())}

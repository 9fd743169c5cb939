"""The paged KV pool and the per-step view of it that the model attends through.

Rows of a step are tokens: rows [0, D) are decode rows (one token per decoding sequence), rows
[D, N) are prefill chunks, sequence after sequence. `PagedKVStore` implements the model's KVStore
protocol for those rows; `select(keep)` narrows it to the rows still running after an exit.
Attention of a row depends only on its own sequence's keys (per-row masks over a padded context),
so a row's result does not depend on which other rows share the step. Decode rows attend in groups
of similar context length (`DecodeGroup`): each group gathers its blocks padded to its own longest
sequence, so one long prompt in a batch does not make every row gather (and attend over) its length.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.model.config import ModelConfig


class KVPool:
    """Preallocated K and V, each [L, num_blocks, block_size, Hkv, Dh]."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device, dtype):
        shape = (config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        return per_token * block_size * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, Hkv, Dh] into slots [n]."""
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v.to(self.v.dtype))

    def gather(self, layer: int, block_tables: torch.Tensor):
        """block_tables [B, nb] -> keys, values [B, Hkv, nb * block_size, Dh]."""
        # index_select copies whole blocks (block_size * Hkv * Dh contiguous values) at a time: several
        # times faster on the CPU than advanced indexing with the 2-D table
        shape = (*block_tables.shape[:1], -1, *self.k.shape[3:])
        k = self.k[layer].index_select(0, block_tables.flatten()).view(shape).transpose(1, 2)
        v = self.v[layer].index_select(0, block_tables.flatten()).view(shape).transpose(1, 2)
        return k, v


@dataclass
class DecodeGroup:
    """Decode rows of similar context length, attended together."""
    rows: torch.Tensor  # [g] int64: which of the step's live decode rows
    tables: torch.Tensor  # [g, nb] blocks of each row's sequence (padding: block 0)
    mask: torch.Tensor  # [g, 1, 1, nb * block_size] True where the slot holds the row's context

    def select(self, keep: torch.Tensor, new_index: torch.Tensor) -> "DecodeGroup | None":
        """The group's rows that `keep` [D] (bool over all decode rows) keeps, renumbered by new_index [D]."""
        kept = keep[self.rows]
        if not bool(kept.any()):
            return None
        return DecodeGroup(new_index[self.rows[kept]], self.tables[kept], self.mask[kept])


# a group takes rows (ascending by length) while the longest needs at most this many times the blocks
# of the shortest, plus slack: the padding gathered stays bounded, and uniform batches stay one group
GROUP_GROWTH, GROUP_SLACK_BLOCKS = 1.5, 4


@dataclass
class StepMetadata:
    slots: torch.Tensor  # [N] pool slot of each row's token
    num_decode: int  # D: decode rows come first among the N rows
    decode_groups: list[DecodeGroup]  # every decode row in exactly one group
    prefill_tables: torch.Tensor  # [S, nbp] blocks of each prefilling sequence
    prefill_mask: torch.Tensor  # [S, 1, Tmax, nbp * block_size] causal mask of the padded chunk grid
    prefill_index: torch.Tensor  # [P] where each prefill row sits in the flat [S * Tmax] chunk grid

    @classmethod
    def build(cls, slots: list[int], decode_tables: list[list[int]], decode_context_lens: list[int],
              prefill_tables: list[list[int]], prefill_chunks: list[tuple[int, int]], block_size: int,
              device) -> "StepMetadata":
        """Tables are block lists; decode rows attend to their first context_len slots; prefill chunk
        (start, end) rows attend causally to positions [0, position]."""
        to = lambda t: t.to(device, non_blocking=True)
        groups = []
        for rows in _length_groups(decode_context_lens, block_size):
            tables = _padded_table([decode_tables[i] for i in rows])
            lens = torch.tensor([decode_context_lens[i] for i in rows], dtype=torch.long)
            mask = (torch.arange(tables.shape[1] * block_size)[None, :] < lens[:, None])[:, None, None, :]
            groups.append(DecodeGroup(torch.tensor(rows, dtype=torch.long), to(tables), to(mask)))
        ptables = _padded_table(prefill_tables)
        starts = torch.tensor([s for s, _ in prefill_chunks], dtype=torch.long)
        lengths = torch.tensor([e - s for s, e in prefill_chunks], dtype=torch.long)
        t_max = int(lengths.max()) if prefill_chunks else 0
        positions = starts[:, None] + torch.arange(t_max)[None, :]  # [S, Tmax]
        prefill_mask = torch.arange(ptables.shape[1] * block_size)[None, None, :] <= positions[:, :, None]
        grid = torch.arange(len(prefill_chunks) * t_max).view(len(prefill_chunks), t_max)
        prefill_index = grid[torch.arange(t_max)[None, :] < lengths[:, None]]
        return cls(to(torch.tensor(slots, dtype=torch.long)), len(decode_tables), groups, to(ptables),
                   to(prefill_mask[:, None]), to(prefill_index))


def _length_groups(context_lens: list[int], block_size: int) -> list[list[int]]:
    """Decode row indices in groups of similar length (each ascending), shortest group first."""
    order = sorted(range(len(context_lens)), key=lambda i: context_lens[i])
    groups: list[list[int]] = []
    first_blocks = 0
    for i in order:
        blocks = -(-context_lens[i] // block_size)
        if not groups or blocks > GROUP_GROWTH * first_blocks + GROUP_SLACK_BLOCKS:
            groups.append([])
            first_blocks = blocks
        groups[-1].append(i)
    return [sorted(group) for group in groups]  # rows keep their order inside a group


def _padded_table(tables: list[list[int]]) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long).view(len(tables), width)


class PagedKVStore:
    """KVStore over the pool for the rows of one step (or the live subset of them)."""

    def __init__(self, pool: KVPool, meta: StepMetadata):
        self.pool = pool
        self.meta = meta

    def select(self, keep: torch.Tensor) -> "PagedKVStore":
        """keep [N] bool over the current rows (on the CPU: no device sync) -> a store for the rows
        kept (order preserved)."""
        m, num_decode = self.meta, self.meta.num_decode
        keep = keep.cpu()
        keep_decode, keep_prefill = keep[:num_decode], keep[num_decode:]
        new_index = keep_decode.long().cumsum(0) - 1  # a kept decode row's place among the kept
        groups = [g for g in (group.select(keep_decode, new_index) for group in m.decode_groups) if g is not None]
        narrowed = StepMetadata(m.slots[keep.to(m.slots.device)], int(keep_decode.sum()), groups, m.prefill_tables,
                                m.prefill_mask, m.prefill_index[keep_prefill.to(m.prefill_index.device)])
        return PagedKVStore(self.pool, narrowed)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.pool.write(layer, self.meta.slots, k, v)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, Dh], k/v [N, Hkv, Dh] -> [N, Hq, Dh]."""
        self.write(layer, k, v)
        m, num_decode = self.meta, self.meta.num_decode
        outputs = []
        if num_decode:
            outputs.append(self._decode_attention(layer, q[:num_decode]))
        if q.shape[0] > num_decode:
            outputs.append(self._prefill_attention(layer, q[num_decode:]))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _decode_attention(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [D, Hq, Dh] of the decode rows, one query each, group by group -> [D, Hq, Dh]."""
        groups = self.meta.decode_groups
        if len(groups) == 1 and len(groups[0].rows) == len(q):  # the common case: no reordering
            return self._group_attention(layer, q, groups[0])
        out = torch.empty_like(q)
        for group in groups:
            rows = group.rows.to(q.device)
            out[rows] = self._group_attention(layer, q[rows], group)
        return out

    def _group_attention(self, layer: int, q: torch.Tensor, group: DecodeGroup) -> torch.Tensor:
        keys, values = self.pool.gather(layer, group.tables)  # [g, Hkv, C, Dh]
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=group.mask,
                                             enable_gqa=True)  # [g, Hq, 1, Dh]
        return out.squeeze(2)

    def _prefill_attention(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [P, Hq, Dh] of the prefill rows, scattered into the padded [S, Tmax] grid and back."""
        m = self.meta
        num_seqs, t_max = m.prefill_mask.shape[0], m.prefill_mask.shape[2]
        grid = q.new_zeros(num_seqs * t_max, *q.shape[1:])
        grid[m.prefill_index] = q
        grid = grid.view(num_seqs, t_max, *q.shape[1:]).transpose(1, 2)  # [S, Hq, Tmax, Dh]
        keys, values = self.pool.gather(layer, m.prefill_tables)  # [S, Hkv, Cp, Dh]
        out = F.scaled_dot_product_attention(grid, keys, values, attn_mask=m.prefill_mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(num_seqs * t_max, *q.shape[1:])[m.prefill_index]

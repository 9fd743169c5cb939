"""Which KV blocks each sequence owns. Blocks are fixed-size runs of slots in the pool; a
sequence's block table maps its token positions to slots, so sequences of any lengths share
one pool with no fragmentation beyond each sequence's last, partly filled block."""
from server.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # a stack: recently freed blocks are reused first

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def num_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that positions [0, num_tokens) have slots."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int, reserve: int = 0) -> bool:
        return self.num_blocks_needed(seq, num_tokens) <= len(self.free_blocks) - reserve

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.num_blocks_needed(seq, num_tokens)
        if needed > len(self.free_blocks):
            raise RuntimeError(f"KV pool exhausted: {needed} blocks needed, {len(self.free_blocks)} free")
        for _ in range(needed):
            seq.block_table.append(self.free_blocks.pop())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(reversed(seq.block_table))
        seq.block_table = []

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Pool slots of positions [start, end) of `seq`."""
        size, table = self.block_size, seq.block_table
        return [table[p // size] * size + p % size for p in range(start, end)]

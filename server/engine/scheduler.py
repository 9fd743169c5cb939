"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

Every step: each running sequence that decodes gets one row (the decode rows come first in the
token budget, so a long prompt never stalls decoding); running sequences still in their prompt
continue it in chunks; then waiting sequences are admitted first come, first served while the
token budget, max_num_seqs and free blocks allow. When a running sequence needs a block and none
is free, the newest running sequence is preempted: its blocks are freed and it is recomputed later.
"""
from collections import deque
from dataclasses import dataclass, field

from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    decode_seqs: list[Sequence] = field(default_factory=list)
    prefill_seqs: list[Sequence] = field(default_factory=list)
    prefill_chunks: list[tuple[int, int]] = field(default_factory=list)  # positions [start, end) per prefill seq
    num_preemptions: int = 0

    @property
    def num_prefill_tokens(self) -> int:
        return sum(end - start for start, end in self.prefill_chunks)

    @property
    def is_empty(self) -> bool:
        return not self.decode_seqs and not self.prefill_seqs


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # admissions keep this many blocks free, so running sequences can grow before anyone is preempted
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is last

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        for seq in list(self.running):
            decoding = seq.status == SequenceStatus.RUNNING and not seq.is_prefilling
            if decoding and self._make_room(seq, seq.num_tokens, batch):
                self.block_manager.allocate(seq, seq.num_tokens)
                batch.decode_seqs.append(seq)
        budget = self.max_num_batched_tokens - len(batch.decode_seqs)
        for seq in list(self.running):
            if budget <= 0:
                break
            prefilling = seq.status == SequenceStatus.RUNNING and seq.is_prefilling
            if prefilling and self._make_room(seq, seq.num_computed_tokens + 1, batch):
                budget -= self._schedule_chunk(seq, budget, batch)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.num_preemptions:
            seq = self.waiting[0]
            chunk = min(seq.prefill_target - seq.num_computed_tokens, budget)
            reserve = self.watermark_blocks if self.running else 0  # alone, a sequence may fill the pool
            if not self.block_manager.can_allocate(seq, seq.num_computed_tokens + chunk, reserve):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            budget -= self._schedule_chunk(seq, budget, batch)
        return batch

    def _schedule_chunk(self, seq: Sequence, budget: int, batch: ScheduledBatch) -> int:
        """Give `seq` the next chunk of its prompt that fits the budget and the free blocks."""
        bm = self.block_manager
        room = (len(seq.block_table) + bm.num_free_blocks) * bm.block_size - seq.num_computed_tokens
        start = seq.num_computed_tokens
        end = start + min(seq.prefill_target - start, budget, room)
        bm.allocate(seq, end)
        batch.prefill_seqs.append(seq)
        batch.prefill_chunks.append((start, end))
        return end - start

    def _make_room(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Preempt the newest running sequences until `seq` can hold num_tokens; False if `seq` itself went."""
        while not self.block_manager.can_allocate(seq, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            batch.num_preemptions += 1
            if victim in batch.decode_seqs:  # a prefilling sequence may push out a newer decoder
                batch.decode_seqs.remove(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free the blocks of `seq` and queue it first; it will recompute its KV (by recompute, not swap)."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

"""BlockManager on its own: no model, no pool; sequences are bookkeeping only."""
import pytest

from server.engine.block_manager import BlockManager
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Request, Sequence


def make_seq(num_prompt_tokens: int, seq_id: int = 0) -> Sequence:
    request = Request(f"r{seq_id}", list(range(1, num_prompt_tokens + 1)), SamplingParams(seed=0))
    return Sequence(seq_id, request, 0, thresholds=[])


def test_blocks_needed_round_up_and_count_what_is_held():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(5)
    assert [bm.num_blocks_needed(seq, n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    bm.allocate(seq, 5)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6 and bm.num_used_blocks == 2
    assert bm.num_blocks_needed(seq, 8) == 0 and bm.num_blocks_needed(seq, 9) == 1
    bm.allocate(seq, 8)  # still fits the blocks it has
    assert len(seq.block_table) == 2 and bm.usage == 2 / 8


def test_slots_map_positions_through_the_block_table():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = make_seq(3, 0), make_seq(6, 1)
    bm.allocate(a, 3)
    bm.allocate(b, 6)
    assert a.block_table == [0] and b.block_table == [1, 2]  # lowest free block first
    assert bm.slots(a, 0, 3) == [0, 1, 2]
    assert bm.slots(b, 2, 6) == [6, 7, 8, 9]  # position 4 is slot 0 of block 2
    assert bm.capacity_tokens == 16


def test_freed_blocks_are_reused_first_and_nothing_leaks():
    bm = BlockManager(num_blocks=6, block_size=2)
    seqs = [make_seq(3, i) for i in range(3)]
    for seq in seqs:
        bm.allocate(seq, 3)
    assert bm.num_free_blocks == 0
    freed = list(seqs[1].block_table)
    bm.free(seqs[1])
    assert seqs[1].block_table == [] and bm.num_free_blocks == 2
    late = make_seq(4, 9)
    bm.allocate(late, 4)
    assert sorted(late.block_table) == sorted(freed)  # recently freed blocks come back first
    for seq in (seqs[0], seqs[2], late):
        bm.free(seq)
    assert bm.num_free_blocks == 6 and sorted(bm.free_blocks) == list(range(6))


def test_can_allocate_honours_the_reserve_and_exhaustion_raises():
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = make_seq(9)
    assert bm.can_allocate(seq, 12) and not bm.can_allocate(seq, 12, reserve=1)
    assert bm.can_allocate(seq, 8, reserve=1)
    with pytest.raises(RuntimeError, match="exhausted"):
        bm.allocate(seq, 13)
    assert bm.num_free_blocks == 3 and seq.block_table == []  # a refused allocation takes nothing

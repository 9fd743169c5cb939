"""Scheduler on its own: no model. `advance` plays the engine's part after each step (computed
tokens move on, every decode row and every finished prompt gets one new token)."""
from server.engine.block_manager import BlockManager
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.engine.sequence import Request, Sequence, SequenceStatus


def make_seq(num_prompt_tokens: int, seq_id: int) -> Sequence:
    request = Request(f"r{seq_id}", list(range(1, num_prompt_tokens + 1)), SamplingParams(seed=0))
    return Sequence(seq_id, request, 0, thresholds=[])


def advance(batch: ScheduledBatch) -> None:
    for seq, (_, end) in zip(batch.prefill_seqs, batch.prefill_chunks):
        seq.num_computed_tokens = end
        if end == seq.prefill_target and not seq.is_prefilling:
            seq.token_ids.append(7)  # the prompt's last row gives the first token
    for seq in batch.decode_seqs:
        seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(7)


def test_decode_rows_come_first_and_long_prompts_are_chunked():
    scheduler = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=10)
    short, long = make_seq(3, 0), make_seq(25, 1)
    scheduler.add(short)
    scheduler.add(long)
    first = scheduler.schedule()
    assert first.decode_seqs == [] and first.prefill_seqs == [short, long]
    assert first.prefill_chunks == [(0, 3), (0, 7)] and first.num_prefill_tokens == 10
    advance(first)
    second = scheduler.schedule()  # short decodes (1 row), long continues with what the budget leaves
    assert second.decode_seqs == [short] and second.prefill_chunks == [(7, 16)]
    advance(second)
    third = scheduler.schedule()
    assert third.decode_seqs == [short] and third.prefill_chunks == [(16, 25)]
    advance(third)
    fourth = scheduler.schedule()
    assert fourth.decode_seqs == [short, long] and fourth.prefill_seqs == []


def test_admission_is_first_come_first_served_within_max_num_seqs():
    scheduler = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(4, i) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    batch = scheduler.schedule()
    assert batch.prefill_seqs == seqs[:2] and list(scheduler.waiting) == seqs[2:]
    advance(batch)
    scheduler.finish(seqs[0])
    batch = scheduler.schedule()
    assert batch.decode_seqs == [seqs[1]] and batch.prefill_seqs == [seqs[2]]
    assert seqs[0].status == SequenceStatus.FINISHED and seqs[0].block_table == []


def test_the_newest_sequence_is_preempted_and_requeued_first():
    bm = BlockManager(num_blocks=5, block_size=2)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    old, new = make_seq(4, 0), make_seq(4, 1)
    scheduler.add(old)
    scheduler.add(new)
    advance(scheduler.schedule())  # both prompts in, 2 blocks each; 1 block left (the watermark)
    assert bm.num_free_blocks == 1
    batch = scheduler.schedule()  # each needs a third block to decode position 4: old takes the last one
    assert batch.num_preemptions == 1 and batch.decode_seqs == [old]
    assert new.status == SequenceStatus.WAITING and new.block_table == [] and new.num_computed_tokens == 0
    assert scheduler.waiting[0] is new and scheduler.running == [old]
    advance(batch)
    scheduler.finish(old)
    batch = scheduler.schedule()  # recomputed: everything but its last generated token, in one chunk
    assert batch.prefill_seqs == [new] and batch.prefill_chunks == [(0, new.num_tokens - 1)]


def test_finishing_a_waiting_sequence_takes_it_out_of_the_queue():
    scheduler = Scheduler(BlockManager(num_blocks=8, block_size=4), max_num_seqs=1, max_num_batched_tokens=100)
    running, waiting = make_seq(4, 0), make_seq(4, 1)
    scheduler.add(running)
    scheduler.add(waiting)
    advance(scheduler.schedule())
    scheduler.finish(waiting)  # an abort before it was ever admitted
    assert not scheduler.waiting and scheduler.num_unfinished == 1
    assert scheduler.schedule().decode_seqs == [running]


def test_admissions_keep_a_watermark_of_free_blocks():
    bm = BlockManager(num_blocks=200, block_size=1)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=1000)
    assert scheduler.watermark_blocks == 2
    first, second = make_seq(150, 0), make_seq(49, 1)
    scheduler.add(first)
    scheduler.add(second)
    batch = scheduler.schedule()  # 150 + 49 would leave 1 free block, under the watermark of 2
    assert batch.prefill_seqs == [first] and list(scheduler.waiting) == [second]

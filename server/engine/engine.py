"""LLMEngine: requests in, one step at a time, cumulative outputs back.

A step is: schedule -> run the model (prefill chunks at full depth, decode rows with early exit)
-> postprocess (append tokens, detokenise, stop checks, free finished sequences) -> outputs.
Not thread-safe: AsyncLLMEngine drives it from a single thread.
"""
import logging
import math
import time
from pathlib import Path

import torch

from server.engine.block_manager import BlockManager
from server.engine.config import CPU_KV_CACHE_MEMORY, EngineConfig
from server.engine.detokenizer import detokenize_incrementally, find_stop_string, held_back
from server.engine.kv_cache import KVPool
from server.engine.model_runner import ModelRunner, StepOutput
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams, SamplingParamsError
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.engine.sequence import Request, Sequence, check_prompt
from server.engine.stats import FinishedRequestStats, StatsObserver, StepStats
from server.model.exit_heads import SHIPPED_HEADS, ExitHeadSet, match_epsilon

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig, heads: ExitHeadSet | None = None,
                 observer: StatsObserver | None = None):
        self.config = config
        self.model = model
        self.model_config = model.config
        self.tokenizer = tokenizer
        self.heads = heads
        self.observer = observer
        self.num_layers = model.num_layers
        self.eos_token_ids = list(tokenizer.eos_token_ids or model.config.eos_token_id)
        device, dtype = model.device, model.dtype
        max_len = min(config.max_model_len or model.config.max_position_embeddings,
                      model.config.max_position_embeddings)
        num_blocks = self._num_blocks(max_len, device, dtype)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.pool = KVPool(model.config, num_blocks, config.block_size, device, dtype)
        self.max_model_len = min(max_len, self.block_manager.capacity_tokens)  # a lone sequence always fits
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, heads, self.pool, self.block_manager, self.eos_token_ids,
                                  gate_whole_batch=config.gate_whole_batch)
        self.requests: dict[str, Request] = {}
        self.last_step: StepStats | None = None
        self._next_seq_id = 0

    @classmethod
    def from_config(cls, config: EngineConfig, observer: StatsObserver | None = None) -> "LLMEngine":
        from server.model.loader import load_model

        torch.manual_seed(config.seed)
        quantization = config.resolved_quantization
        # a delta merges into float weights: quantize after it
        loaded = load_model(config.model, device=config.torch_device, dtype=config.torch_dtype,
                            quantization="none" if config.tune is not None else quantization)
        heads_spec = config.heads
        if config.tune is not None:  # original + delta; heads made for the original are refused from now on
            from server.model.quantize import quantize_model
            from server.model.tune_delta import apply_tune

            tuned_heads = apply_tune(loaded, config.tune)
            quantize_model(loaded.model, quantization)
            heads_spec = str(tuned_heads) if heads_spec == "auto" else heads_spec
            log.info("serving %s with the depth-tuning delta %s", loaded.name, config.tune)
        heads = load_heads(heads_spec, loaded)
        return cls(loaded.model, loaded.tokenizer, config, heads, observer)

    def _num_blocks(self, max_len: int, device: torch.device, dtype: torch.dtype) -> int:
        config = self.config
        per_block = KVPool.bytes_per_block(self.model_config, config.block_size, dtype)
        budget = config.kv_cache_memory
        if budget is None and device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(device)[0] * config.gpu_memory_utilization)
        if budget is None:  # CPU default: no more than the configured limits can ever use
            needed = config.max_num_seqs * -(-max_len // config.block_size) * per_block
            budget = min(CPU_KV_CACHE_MEMORY, needed)
        if budget < per_block:
            raise ValueError(f"kv_cache_memory of {budget} bytes holds no KV block ({per_block} bytes each)")
        return budget // per_block

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.capacity_tokens

    def scheduler_state(self) -> tuple[int, int, float]:
        """(sequences running, sequences waiting, KV usage as used blocks / all blocks) now."""
        return len(self.scheduler.running), len(self.scheduler.waiting), self.block_manager.usage

    def thresholds_for(self, params: SamplingParams) -> tuple[list[float], list[float]]:
        """Per head (layer order), the request's exit threshold (+inf where it never exits) and gate
        cut (-inf: no gate, the head is evaluated for every row that reaches it). Raises
        SamplingParamsError for an exit_epsilon the head set was not calibrated for."""
        heads = self.heads
        if heads is None:
            if params.exit_epsilon is not None:
                raise SamplingParamsError("exit_epsilon", "exit_epsilon was given but this server has no exit heads")
            return [], []
        epsilons = heads.epsilons()
        eps = params.exit_epsilon
        if eps is not None and match_epsilon(eps, epsilons) is None:
            raise SamplingParamsError("exit_epsilon", f"exit_epsilon {eps:g} is not calibrated; "
                                      f"choose one of {', '.join(f'{e:g}' for e in epsilons) or '(none)'}")
        eps = eps if eps is not None else heads.default_epsilon
        if not params.early_exit or eps is None:
            return [math.inf] * len(heads.layers), [-math.inf] * len(heads.layers)
        thresholds, cuts = heads.served_thresholds(eps)
        return [thresholds[k] for k in heads.layers], [cuts[k] for k in heads.layers]

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> tuple[list[float], list[float]]:
        """Check a request before it is queued; returns its per-head thresholds and gate cuts."""
        check_prompt(prompt_token_ids, self.model_config.vocab_size, self.max_model_len)
        return self.thresholds_for(params)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        thresholds, gate_cuts = self.validate(prompt_token_ids, params)
        request = Request(request_id, prompt_token_ids, params, arrival_time)
        for index in range(params.n):
            seq = Sequence(self._next_seq_id, request, index, thresholds, gate_cuts)
            self._next_seq_id += 1
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                seq.visible_len = len(seq.text)
                self.scheduler.finish(seq)
        self._record_finished(request)
        return self._request_output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch.is_empty and self.scheduler.num_unfinished:  # cannot happen; fail loudly rather than spin
            raise RuntimeError(f"the scheduler made no progress with {self.scheduler.num_unfinished} sequences queued")
        out = self.runner.run(batch) if not batch.is_empty else StepOutput()
        updated = self._postprocess(batch, out)
        outputs = [self._request_output(request) for request in updated]
        self._record_step(batch, out, time.perf_counter() - start)
        return outputs

    def _postprocess(self, batch: ScheduledBatch, out: StepOutput) -> list[Request]:
        now = time.monotonic()
        for seq, (_, end) in zip(batch.prefill_seqs, batch.prefill_chunks):
            seq.num_computed_tokens = end
        for seq in batch.decode_seqs:
            seq.num_computed_tokens = seq.num_tokens
        for seq in batch.decode_seqs + batch.prefill_seqs:
            if seq.request.first_scheduled_time is None:
                seq.request.first_scheduled_time = now
        for request, logprobs in out.prompt_logprobs:
            request.prompt_logprobs.extend(logprobs)
        updated = {}
        for seq, token, exit_layer, logprob, flops, full, skipped in zip(
                out.seqs, out.token_ids, out.exit_layers, out.logprobs, out.flops, out.flops_full_depth,
                out.lm_head_skipped):
            seq.token_ids.append(token)
            seq.exit_layers.append(exit_layer)
            seq.num_exited_early += exit_layer < self.num_layers
            seq.num_lm_head_skipped += skipped
            seq.lm_head_skipped.append(bool(skipped))
            seq.decode_flops += flops
            seq.decode_flops_full_depth += full
            if seq.logprobs is not None:
                seq.logprobs.append(logprob)
            new_chars = len(detokenize_incrementally(self.tokenizer, seq))
            self._check_stop(seq, token, new_chars)
            updated[seq.request.request_id] = seq.request
        for request in updated.values():
            if request.is_finished:
                del self.requests[request.request_id]
                self._record_finished(request)
        return list(updated.values())

    def _check_stop(self, seq: Sequence, token: int, new_chars: int) -> None:
        params = seq.params
        reason, stop_reason = None, None
        if seq.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
                reason, stop_reason = "stop", token if token in params.stop_token_ids else None
                seq.text = seq.text[:len(seq.text) - new_chars]  # the stop token's own text is not shown
            elif params.stop and (found := find_stop_string(seq.text, new_chars, params.stop)):
                reason, stop_reason = "stop", found[1]
                seq.text = seq.text[:found[0]]
        max_tokens = params.max_tokens or self.max_model_len
        if reason is None and (seq.num_output_tokens >= max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is None:
            seq.visible_len = len(seq.text) - held_back(seq.text, params.stop)
            return
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.visible_len = len(seq.text)
        self.scheduler.finish(seq)

    def _request_output(self, request: Request) -> RequestOutput:
        seqs = request.seqs
        return RequestOutput(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            outputs=[seq.output() for seq in seqs], finished=request.is_finished,
            prompt_logprobs=None if request.prompt_logprobs is None else list(request.prompt_logprobs),
            num_tokens_exited_early=sum(s.num_exited_early for s in seqs),
            num_tokens_lm_head_skipped=sum(s.num_lm_head_skipped for s in seqs),
            decode_flops=sum(s.decode_flops for s in seqs),
            decode_flops_full_depth=sum(s.decode_flops_full_depth for s in seqs))

    def _record_step(self, batch: ScheduledBatch, out: StepOutput, seconds: float) -> None:
        now = time.monotonic()
        first_tokens, gaps = [], []
        for seq in out.seqs:
            request = seq.request
            if request.first_token_time is None:
                request.first_token_time = now
                first_tokens.append(now - request.arrival_time)
            elif seq.last_token_time is not None:
                gaps.append(now - seq.last_token_time)
            seq.last_token_time = request.last_token_time = now
        self.last_step = StepStats(
            *self.scheduler_state(), num_preemptions=batch.num_preemptions,
            num_prompt_tokens=batch.num_prefill_tokens, num_generation_tokens=len(out.seqs), step_seconds=seconds,
            deepest_layer=out.deepest_layer, exit_layers=list(out.exit_layers), exit_margins=out.margins,
            num_lm_head_skipped=sum(out.lm_head_skipped),
            decode_flops=sum(out.flops), decode_flops_full_depth=sum(out.flops_full_depth),
            time_to_first_tokens=first_tokens, inter_token_latencies=gaps, forward_seconds=out.forward_seconds)
        if self.observer is not None:
            self.observer.record_step(self.last_step)

    def _record_finished(self, request: Request) -> None:
        if self.observer is None:
            return
        now = time.monotonic()
        scheduled = request.first_scheduled_time or now
        self.observer.record_finished(FinishedRequestStats(
            finish_reason=request.finish_reason or "abort", e2e_latency=now - request.arrival_time,
            queue_time=scheduled - request.arrival_time, num_prompt_tokens=len(request.prompt_token_ids),
            num_generation_tokens=sum(s.num_output_tokens for s in request.seqs)))

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[RequestOutput]:
        """Run prompts (text or token ids) to completion; outputs in prompt order. For tests,
        benchmarks and calibration; a server uses AsyncLLMEngine."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{self._next_seq_id}-{i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, params):
            tokens = self.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else prompt
            self.add_request(request_id, tokens, p)
        final = {}
        while self.has_unfinished_requests():
            for output in self.step():
                if output.finished:
                    final[output.request_id] = output
        return [final[i] for i in ids]


def load_heads(spec: str | None, loaded) -> ExitHeadSet | None:
    """spec: a head-set folder, "auto" (heads shipped for this model, if any) or None."""
    if spec is None or spec == "none":
        return None
    if spec == "auto":
        path = SHIPPED_HEADS / loaded.name
        if not (path / "exits.json").is_file():
            log.warning("no exit heads shipped for %s: running at full depth", loaded.name)
            return None
    else:
        path = Path(spec)
    heads = ExitHeadSet.load(path, config=loaded.config, fingerprint=loaded.fingerprint).to(loaded.model.device)
    return heads.eval().bind(loaded.model.head_weight)

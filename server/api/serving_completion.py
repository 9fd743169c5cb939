"""POST /v1/completions: prompts in, text_completion objects (or their stream) out.

`echo` with `logprobs` returns the prompt's tokens with their logprobs before the generated ones, in
OpenAI's legacy shape (the first prompt token has none); `max_tokens: 0` with echo scores the
prompt alone, as lm-evaluation-harness asks. `prompt_logprobs: N` adds vLLM's per-prompt-token
dicts. Prompt tokens run at full depth, so these are the full model's numbers.
"""
from collections.abc import AsyncIterator
from dataclasses import replace

from server.api.errors import bad_request
from server.api.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                 PromptLogprob, random_id)
from server.api.serving import (ChoiceCursor, OpenAIServing, advance, request_ids, sse,
                                stream_with_errors)
from server.engine.outputs import RequestOutput, TokenLogprob
from server.engine.sampling_params import SamplingParams

MIN_LOGPROB = -9999.0  # what OpenAI and vLLM send for -inf, which JSON cannot hold


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request=None
                                ) -> CompletionResponse | AsyncIterator[str]:
        """The response, or for stream: true its server-sent events (errors after that go in the stream)."""
        request_id = random_id("cmpl")
        try:
            return await self.complete(request, raw_request, request_id)
        except Exception as err:
            raise self.internal_error(err, request_id) from None

    async def complete(self, request: CompletionRequest, raw_request, request_id: str):
        self.check_model(request.model)
        if request.prompt_logprobs is not None and request.stream:
            raise bad_request("prompt_logprobs is not available with stream: true", "prompt_logprobs")
        prompts = [self.check_prompt(ids) for ids in await self.prompt_ids(request.prompt)]
        params = [self.completion_params(request, len(ids)) for ids in prompts]
        ids = request_ids(request_id, len(prompts))
        self.check_admissible([len(p) for p in prompts], params)
        if request.stream:
            events = self.stream(request, prompts, params, ids, raw_request, request_id)
            return stream_with_errors(events, lambda err: self.internal_error(err, request_id))
        finals: dict[int, RequestOutput] = {}
        async with self.run(prompts, params, ids, raw_request) as outputs:
            async for i, output in outputs:
                finals[i] = output
        outputs = [finals[i] for i in range(len(prompts))]
        if scores_prompt_only(request):
            outputs = [prompt_only(output) for output in outputs]
        choices = []
        for i, output in enumerate(outputs):
            prefix = self.echo_text(prompts[i]) if request.echo else ""
            for c in output.outputs:
                logprobs = None
                if request.logprobs is not None:
                    token_ids, entries = c.token_ids, c.logprobs
                    if request.echo:
                        token_ids, entries = [*prompts[i], *token_ids], [*output.prompt_logprobs, *entries]
                    logprobs = self.logprobs(token_ids, entries, 0, request.logprobs)
                choices.append(CompletionChoice(
                    index=i * request.n + c.index, text=prefix + c.text, logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    exit_layers=c.exit_layers if request.return_exit_layers else None,
                    token_ids=c.token_ids if request.return_token_ids else None,
                    prompt_logprobs=(self.prompt_logprobs(output.prompt_logprobs, request.prompt_logprobs)
                                     if request.prompt_logprobs is not None else None)))
        return CompletionResponse(id=request_id, model=self.info.name, choices=choices,
                                  usage=self.usage([len(p) for p in prompts], outputs))

    async def stream(self, request: CompletionRequest, prompts, params, ids, raw_request, request_id):
        cursors = {}  # choice index -> ChoiceCursor
        offsets = {}  # choice index -> text offset of the next logprob token
        echoed = set()  # choice indices whose prompt was sent
        finals: dict[int, RequestOutput] = {}
        async with self.run(prompts, params, ids, raw_request) as outputs:
            async for i, output in outputs:
                finals[i] = output
                for c in output.outputs:
                    index = i * request.n + c.index
                    delta = advance(cursors.setdefault(index, ChoiceCursor()), c)
                    if delta is None:
                        continue
                    if scores_prompt_only(request):
                        delta = replace(delta, text="", token_ids=[], exit_layers=[], logprobs=[])
                    text, token_ids, entries = delta.text, delta.token_ids, delta.logprobs
                    if request.echo and index not in echoed:
                        echoed.add(index)
                        text = self.echo_text(prompts[i]) + text
                        if request.logprobs is not None:
                            token_ids, entries = [*prompts[i], *token_ids], [*output.prompt_logprobs, *entries]
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs = self.logprobs(token_ids, entries, offsets.get(index, 0), request.logprobs)
                        offsets[index] = offsets.get(index, 0) + sum(len(t) for t in logprobs.tokens)
                    choice = CompletionChoice(
                        index=index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason,
                        exit_layers=delta.exit_layers if request.return_exit_layers else None,
                        token_ids=delta.token_ids if request.return_token_ids else None)
                    yield sse(CompletionResponse(id=request_id, model=self.info.name, choices=[choice]))
        if request.stream_options and request.stream_options.include_usage:
            ended = [finals[i] for i in sorted(finals)]
            if scores_prompt_only(request):
                ended = [prompt_only(output) for output in ended]
            usage = self.usage([len(p) for p in prompts], ended)
            yield sse(CompletionResponse(id=request_id, model=self.info.name, choices=[], usage=usage))

    async def prompt_ids(self, prompt) -> list[list[int]]:
        """A string, strings, token ids or lists of token ids -> one token-id list per prompt (texts are
        tokenized off the event loop)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise bad_request("the prompt is empty", "prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        self.check_num_prompts(len(prompt))
        if isinstance(prompt[0], str):
            return await self.encode(prompt, "prompt", add_special_tokens=True)
        return [list(p) for p in prompt]

    def completion_params(self, request: CompletionRequest, prompt_len: int) -> SamplingParams:
        """The request's SamplingParams; prompt logprobs are computed for echo with logprobs and for
        prompt_logprobs, as many alternatives as the larger asks for."""
        max_tokens = 1 if scores_prompt_only(request) else request.max_tokens
        params = self.sampling_params(request, prompt_len, max_tokens, request.logprobs)
        wanted = [n for n in (request.prompt_logprobs, request.logprobs if request.echo else None) if n is not None]
        return replace(params, prompt_logprobs=max(wanted)) if wanted else params

    def echo_text(self, prompt: list[int]) -> str:
        """The prompt as its tokens spell it, special tokens included, so that the echoed tokens'
        text offsets index into it."""
        return self.tokenizer.decode(prompt, skip_special_tokens=False)

    def logprobs(self, token_ids: list[int], entries: list[TokenLogprob | None], offset: int,
                 num_top: int) -> CompletionLogprobs:
        """OpenAI's legacy logprobs of token_ids (an entry of None: the prompt's first token, which has
        no logprob); text offsets count from `offset`; each top_logprobs holds the token itself and
        its num_top best alternatives."""
        result = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries):
            token = self.token_text(token_id)
            result.tokens.append(token)
            result.text_offset.append(offset)
            offset += len(token)
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            best = TokenLogprob(entry.token_id, entry.logprob, dict(list(entry.top.items())[:num_top]))
            result.token_logprobs.append(max(entry.logprob, MIN_LOGPROB))
            top = {}  # best first, so of two tokens spelled alike (partial UTF-8) the likelier stays
            for token_id, logprob in self.top_alternatives(best):
                top.setdefault(self.token_text(token_id), max(logprob, MIN_LOGPROB))
            result.top_logprobs.append(top)
        return result

    def prompt_logprobs(self, entries: list[TokenLogprob | None], num_top: int
                        ) -> list[dict[int, PromptLogprob] | None]:
        """vLLM's prompt_logprobs: per prompt token (None for the first), the token with its rank and
        its num_top best alternatives (ranks 1..num_top), keyed by token id."""
        result: list[dict[int, PromptLogprob] | None] = [None]
        for entry in entries[1:]:
            alternatives = {entry.token_id: PromptLogprob(logprob=max(entry.logprob, MIN_LOGPROB), rank=entry.rank,
                                                          decoded_token=self.token_text(entry.token_id))}
            for rank, (token_id, logprob) in enumerate(list(entry.top.items())[:num_top], start=1):
                alternatives.setdefault(token_id, PromptLogprob(logprob=max(logprob, MIN_LOGPROB), rank=rank,
                                                                decoded_token=self.token_text(token_id)))
            result.append(alternatives)
        return result


def scores_prompt_only(request: CompletionRequest) -> bool:
    """echo with max_tokens 0: the response is the prompt alone (vLLM's scoring request)."""
    return request.echo and request.max_tokens == 0


def prompt_only(output: RequestOutput) -> RequestOutput:
    """For max_tokens 0 the engine makes one token, as vLLM does (a request always yields one); the
    response, and its usage, hold none of it."""
    emptied = [replace(c, text="", token_ids=[], exit_layers=[], logprobs=None if c.logprobs is None else [])
               for c in output.outputs]
    return replace(output, outputs=emptied)

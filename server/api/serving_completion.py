"""POST /v1/completions: prompts in, text_completion objects (or their stream) out."""
from collections.abc import AsyncIterator

from server.api.errors import bad_request
from server.api.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                 random_id)
from server.api.serving import (ChoiceCursor, OpenAIServing, advance, request_ids, sse,
                                stream_with_errors)
from server.engine.outputs import RequestOutput, TokenLogprob


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
        if request.echo and request.logprobs is not None:
            raise bad_request("echo with logprobs is not supported (prompt logprobs are not computed)", "echo")
        prompts = [self.check_prompt(ids) for ids in self.prompt_ids(request.prompt)]
        params = [self.sampling_params(request, len(ids), request.max_tokens, request.logprobs) for ids in prompts]
        ids = request_ids(request_id, len(prompts))
        self.admission.check(len(prompts))
        if request.stream:
            events = self.stream(request, prompts, params, ids, raw_request, request_id)
            return stream_with_errors(events, lambda err: self.internal_error(err, request_id))
        finals: dict[int, RequestOutput] = {}
        async with self.run(prompts, params, ids, raw_request) as outputs:
            async for i, output in outputs:
                finals[i] = output
        outputs = [finals[i] for i in range(len(prompts))]
        choices = []
        for i, output in enumerate(outputs):
            prefix = self.tokenizer.decode(prompts[i]) if request.echo else ""
            for c in output.outputs:
                choices.append(CompletionChoice(
                    index=i * request.n + c.index, text=prefix + c.text,
                    logprobs=self.logprobs(c.logprobs, 0) if request.logprobs is not None else None,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    exit_layers=c.exit_layers if request.return_exit_layers else None,
                    token_ids=c.token_ids if request.return_token_ids else None))
        return CompletionResponse(id=request_id, model=self.info.name, choices=choices,
                                  usage=self.usage([len(p) for p in prompts], outputs))

    async def stream(self, request: CompletionRequest, prompts, params, ids, raw_request, request_id):
        cursors = {}  # choice index -> ChoiceCursor
        offsets = {}  # choice index -> text offset of the next logprob token
        finals: dict[int, RequestOutput] = {}
        async with self.run(prompts, params, ids, raw_request) as outputs:
            async for i, output in outputs:
                finals[i] = output
                for c in output.outputs:
                    index = i * request.n + c.index
                    first = index not in cursors
                    delta = advance(cursors.setdefault(index, ChoiceCursor()), c)
                    if delta is None:
                        continue
                    text = delta.text
                    if first and request.echo:
                        text = self.tokenizer.decode(prompts[i]) + text
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs = self.logprobs(delta.logprobs, offsets.get(index, 0))
                        offsets[index] = offsets.get(index, 0) + sum(len(t) for t in logprobs.tokens)
                    choice = CompletionChoice(
                        index=index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason,
                        exit_layers=delta.exit_layers if request.return_exit_layers else None,
                        token_ids=delta.token_ids if request.return_token_ids else None)
                    yield sse(CompletionResponse(id=request_id, model=self.info.name, choices=[choice]))
        if request.stream_options and request.stream_options.include_usage:
            usage = self.usage([len(p) for p in prompts], [finals[i] for i in sorted(finals)])
            yield sse(CompletionResponse(id=request_id, model=self.info.name, choices=[], usage=usage))

    def prompt_ids(self, prompt) -> list[list[int]]:
        """A string, strings, token ids or lists of token ids -> one token-id list per prompt."""
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt, add_special_tokens=True)]
        if not prompt:
            raise bad_request("the prompt is empty", "prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        if isinstance(prompt[0], str):
            return [self.tokenizer.encode(p, add_special_tokens=True) for p in prompt]
        return [list(p) for p in prompt]

    def logprobs(self, entries: list[TokenLogprob] | None, offset: int) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for entry in entries or []:
            token = self.token_text(entry.token_id)
            result.tokens.append(token)
            result.token_logprobs.append(entry.logprob)
            result.top_logprobs.append({self.token_text(t): lp for t, lp in self.top_alternatives(entry)})
            result.text_offset.append(offset)
            offset += len(token)
        return result

"""POST /v1/chat/completions: messages rendered with the model's chat template, chat.completion out."""
import asyncio
from collections.abc import AsyncIterator

from server.api.errors import bad_request
from server.api.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                 ChatLogprob, ChatLogprobs, ChatResponseMessage, ChatStreamChoice, ChatTopLogprob,
                                 DeltaMessage, random_id)
from server.api.serving import ChoiceCursor, OpenAIServing, advance, sse, stream_with_errors
from server.engine.outputs import RequestOutput, TokenLogprob
from server.engine.sampling_params import MAX_LOGPROBS


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request=None
                                     ) -> ChatCompletionResponse | AsyncIterator[str]:
        """The response, or for stream: true its server-sent events (errors after that go in the stream)."""
        request_id = random_id("chatcmpl")
        try:
            return await self.complete(request, raw_request, request_id)
        except Exception as err:
            raise self.internal_error(err, request_id) from None

    async def complete(self, request: ChatCompletionRequest, raw_request, request_id: str):
        self.check_model(request.model)
        prompt = self.check_prompt(await self.render(request), param="messages")
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs requires logprobs: true", "top_logprobs")
        if request.top_logprobs is not None and not 0 <= request.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"top_logprobs must be between 0 and {MAX_LOGPROBS}", "top_logprobs")
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = self.sampling_params(request, len(prompt), max_tokens, logprobs)
        self.check_admissible([len(prompt)], [params])
        if request.stream:
            events = self.stream(request, prompt, params, request_id, raw_request)
            return stream_with_errors(events, lambda err: self.internal_error(err, request_id))
        final: RequestOutput | None = None
        async with self.run([prompt], [params], [request_id], raw_request) as outputs:
            async for _, final in outputs:
                pass
        choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                              logprobs=self.logprobs(c.logprobs, request.top_logprobs or 0) if request.logprobs else None,
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                              exit_layers=c.exit_layers if request.return_exit_layers else None,
                              token_ids=c.token_ids if request.return_token_ids else None)
                   for c in final.outputs]
        return ChatCompletionResponse(id=request_id, model=self.info.name, choices=choices,
                                      usage=self.usage([len(prompt)], [final]))

    async def stream(self, request: ChatCompletionRequest, prompt, params, request_id, raw_request):
        def chunk(choices, usage=None):
            return sse(ChatCompletionChunk(id=request_id, model=self.info.name, choices=choices, usage=usage))

        # OpenAI opens each choice with its role, content empty.
        for i in range(request.n):
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        cursors = [ChoiceCursor() for _ in range(request.n)]
        final: RequestOutput | None = None
        async with self.run([prompt], [params], [request_id], raw_request) as outputs:
            async for _, final in outputs:
                for c in final.outputs:
                    delta = advance(cursors[c.index], c)
                    if delta is None:
                        continue
                    logprobs = self.logprobs(delta.logprobs, request.top_logprobs or 0) if request.logprobs else None
                    yield chunk([ChatStreamChoice(
                        index=c.index, delta=DeltaMessage(content=delta.text or None), logprobs=logprobs,
                        finish_reason=delta.finish_reason, stop_reason=delta.stop_reason,
                        exit_layers=delta.exit_layers if request.return_exit_layers else None,
                        token_ids=delta.token_ids if request.return_token_ids else None)])
        if request.stream_options and request.stream_options.include_usage:
            yield chunk([], self.usage([len(prompt)], [final] if final else []))

    async def render(self, request: ChatCompletionRequest) -> list[int]:
        """The prompt's token ids; the template renders on a worker thread (jinja is Python, so the event
        loop keeps its turns), then the text tokenizes off the loop too."""
        messages = []
        for message in request.messages:
            content = message.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            messages.append({"role": message.role, "content": content or ""}
                            | ({"name": message.name} if message.name else {}))
        try:
            text = await asyncio.to_thread(self.tokenizer.apply_chat_template, messages, add_generation_prompt=True)
        except Exception as err:  # jinja2's TemplateError, or a model without a template (ValueError)
            raise bad_request(f"cannot apply the chat template: {err}", "messages") from None
        return (await self.encode([text], "messages", add_special_tokens=False))[0]

    def logprobs(self, entries: list[TokenLogprob] | None, num_top: int) -> ChatLogprobs:
        content = []
        for entry in entries or []:
            token = self.token_text(entry.token_id)
            top = [ChatTopLogprob(token=self.token_text(t), logprob=lp, bytes=list(self.token_text(t).encode()))
                   for t, lp in self.top_alternatives(entry)[:num_top]]
            content.append(ChatLogprob(token=token, logprob=entry.logprob, bytes=list(token.encode()),
                                       top_logprobs=top))
        return ChatLogprobs(content=content)

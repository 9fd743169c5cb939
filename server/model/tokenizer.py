"""The tokenizer and chat template of a model, behind one small class.

Both model sources end in a `tokenizers.Tokenizer`: a Hugging Face folder ships tokenizer.json;
a GGUF ships its vocabulary and merges as metadata, from which `byte_level_bpe` builds the same
tokenizer. Chat templates render with jinja2 the way transformers renders them (sandboxed,
trim_blocks + lstrip_blocks, `raise_exception`, a `tojson` that leaves non-ASCII alone).
"""
import json
import logging
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

log = logging.getLogger(__name__)

# llama.cpp's token types (tokenizer.ggml.token_type) that matter here
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


class Tokenizer:
    def __init__(self, backend: BackendTokenizer, *, eos_token_ids: list[int], bos_token_id: int | None = None,
                 pad_token_id: int | None = None, chat_template: str | None = None,
                 template_tokens: dict[str, str] | None = None):
        self.backend = backend
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        # special-token strings the template may name: bos_token, eos_token, ...
        self.template_tokens = dict(template_tokens or {})
        added = backend.get_added_tokens_decoder()
        self.all_special_ids = sorted({i for i, token in added.items() if token.special} | set(self.eos_token_ids)
                                      | ({bos_token_id} if bos_token_id is not None else set()))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **context) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **{**self.template_tokens, **context})


class GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers), rendered as its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which a prompt must not have
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compile_chat_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         tools: list[dict] | None = None, documents: list[dict] | None = None, **context) -> str:
    return compile_chat_template(template).render(messages=messages, tools=tools, documents=documents,
                                                  add_generation_prompt=add_generation_prompt, **context)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: byte-level BPE vocabularies are spelled in it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> how llama.cpp splits text before BPE (its llama-vocab.cpp regexes)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["default", "gpt-2", "gpt2", "olmo", "jais"], "gpt2"),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"],
                    "gpt2-digits"),
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx"], "llama3"),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], "qwen2"),
}


def pre_tokenizer_for(pre: str | None) -> pre_tokenizers.PreTokenizer:
    kind = PRE_TOKENIZER_SPLITS.get(pre or "default")
    if kind is None:
        log.warning("unknown GGUF pre-tokenizer %r, splitting text the GPT-2 way", pre)
        kind = "gpt2"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind.startswith("gpt2"))
    if kind == "gpt2":
        return byte_level
    if kind == "gpt2-digits":  # every digit is a word of its own
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = _LLAMA3_SPLIT if kind == "llama3" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int] | None, pre: str | None,
                   bos_token_id: int | None = None, add_bos_token: bool = False) -> BackendTokenizer:
    """A GGUF's byte-level BPE (tokenizer.ggml.model == "gpt2") as a `tokenizers.Tokenizer`."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    token_types = list(token_types) if token_types is not None else [TOKEN_NORMAL] * len(tokens)
    vocab = {}
    for index, (token, token_type) in enumerate(zip(tokens, token_types)):
        if token_type == TOKEN_NORMAL and not set(token) <= alphabet:
            # some converters store a token as raw text rather than in the byte alphabet
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizer_for(pre)
    backend.decoder = decoders.ByteLevel()
    # control tokens (<|im_start|>) are matched whole and are special; user-defined ones are matched
    # whole but decode like text
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, token_types) if kind == TOKEN_CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, token_types) if kind == TOKEN_USER_DEFINED])
    if add_bos_token and bos_token_id is not None:
        bos = tokens[bos_token_id]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_token_id)])
    return backend

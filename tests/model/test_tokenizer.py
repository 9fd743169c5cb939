"""Tokenizers built from GGUF metadata and from tokenizer.json, and chat templates, against transformers."""
import json

import jinja2
import pytest

from server.model.gguf_reader import read_gguf
from server.model.tokenizer import render_chat_template

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "héllo café naïve Ærøskøbing über straße",
    "emoji 🤗🚀 family 👩‍👩‍👧 flags 🇫🇷 end",
    "def main(args):\n    return sum(x * 2 for x in args)  # doubled\n\n\tpass",
    "a   b\t\t c\n\n\n d  \r\n e",
    "   leading and trailing   ",
    "12345 3.14159 1e-9 0x1F 2024-01-01",
    "don't I'll we've THEY'RE",
    "中文字符 日本語 한국어 русский עברית",
    "\u00a0nbsp\u2009thin\u200bzero-width",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "not special: <|im_start |> <im_end>",
    "",
    " ",
    "\n",
]
MESSAGES = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Ünïcödé 🤗?"}],
]


def assert_same_tokenizer(ours, reference, texts):
    for text in texts:
        ids = reference.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), text


@pytest.fixture
def tiny_transformers_tokenizer(tiny_gguf, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tiny = tiny_gguf()
    _, _, ours, _ = read_gguf(tiny.path)
    return ours, AutoTokenizer.from_pretrained(tiny.path.parent, gguf_file=tiny.path.name)


def test_tiny_gguf_tokenizer_matches_transformers(tiny_transformers_tokenizer):
    ours, reference = tiny_transformers_tokenizer
    assert_same_tokenizer(ours, reference, TEXTS)
    for messages in MESSAGES:
        for prompt in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == \
                reference.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)


def test_byte_level_round_trip_and_special_tokens(tiny_gguf):
    _, _, tok, _ = read_gguf(tiny_gguf().path)
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "hi"
    assert tok.encode("x 123") == tok.encode("x ") + tok.encode("1") + tok.encode("2") + tok.encode("3")
    assert tok.eos_token_ids == [2] and tok.bos_token_id == 1 and tok.pad_token_id == 0
    assert tok.all_special_ids == [0, 1, 2]
    assert tok.vocab_size == 400
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # add_bos_token is false


def test_add_bos_token_from_metadata(tiny_gguf):
    _, _, tok, _ = read_gguf(tiny_gguf(edit=lambda w: w.add_add_bos_token(True)).path)
    assert tok.encode("hi", add_special_tokens=True) == [1] + tok.encode("hi")


def test_extra_end_of_generation_ids(tiny_gguf):
    hf, _, tok, _ = read_gguf(tiny_gguf(edit=lambda w: w.add_eot_token_id(0)).path)
    assert hf["eos_token_id"] == [2, 0] and tok.eos_token_ids == [2, 0]


TEMPLATE_FEATURES = """{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}
{%- set messages = messages[1:] %}{%- else %}{%- set system = 'default' %}{%- endif %}
{{ bos_token }}[{{ system }}]
{% for message in messages %}
    {% if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}
    {% if loop.index0 > 5 %}{% break %}{% endif %}
  <{{ message['role'] }}> {{ message['content'] | trim }}{{ eos_token }}
    {% if message.meta is defined %}{{ message.meta | tojson }}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


@pytest.fixture
def hf_tokenizer_folder(tmp_path, tiny_vocab):
    """A Hugging Face folder's tokenizer files: tokenizer.json from the tiny vocabulary, a config
    naming bos/eos, and a chat template using the features transformers' renderer provides."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(tiny_vocab.tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in tiny_vocab.merges]))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tiny_vocab.tokens[:3]])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "chat_template": TEMPLATE_FEATURES}))
    return tmp_path


def test_hf_tokenizer_json_and_template_match_transformers(hf_tokenizer_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from server.model.hf_reader import read_tokenizer

    ours = read_tokenizer(hf_tokenizer_folder, {"eos_token_id": [2], "bos_token_id": 1})
    reference = AutoTokenizer.from_pretrained(hf_tokenizer_folder)
    assert_same_tokenizer(ours, reference, TEXTS)
    conversations = MESSAGES + [[{"role": "user", "content": f"m{i} ", "meta": {"ü": [i, None]}} for i in range(8)]]
    for messages in conversations:
        for prompt in (True, False):
            expected = reference.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == expected
    with pytest.raises(jinja2.TemplateError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_sandbox_and_generation_tag():
    rendered = render_chat_template("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}"
                                    "{% endfor %}", [{"content": "a"}, {"content": "b"}])
    assert rendered == "ab"
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.__class__.__init__.__globals__ }}", [])
    with pytest.raises(jinja2.exceptions.SecurityError):  # immutable: templates cannot edit the messages
        render_chat_template("{{ messages.append(1) }}", [])


def test_missing_template_is_a_clear_error(hf_tokenizer_folder):
    from server.model.hf_reader import read_tokenizer

    config = json.loads((hf_tokenizer_folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (hf_tokenizer_folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = read_tokenizer(hf_tokenizer_folder, {"eos_token_id": [2]})
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(MESSAGES[0])


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_loader(smollm2_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from server.model.gguf_reader import GGUFFile, read_config, read_tokenizer

    f = GGUFFile(smollm2_path)
    ours = read_tokenizer(f, read_config(f))
    reference = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    assert_same_tokenizer(ours, reference, TEXTS)
    assert ours.eos_token_ids == [reference.eos_token_id] == [2]
    assert ours.bos_token_id == reference.bos_token_id == 1
    assert set(reference.all_special_ids) <= set(ours.all_special_ids)
    for messages in MESSAGES:
        for prompt in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == \
                reference.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
    # the template's default system prompt is there when the conversation brings none
    assert ours.apply_chat_template(MESSAGES[0]).startswith("<|im_start|>system\nYou are a helpful AI assistant")

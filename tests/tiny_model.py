"""A tiny random Llama written as a Hugging Face folder, and exit heads for it.

Fast tests of the engine, the HTTP server and calibration run on this instead of SmolLM2:
same code paths (loader, tokenizer, chat template), milliseconds per step.
"""
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from server.model.config import ModelConfig
from server.model.exit_head import AdapterSpec
from server.model.exit_heads import ExitHeadSet
from server.model.llama import LlamaForCausalLM

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EXIT_LAYERS = [2, 4]


def _corpus() -> list[str]:
    words = ("the a cat dog sat on mat ran to home quick brown fox jumps over lazy what is capital of france paris "
             "hello world code def return print for in range list one two three four five red green blue sky "
             "sun moon star tree house car road water fire earth air day night good bad new old big small").split()
    lines = []
    for i in range(400):
        lines.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)))
    lines += ["Héllo, naïve café! 😀 ü ß", "def f(x):\n    return x * 2\n", "  spaces   and\ttabs\n\n"]
    return lines


def train_tokenizer(vocab_size: int = 320) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def tiny_config(vocab_size: int, eos_id: int, **overrides) -> ModelConfig:
    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, bos_token_id=None, eos_token_id=[eos_id])
    values.update(overrides)
    return ModelConfig(**values)


def write_tiny_model(directory, seed: int = 0, **overrides) -> Path:
    """A complete Hugging Face folder: config, safetensors, tokenizer, chat template."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    eos_id = tokenizer.token_to_id("<|im_end|>")
    config = tiny_config(tokenizer.get_vocab_size(), eos_id, **overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
        # A sharper output layer makes greedy choices far from ties, so batch size never flips them.
        model.model.embed_tokens.weight.mul_(4.0)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config.to_hf() | {"torch_dtype": "float32"}, indent=2))
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings,
        "added_tokens_decoder": {str(tokenizer.token_to_id(t)): {"content": t, "special": True} for t in SPECIAL},
    }, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}))
    return directory


def write_tiny_heads(directory, model, fingerprint: str, name: str = "tiny",
                     thresholds: dict[float, dict[int, float]] | None = None, seed: int = 1) -> Path:
    """Exit heads at EXIT_LAYERS with random adapters and synthetic thresholds (not calibrated).

    Default thresholds make a mix: at eps 0.9 both heads are on with low thresholds (many exits),
    at eps 0.99 the first head is off."""
    torch.manual_seed(seed)
    heads = ExitHeadSet.create(model, EXIT_LAYERS, AdapterSpec("linear", 8), {"name": name, "fingerprint": fingerprint})
    with torch.no_grad():
        for head in heads.heads.values():
            for p in head.adapter.parameters():
                p.normal_(0.0, 0.05)
    thresholds = thresholds or {0.9: {2: 0.05, 4: 0.02}, 0.99: {2: math.inf, 4: 0.3}}
    heads.set_calibration("margin", {eps: {"thresholds": t} for eps, t in thresholds.items()},
                          default_epsilon=max(thresholds), synthetic=True)
    heads.save(directory)
    return Path(directory)


SHORTLIST_LAYERS = (4, 6)  # an intermediate shortlist head and one after the last of the 6 layers


def write_tiny_shortlist_heads(directory, model, fingerprint: str, name: str = "tiny", listed: int = 200,
                               components: int = 48, thresholds: dict[float, dict[int, float]] | None = None,
                               seed: int = 2) -> Path:
    """Shortlist heads at SHORTLIST_LAYERS: `listed` random token ids (EOS among them), a mass estimator
    made of `components` random unlisted LM-head rows with the bias that scales their sum to all
    unlisted tokens (a plausible estimate that is sometimes high, sometimes low), synthetic thresholds:
    at eps 0.9 both heads on, at eps 0.99 (default) only the last-layer head."""
    torch.manual_seed(seed)
    config = model.config
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    ids = torch.randperm(config.vocab_size)
    ids = torch.cat([torch.tensor([eos]), ids[ids != eos][:listed - 1]])
    heads = ExitHeadSet.create(model, list(SHORTLIST_LAYERS), AdapterSpec("linear", 8),
                               {"name": name, "fingerprint": fingerprint}, shortlist=ids, mass_components=components,
                               shortlist_meta={"built_from": "random (test)"})
    unlisted = torch.ones(config.vocab_size, dtype=torch.bool)
    unlisted[ids] = False
    rows = model.lm_head.weight.detach()[unlisted]
    pick = torch.randperm(len(rows))[:components]
    with torch.no_grad():
        for head in heads.heads.values():
            head.mass.proj.weight.copy_(rows[pick])
            head.mass.proj.bias.fill_(math.log(len(rows) / components))
            if head.adapter is not None:
                for p in head.adapter.parameters():
                    p.normal_(0.0, 0.05)
    thresholds = thresholds or {0.9: {4: 0.2, 6: 0.0}, 0.99: {4: math.inf, 6: 0.3}}
    heads.set_calibration("margin", {eps: {"thresholds": t} for eps, t in thresholds.items()},
                          default_epsilon=max(thresholds), synthetic=True)
    heads.save(directory)
    return Path(directory)

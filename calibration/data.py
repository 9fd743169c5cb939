"""Data for fitting, calibrating and evaluating exit heads: the model's own replies, text, and what
the frozen model computes on them.

A `Sample` is a token sequence plus the positions that count: for a chat reply, the rows a decode
step runs (input = a reply token, output = the next token; the first reply token comes from the
prefill at full depth and is not one); for text, every position. Labels are always the full
model's top-1 on the same prefix, never the data's next token.

Replies are generated with the serving engine (batched, full depth unless heads are given) and
cached as JSON lines keyed by the settings, so a second run, or the CLI after a background run
with the same settings, reuses them.
"""
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
PROMPTS_DIR = Path(__file__).parent / "prompts"
POOL_LIMIT = 4 << 30  # bytes of KV cache reply generation may take


@dataclass(frozen=True)
class Prompt:
    """A chat prompt: its messages as (role, content) pairs, ending with a user turn, and the kind of
    request it stands for (chat, code, long, ...; "" when the file does not say)."""
    messages: tuple[tuple[str, str], ...]
    category: str = ""

    @classmethod
    def user(cls, text: str, category: str = "") -> "Prompt":
        return cls((("user", text),), category)

    def chat_messages(self) -> list[dict]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass
class Sample:
    token_ids: list[int]
    start: int  # first counted position: len(prompt) for a reply (its first reply token's row), 0 for text
    source: str = "reply"  # reply | text
    exit_layers: list[int] | None = None  # per reply token, the depth that produced it (on-policy runs)
    lm_head_skipped: list[bool] | None = None  # per reply token: never ran the full LM head (on-policy runs)
    decode_flops: tuple[float, float] | None = None  # engine's accounting: (spent, at full depth) for the reply
    category: str = ""  # the prompt's category (replies), or "text"

    @property
    def counted(self) -> range:
        """Positions whose output (a prediction of the next token) is scored."""
        return range(self.start, len(self.token_ids) - 1)

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[:self.start] if self.source == "reply" else []

    @property
    def reply_ids(self) -> list[int]:
        return self.token_ids[self.start:] if self.source == "reply" else self.token_ids


def read_prompts(path) -> list[Prompt]:
    """One user prompt per line of a text file; a .jsonl file gives per line its "messages" (and
    "category"; calibration/prompt_sets.py writes these), or turns[0] (Vicuna/MT-bench), or "prompt"."""
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return [Prompt.user(line.strip()) for line in lines]
    prompts = []
    for number, line in enumerate(lines, 1):
        entry = json.loads(line)
        category = str(entry.get("category", ""))
        if "messages" in entry:
            messages = tuple((m["role"], m["content"]) for m in entry["messages"])
            if not messages or messages[-1][0] != "user":
                raise ValueError(f"{path}:{number}: the messages must end with a user turn")
            prompts.append(Prompt(messages, category))
        else:
            prompts.append(Prompt.user(entry["turns"][0] if "turns" in entry else entry["prompt"], category))
    return prompts


def chat_ids(tokenizer, prompt: "Prompt | str") -> list[int]:
    """The prompt rendered with the model's chat template, ready for the assistant's reply."""
    messages = prompt.chat_messages() if isinstance(prompt, Prompt) else [{"role": "user", "content": prompt}]
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                            add_special_tokens=False)


def prompt_key(prompt: "Prompt | str"):
    """What identifies a prompt in the reply cache (JSON)."""
    return [list(m) for m in prompt.messages] if isinstance(prompt, Prompt) else prompt


def data_hash(samples: list[Sample]) -> str:
    """Short sha256 of the token ids and counted spans: identifies a data set in exits.json."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(json.dumps([s.start, s.token_ids]).encode())
    return digest.hexdigest()[:16]


def file_hash(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def generate_replies(loaded, prompts: list["Prompt | str"], *, max_tokens: int, temperature: float = 0.0,
                     seed: int = 0, samples_per_prompt: int = 1, batch: int = 32, cache: Path | None = None,
                     heads=None, epsilon: float | None = None) -> list[Sample]:
    """The model's replies to chat prompts, samples_per_prompt each, `batch` sequences at a time
    (continuous batching: a finished reply makes room for the next prompt at once).

    heads/epsilon: generate with early exit (on-policy data; exit layers are recorded), else at
    full depth. Each reply is appended to `cache` (JSON lines) as it finishes, under a key of all the
    settings, so a killed run resumes where it stopped."""
    from server.engine.config import EngineConfig
    from server.engine.engine import LLMEngine
    from server.engine.sampling_params import SamplingParams

    tokenizer = loaded.tokenizer
    settings = {"model": loaded.fingerprint, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
                "heads": None if heads is None else _heads_key(heads, epsilon), "epsilon": epsilon}
    if heads is not None:  # on-policy records carry lm_head_skipped since record format 2
        settings["record"] = 2
    jobs = [(p, i) for p in prompts for i in range(samples_per_prompt)]
    keys = [hashlib.sha256(json.dumps([settings, prompt_key(p), i]).encode()).hexdigest() for p, i in jobs]
    done = _read_cache(cache)
    missing = [j for j, key in enumerate(keys) if key not in done]
    if missing:
        prompt_ids = {j: chat_ids(tokenizer, jobs[j][0]) for j in missing}
        lengths = sorted(len(ids) + max_tokens + 1 for ids in prompt_ids.values())
        # KV for `batch` of the longest sequences, so nothing is ever preempted (recomputing wastes the
        # machine), up to POOL_LIMIT; past it the engine preempts and recomputes when long prompts crowd in
        dtype = loaded.model.lm_head.weight.dtype
        pool = min(kv_pool_bytes(loaded.config, batch, lengths[-1], dtype=dtype), POOL_LIMIT)
        pool = max(pool, kv_pool_bytes(loaded.config, 1, lengths[-1], dtype=dtype))
        engine = LLMEngine(loaded.model, tokenizer, EngineConfig(
            model=loaded.name, heads=None, max_num_seqs=batch, max_num_batched_tokens=max(1024, batch),
            max_model_len=lengths[-1], kv_cache_memory=pool), heads=heads)
        for j in missing:
            engine.add_request(str(j), prompt_ids[j], SamplingParams(
                max_tokens=max_tokens, temperature=temperature, seed=None if temperature == 0 else seed * 1_000_003 + j,
                exit_epsilon=epsilon, early_exit=heads is not None))
        finished = 0
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
        while engine.has_unfinished_requests():
            entries = []
            for out in engine.step():
                if not out.finished:
                    continue
                j, completion = int(out.request_id), out.outputs[0]
                done[keys[j]] = {"prompt_ids": prompt_ids[j], "reply_ids": list(completion.token_ids),
                                 "exit_layers": list(completion.exit_layers),
                                 "lm_head_skipped": list(completion.lm_head_skipped),
                                 "decode_flops": [out.decode_flops, out.decode_flops_full_depth]}
                entries.append({"key": keys[j], **done[keys[j]]})
            if entries and cache is not None:
                with cache.open("a") as f:
                    f.writelines(json.dumps(e) + "\n" for e in entries)
            if finished // 100 < (finished + len(entries)) // 100:
                log.info("replies: %d / %d generated", finished + len(entries), len(missing))
            finished += len(entries)
    samples = []
    for (prompt, _), key in zip(jobs, keys):
        entry = done[key]
        on_policy = heads is not None
        samples.append(Sample(entry["prompt_ids"] + entry["reply_ids"], len(entry["prompt_ids"]), "reply",
                              exit_layers=entry["exit_layers"] if on_policy else None,
                              lm_head_skipped=entry["lm_head_skipped"] if on_policy else None,
                              decode_flops=tuple(entry["decode_flops"]) if on_policy else None,
                              category=prompt.category if isinstance(prompt, Prompt) else ""))
    return samples


def _heads_key(heads, epsilon: float | None) -> str:
    """Identifies a head set's weights and its decisions at epsilon, so on-policy replies are
    re-made when either changes."""
    decisions = {"policy": heads.policy, "params": heads.policy_params}
    if epsilon is not None:
        decisions.update(thresholds=heads.thresholds(epsilon), gate_cuts=heads.gate_cuts(epsilon))
    digest = hashlib.sha256(json.dumps(decisions, sort_keys=True, default=str).encode())
    for name, tensor in sorted(heads.state_dict().items()):
        digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _read_cache(cache: Path | None) -> dict:
    done = {}
    if cache is not None and cache.is_file():
        for line in cache.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                done[entry.pop("key")] = entry
    return done


def kv_pool_bytes(config, batch: int, max_len: int, block_size: int = 16, dtype=torch.float32) -> int:
    """Bytes of a KV pool that holds `batch` sequences of max_len tokens, so generation never preempts."""
    from server.engine.kv_cache import KVPool

    blocks = batch * (-(-max_len // block_size) + 1)
    return blocks * KVPool.bytes_per_block(config, block_size, dtype)


def text_samples(path, tokenizer, *, seq_len: int = 256, max_tokens: int | None = None) -> list[Sample]:
    """A text file cut into sequences of seq_len tokens, up to max_tokens in all."""
    ids = tokenizer.encode(Path(path).read_text(encoding="utf-8", errors="replace"))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return [Sample(ids[i:i + seq_len], 0, "text", category="text") for i in range(0, len(ids) - 1, seq_len)
            if len(ids[i:i + seq_len]) > 1]


def batches(samples: list[Sample], max_tokens: int = 4096):
    """Right-padded batches of about max_tokens tokens: (indices of the samples, input_ids [B, T],
    attention_mask [B, T], counted [B, T] bool)."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].token_ids))
    group = []
    for i in order + [None]:
        width = max((len(samples[j].token_ids) for j in group), default=0)
        if i is None or (group and max(width, len(samples[i].token_ids)) * (len(group) + 1) > max_tokens):
            if group:
                yield group, *_pad([samples[j] for j in group])
            group = []
        if i is not None:
            group.append(i)


def _pad(group: list[Sample]):
    width = max(len(s.token_ids) for s in group)
    ids = torch.zeros(len(group), width, dtype=torch.long)
    mask = torch.zeros(len(group), width, dtype=torch.long)
    counted = torch.zeros(len(group), width, dtype=torch.bool)
    for row, s in enumerate(group):
        ids[row, :len(s.token_ids)] = torch.tensor(s.token_ids)
        mask[row, :len(s.token_ids)] = 1
        counted[row, s.start:len(s.token_ids) - 1] = True
    return ids, mask, counted

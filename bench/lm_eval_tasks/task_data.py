"""Datasets of the local lm-eval tasks (the YAMLs' `custom_dataset`), built with no dataset hub.

lm-eval calls these with the task's `metadata` (and `--metadata` from its command line) as keyword
arguments; unknown ones (version, ...) are ignored.
"""
import json
import random
import re
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent
TINYSTORIES = HERE.parents[2] / "shared" / "data" / "tinystories_val_sample.txt"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])")


def qa(**_) -> datasets.DatasetDict:
    """Short questions with one-word or one-number answers, written for this repo (qa.jsonl)."""
    docs = [json.loads(line) for line in (HERE / "qa.jsonl").read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def cloze_docs(text: str, num_docs: int, num_choices: int = 4, seed: int = 0) -> list[dict]:
    """Story endings: each paragraph of at least three sentences gives a context (its sentences but
    the last, at most four) and its true last sentence, which competes with the last sentences of
    num_choices - 1 other paragraphs."""
    paragraphs = []
    for block in text.split("\n\n"):
        sentences = SENTENCE_END.split(" ".join(block.split()))
        if len(sentences) >= 3 and all(20 <= len(s) <= 160 for s in sentences[-5:]):
            paragraphs.append(sentences)
    rng = random.Random(seed)
    rng.shuffle(paragraphs)
    endings = [p[-1] for p in paragraphs]
    docs = []
    for i, sentences in enumerate(paragraphs[:num_docs]):
        others = rng.sample([e for j, e in enumerate(endings) if j != i and e != sentences[-1]], num_choices - 1)
        label = rng.randrange(num_choices)
        choices = others[:label] + [sentences[-1]] + others[label:]
        docs.append({"context": " ".join(sentences[-5:-1]), "choices": choices, "label": label})
    return docs


def cloze(text_path: str | None = None, num_docs: int = 200, seed: int = 0, **_) -> datasets.DatasetDict:
    """The story-ending task, from TinyStories text (default ../shared/data, read at run time)."""
    text = Path(text_path or TINYSTORIES).read_text()
    docs = cloze_docs(text, int(num_docs), seed=int(seed))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})

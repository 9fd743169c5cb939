"""Prompt sets for exit-head fitting ("fit") and threshold calibration ("calib").

The material lives in calibration/prompts/material/*.txt, all written for Offramp. A file is a run
of sections; `@@ name` holds one item per line, `@@@ name` holds multi-line items separated by a
line `---`, and `@@ name|f1|f2` holds records (one per line, fields split on `|`). A section named
after a category holds top-level templates of that category; any other section is a pool. An item
may be a conversation: turns separated by a line `>>`, alternating user and assistant, ending
with the user. `~` is the empty item.

Templates fill slots, recursively:
  {{pool}}          a fresh item of the pool
  {{pool=1}}        the same item everywhere in this prompt (=2 is a different one); `.field` for records
  {{pool?}}         one of the items already bound above (a fresh one if none)
  {{pool*3-5/sep}}  3 to 5 distinct items joined by sep (`\\n` allowed; default a newline)
  {{#10-99}}        a random integer

Fit and calib must not share material, or calibrated thresholds would be measured on what the
heads were fitted to: every template section and every pool is split by a hash of each item,
about 60/40. Only pools named `_...` (instructions and glue, no topic of their own) are shared.
"""
import argparse
import hashlib
import json
import math
import random
import re
from pathlib import Path

CATEGORIES = ("chat", "facts", "code", "stories", "reasoning", "lists", "rewrite", "multiturn", "long")
TARGETS = {  # (fit, calib) entries per category; calib is about 60% of fit everywhere
    "chat": (290, 175), "facts": (260, 155), "code": (280, 170), "stories": (220, 135), "reasoning": (230, 140),
    "lists": (200, 120), "rewrite": (220, 135), "multiturn": (200, 125), "long": (180, 110),
}
LONG_CHARS = (1300, 6000)  # ~300 to ~1,500 tokens at ~4 characters a token
MAX_CHARS = 4000  # any other category
ROUGH_CATEGORIES = {"chat", "facts", "lists", "reasoning", "stories"}  # where typed-in-a-hurry prompts are natural
SYSTEM_SHARE = 0.08  # entries that get a system message first: some deployments send one, most don't
TEMPLATE_CAP = 2.0  # see build_category
MATERIAL_DIR = Path(__file__).parent / "prompts" / "material"
SLOT = re.compile(r"\{\{(.+?)\}\}")
SECTION = re.compile(r"^(@@@?) (\S+)$", re.M)


def read_material(folder: Path = MATERIAL_DIR) -> tuple[dict[str, list], dict[str, list[list]]]:
    """(pools, groups): pools[name] = items (str or dict); groups[category] = template sections,
    each a list of templates (a template is a list of turns)."""
    pools, groups = {}, {c: [] for c in CATEGORIES}
    for path in sorted(folder.glob("*.txt")):
        parts = SECTION.split(path.read_text(encoding="utf-8"))
        for mode, header, body in zip(parts[1::3], parts[2::3], parts[3::3]):
            if mode == "@@@":
                items = [b.strip("\n") for b in re.split(r"^---$", body, flags=re.M)]
            else:
                items = [line.strip() for line in body.splitlines()]
            items = ["" if i == "~" else i for i in items if i.strip()]
            name, *fields = header.split("|")
            if fields:
                rows = [i.split("|") for i in items]
                assert all(len(r) == len(fields) for r in rows), f"{path.name}: {name} has a malformed record"
                items = [dict(zip(fields, r)) for r in rows]
            if name in groups:
                groups[name].append([re.split(r"\n>>\n", i) for i in items])
            else:
                pools.setdefault(name, []).extend(items)
    return pools, groups


def split_of(items: list, salt: str) -> dict[str, list]:
    """Items ranked by a hash (stable across runs and machines, unlike hash()); every fifth and
    every fifth-plus-two go to calib, so even a pool of two has one item in each split."""
    key = lambda item: hashlib.sha256((salt + "\0" + json.dumps(item, sort_keys=True)).encode()).hexdigest()
    ranked = sorted(items, key=key)
    return {"fit": [i for r, i in enumerate(ranked) if r % 5 not in (1, 3)],
            "calib": [i for r, i in enumerate(ranked) if r % 5 in (1, 3)]}


class Filler:
    """Fills the slots of one prompt: the random source, this split's pools and the items bound so far."""

    def __init__(self, pools: dict[str, list], rng: random.Random):
        self.pools, self.rng, self.bound = pools, rng, {}

    def fill(self, text: str) -> str:
        return SLOT.sub(lambda m: self.slot(m.group(1)), text)

    def items(self, name: str) -> list:
        if not self.pools.get(name):
            raise LookupError(name)  # this split has none: the template is skipped
        return self.pools[name]

    def slot(self, spec: str) -> str:
        if spec.startswith("#"):
            low, high = map(int, spec[1:].split("-"))
            return str(self.rng.randint(low, high))
        if "*" in spec:
            name, rest = spec.split("*", 1)
            counts, _, sep = rest.partition("/")
            low, high = map(int, counts.split("-"))
            items = self.items(name)
            if len(items) < low:
                raise LookupError(name)
            chosen = self.rng.sample(items, self.rng.randint(low, min(high, len(items))))
            return (sep.replace("\\n", "\n") if sep else "\n").join(self.fill(i) for i in chosen)
        spec, _, field = spec.partition(".")
        if "=" in spec:
            name, key = spec.split("=")
            value = self.bind(name, key)
        elif spec.endswith("?"):
            bound = list(self.bound.get(spec[:-1], {}).values())
            value = self.rng.choice(bound)[1] if bound else self.bind(spec[:-1], f"any{len(bound)}")
        else:
            value = self.fill(self.rng.choice(self.items(spec)))
        return value[field] if field else value

    def bind(self, name: str, key: str):
        """The item bound to name=key, drawn on first use from the items not yet bound; a record's
        fields are filled once, so every mention agrees."""
        bound = self.bound.setdefault(name, {})
        if key not in bound:
            taken = {index for index, _ in bound.values()}
            free = [i for i in range(len(self.items(name))) if i not in taken]
            if not free:
                raise LookupError(name)
            index = self.rng.choice(free)
            item = self.pools[name][index]
            value = {k: self.fill(v) for k, v in item.items()} if isinstance(item, dict) else self.fill(item)
            bound[key] = (index, value)
        return bound[key][1]


def roughen(text: str, rng: random.Random) -> str:
    """Users type fast: some prompts lose capitals and the final stop, some get one or two swapped
    letters. Code and multi-line documents stay exact."""
    if "\n" in text or "`" in text:
        return text
    draw = rng.random()
    if draw < 0.10:
        return text.lower().rstrip(".!")
    if draw < 0.17:
        words = text.split(" ")
        for _ in range(rng.randint(1, 2)):
            i = rng.randrange(len(words))
            word = words[i]
            if len(word) >= 5 and word.isalpha():
                j = rng.randrange(1, len(word) - 2)
                words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2:]
        return " ".join(words)
    return text


def build_category(category: str, split: str, pools: dict, templates: list, rng: random.Random, seen: set) -> list[dict]:
    """TARGETS[category] distinct prompts. A fixed template (no slots) gives one; a template with slots
    gives at most TEMPLATE_CAP times its even share of the rest, so no single pattern dominates."""
    target = TARGETS[category][split == "calib"]
    num_slotted = sum("{{" in "".join(t) for t in templates)
    cap = math.ceil(TEMPLATE_CAP * (target - (len(templates) - num_slotted)) / max(num_slotted, 1))
    uses = [0] * len(templates)
    live = list(range(len(templates)))
    entries, attempts = [], 0
    while len(entries) < target and live and attempts < 200 * target:
        attempts += 1
        index = rng.choice(live)
        filler = Filler(pools, rng)
        try:
            turns = [filler.fill(t) for t in templates[index]]
        except LookupError:
            live.remove(index)  # a pool this split lacks, or too small a pool: it stays so
            continue
        turns = ["\n".join(line.rstrip() for line in t.split("\n")).strip() for t in turns]
        # keyed before the typos and the system message: those must not make a repeat look new
        key = " ".join(" ".join(turns).lower().split())
        low, high = LONG_CHARS if category == "long" else (1, MAX_CHARS)
        if not low <= sum(map(len, turns)) <= high or not all(turns) or key in seen:
            if "{{" not in "".join(templates[index]):
                live.remove(index)
            continue
        seen.add(key)
        uses[index] += 1
        if uses[index] == cap or "{{" not in "".join(templates[index]):
            live.remove(index)
        if category in ROUGH_CATEGORIES:
            turns[-1] = roughen(turns[-1], rng)
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        if rng.random() < SYSTEM_SHARE:
            messages.insert(0, {"role": "system", "content": filler.fill(rng.choice(pools["_system"]))})
        entries.append({"id": f"{split}-{category}-{len(entries):04d}", "category": category, "messages": messages})
    assert len(entries) == target, f"{split}/{category}: only {len(entries)} of {target} distinct prompts"
    return entries


def build_split(split: str, pools: dict, groups: dict, seed: int, seen: set) -> list[dict]:
    """One split: its share of every pool and every template section, each category on its own seed."""
    pools = {n: items if n.startswith("_") else split_of(items, n)[split] for n, items in pools.items()}
    entries = []
    for category in CATEGORIES:
        templates = [t for i, group in enumerate(groups[category]) for t in split_of(group, f"{category}{i}")[split]]
        rng = random.Random(int(hashlib.sha256(f"{seed}:{split}:{category}".encode()).hexdigest(), 16))
        entries += build_category(category, split, pools, templates, rng, seen)
    # shuffled, so that any prefix (the first N calibration prompts) mixes every category
    random.Random(f"{seed}:{split}:order").shuffle(entries)
    return entries


def build(seed: int = 0) -> dict[str, list[dict]]:
    """{"fit": [...], "calib": [...]}: each entry {"id", "category", "messages"}; deterministic in seed."""
    pools, groups = read_material()
    seen = set()  # shared, so not even a glue-only prompt can land in both splits
    return {split: build_split(split, pools, groups, seed, seen) for split in ("fit", "calib")}


def write_jsonl(entries: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="build the fitting and calibration prompt sets")
    parser.add_argument("--out", default=str(Path(__file__).parent / "prompts"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sets = build(args.seed)
    for split, entries in sets.items():
        write_jsonl(entries, Path(args.out) / f"{split}.jsonl")
        counts = {c: sum(e["category"] == c for e in entries) for c in CATEGORIES}
        print(split, len(entries), counts)


if __name__ == "__main__":
    main()

"""The fitting and calibration prompt sets: sizes, shape, disjointness, and that the shipped
jsonl files are exactly what the builder makes."""
import collections
import json
import re
import statistics
from pathlib import Path

import pytest

from calibration import prompt_sets
from calibration.prompt_sets import CATEGORIES, build, split_of

PROMPTS_DIR = Path(prompt_sets.__file__).parent / "prompts"
MIN_COUNTS = {"fit": 150, "calib": 90}  # per category, whatever TARGETS says


@pytest.fixture(scope="module")
def sets():
    return build()


def conversation(entry) -> str:
    """The turns a prompt is made of; the system message is shared boilerplate."""
    return "\n".join(m["content"] for m in entry["messages"] if m["role"] != "system")


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def words(text: str) -> str:
    """Stricter than normalize: punctuation goes too (so "C" and "C#" match; fine across sets only)."""
    return " ".join(re.findall(r"\w+", text.lower()))


def shingles(text: str, n: int = 3) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_sizes_and_categories(sets):
    assert len(sets["fit"]) >= 2000 and len(sets["calib"]) >= 1200
    for split, entries in sets.items():
        counts = collections.Counter(e["category"] for e in entries)
        assert set(counts) == set(CATEGORIES)
        for category in CATEGORIES:
            assert counts[category] >= MIN_COUNTS[split], (split, category, counts[category])


def test_entry_shape(sets):
    ids = [e["id"] for entries in sets.values() for e in entries]
    assert len(ids) == len(set(ids))
    for entries in sets.values():
        for e in entries:
            assert set(e) == {"id", "category", "messages"}
            roles = [m["role"] for m in e["messages"]]
            assert roles[-1] == "user"
            assert "system" not in roles[1:]
            for m in e["messages"]:
                assert set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
                assert isinstance(m["content"], str) and m["content"].strip() == m["content"] != ""
                assert "{{" not in m["content"] and "}}" not in m["content"], m["content"][:80]


def test_turns(sets):
    for entries in sets.values():
        for e in entries:
            roles = [m["role"] for m in e["messages"] if m["role"] != "system"]
            if e["category"] == "multiturn":
                assert len(roles) in (3, 5), e["id"]  # 2 or 4 prior turns
                assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], e["id"]
            else:
                assert roles == ["user"], e["id"]


def test_long_prompts_are_long(sets):
    for entries in sets.values():
        sizes = [len(conversation(e)) for e in entries if e["category"] == "long"]
        assert min(sizes) >= 1200 and max(sizes) <= 6000  # ~300 to ~1,500 tokens at ~4 characters a token
        assert statistics.median(sizes) >= 1500
        others = [len(conversation(e)) for e in entries if e["category"] != "long"]
        assert statistics.median(others) < 300


def test_sets_are_disjoint(sets):
    fit, calib = ({conversation(e) for e in sets[s]} for s in ("fit", "calib"))
    assert not fit & calib
    for key in (normalize, words):
        fit, calib = ({key(conversation(e)) for e in sets[s]} for s in ("fit", "calib"))
        assert not fit & calib
    fit_users, calib_users = ({words(m["content"]) for e in sets[s] for m in e["messages"] if m["role"] == "user"}
                              for s in ("fit", "calib"))
    generic = fit_users & calib_users  # only follow-ups like "can you make that shorter" may recur
    assert all(len(text.split()) <= 12 for text in generic), sorted(generic, key=len)[-3:]


def test_no_near_duplicates_across_sets(sets):
    """No calibration prompt shares most of its word 3-grams with any fitting prompt: shared
    instructions ("put it in a table") are fine, a shared template with shared fillers is not."""
    fit = [shingles(conversation(e)) for e in sets["fit"]]
    index = collections.defaultdict(list)
    for i, grams in enumerate(fit):
        for gram in grams:
            index[gram].append(i)
    worst = 0.0
    for e in sets["calib"]:
        grams = shingles(conversation(e))
        shared = collections.Counter(i for gram in grams for i in index.get(gram, ()))
        for i, count in shared.most_common(5):
            worst = max(worst, count / len(grams | fit[i]))
    assert worst < 0.6


def test_no_duplicates_within_a_set(sets):
    for entries in sets.values():
        texts = [normalize(conversation(e)) for e in entries]
        assert len(texts) == len(set(texts))


def test_variety(sets):
    """What the prompts must contain so that calibrated exits transfer: code, markdown, non-ASCII
    text (names, other languages), hurried lower-case typing, system messages, many openings."""
    for split, entries in sets.items():
        scale = len(entries) / 1000
        last = [e["messages"][-1]["content"] for e in entries]
        assert sum("```" in t for t in last) >= 40 * scale
        assert sum(bool(re.search(r"^(- |\d+\. |#+ |\| )", t, re.M)) for t in last) >= 40 * scale
        assert sum(any(ord(c) > 127 for c in conversation(e)) for e in entries) >= 40 * scale
        assert sum(t == t.lower() and "\n" not in t for t in last) >= 30 * scale
        assert sum(e["messages"][0]["role"] == "system" for e in entries) >= 30 * scale
        assert len({" ".join(t.lower().split()[:3]) for t in last}) >= 0.3 * len(entries)


def test_split_of_is_a_partition():
    items = [f"item {i}" for i in range(50)]
    parts = split_of(items, "pool")
    assert sorted(parts["fit"] + parts["calib"]) == sorted(items)
    assert not set(parts["fit"]) & set(parts["calib"])
    assert 15 <= len(parts["calib"]) <= 25
    assert split_of(list(reversed(items)), "pool") == {k: v for k, v in parts.items()}  # order does not matter
    assert all(split_of(["a", "b"], salt)["calib"] for salt in ("x", "y", "z"))


def test_material_pools_split_into_both_sets():
    pools, groups = prompt_sets.read_material()
    for name, items in pools.items():
        if not name.startswith("_"):
            assert len(items) >= 2, name
            assert len(set(map(json.dumps, items))) == len(items), f"{name} has a repeated item"
    for category in CATEGORIES:
        for group in groups[category]:
            assert len(group) >= 2, category  # one template per split at least


def test_deterministic(sets):
    assert build() == sets
    assert build(seed=1) != sets


def test_committed_files_match_build(sets):
    for split, entries in sets.items():
        lines = (PROMPTS_DIR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == entries, "rerun python -m calibration.prompt_sets"


def test_main_writes_jsonl(tmp_path, sets):
    prompt_sets.main(["--out", str(tmp_path)])
    for split, entries in sets.items():
        lines = (tmp_path / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == entries

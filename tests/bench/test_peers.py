"""bench.peers on the tiny model: every run generates what it should, the ratios are the per-round ratios,
each quantization is its own configuration, and llama.cpp's driver loop (against a stand-in for
llama-cpp-python that implements reset, eval and the context's logits) feeds and reads the right tokens."""
import argparse
import json
import statistics
import sys
import textwrap
from pathlib import Path

import pytest

from bench import peers

# next token = a fixed function of everything evaluated since reset(): a loop that forgets to feed back
# its token, feeds the prompt again, skips reset() or reads stale logits generates other tokens
FAKE_LLAMA_CPP = textwrap.dedent('''
    """A stand-in for llama-cpp-python's Llama: reset(), eval(ids), n_vocab() and _ctx.get_logits()."""
    import ctypes

    __version__ = "fake"
    VOCAB = 50


    def next_token(history):
        return (sum(history) * 31 + len(history)) % VOCAB


    class Context:
        def __init__(self):
            self.logits = (ctypes.c_float * VOCAB)()

        def get_logits(self):
            return ctypes.cast(self.logits, ctypes.POINTER(ctypes.c_float))


    class Llama:
        def __init__(self, model_path, n_threads, n_threads_batch, n_ctx, logits_all, verbose):
            assert not logits_all and n_threads == n_threads_batch
            self.n_ctx, self.history, self._ctx = n_ctx, [], Context()

        def n_vocab(self):
            return VOCAB

        def reset(self):
            self.history = []

        def eval(self, tokens):
            self.history += list(tokens)
            assert len(self.history) <= self.n_ctx
            for i in range(VOCAB):
                self._ctx.logits[i] = -1.0
            self._ctx.logits[next_token(self.history)] = 1.0
''')


@pytest.fixture
def fake_llama_cpp(tmp_path, monkeypatch):
    """The stand-in importable as llama_cpp here and in the memory benchmark's subprocess."""
    folder = tmp_path / "fake_llama_cpp"
    folder.mkdir()
    (folder / "llama_cpp.py").write_text(FAKE_LLAMA_CPP)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    import llama_cpp

    return llama_cpp


def test_llama_cpp_driver_feeds_back_each_greedy_token(fake_llama_cpp):
    prompts = [[5, 9, 2], [7], [1, 1, 1, 1]]
    llm = peers.open_llama_cpp(fake_llama_cpp, "model.gguf", threads=1, n_ctx=16)
    run = peers.run_llama_cpp(llm, prompts, max_tokens=6)
    expected = []
    for prompt in prompts:
        history, generated = list(prompt), []
        while len(generated) < 6:
            generated.append(fake_llama_cpp.next_token(history))
            history.append(generated[-1])
        expected.append(generated)
    assert run["token_ids"] == expected
    assert (run["tokens"], run["decode_tokens"], run["decode_steps"]) == (18, 15, 15)
    assert 0 < run["decode_s"] < run["wall_s"]


def test_llama_cpp_left_out_with_a_reason(monkeypatch):
    args = argparse.Namespace(skip_llama_cpp=False, device="cpu")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    assert peers.find_llama_cpp(args, Path("m.gguf")) == (None, "llama_cpp (llama-cpp-python) is not installed")
    assert "not a GGUF file" in peers.find_llama_cpp(args, Path("folder"))[1]
    assert peers.find_llama_cpp(argparse.Namespace(skip_llama_cpp=True, device="cpu"), Path("m.gguf"))[0] is None


def test_peers_runs_every_configuration(tiny_folders, prompts_file, tmp_path, capsys):
    model_dir, heads_dir = tiny_folders
    output = tmp_path / "peers.json"
    assert peers.main(["--model", str(model_dir), "--heads", str(heads_dir), "--prompts", str(prompts_file),
                       "--epsilon", "0.9", "--max-tokens", "5", "--batch-size", "3", "--batch1-prompts", "2",
                       "--rounds", "2", "--threads", "1", "--skip-memory", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    names = ["hf b1", "offramp full b1", "offramp eps=0.9 b1", "hf b3", "offramp full b3", "offramp eps=0.9 b3"]
    assert list(report["results"]) == names
    for name, row in report["results"].items():
        batch = row["batch"]
        prompts = 2 if batch == 1 else 3
        assert row["tokens_per_round"] == prompts * 5, name  # EOS ignored: exactly max_tokens each
        for r in report["per_round"][name]:
            assert r["decode_tokens"] == prompts * 4 and r["decode_steps"] == (4 * prompts if batch == 1 else 4)
            assert r["decode_s"] < r["wall_s"]
    assert report["results"]["offramp full b3"]["exited_early_share"] == 0.0
    assert report["results"]["offramp eps=0.9 b3"]["exited_early_share"] > 0.3
    per_round = report["per_round"]
    expected = statistics.median(a["decode_tok_s"] / b["decode_tok_s"]
                                 for a, b in zip(per_round["offramp eps=0.9 b3"], per_round["offramp full b3"]))
    assert report["ratios"]["offramp eps=0.9 b3 / offramp full b3"]["decode_tok_s"] == expected
    assert "offramp full b3 / hf b3" in report["ratios"]
    assert "not a GGUF file" in report["llama_cpp"]["skipped"] and report["memory"] == {}
    out = capsys.readouterr().out
    assert "ms/token" in out and "llama.cpp left out: the model is not a GGUF file" in out


def test_peers_with_quantizations_llama_cpp_and_memory(tiny_gguf, prompts_file, fake_llama_cpp, tmp_path, capsys):
    """A GGUF model: llama.cpp (the stand-in) joins the rounds at b1, Offramp runs float and int4, and
    each configuration's resident memory is measured in its own process."""
    gguf = tiny_gguf("Q4_1").path
    output = tmp_path / "peers.json"
    assert peers.main(["--model", str(gguf), "--prompts", str(prompts_file), "--epsilon", "--quantization",
                       "none,int4", "--max-tokens", "4", "--batch-size", "2", "--batch1-prompts", "2",
                       "--rounds", "2", "--threads", "1", "--skip-hf", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert list(report["results"]) == ["llama.cpp b1", "offramp full b1", "offramp int4 full b1",
                                       "offramp full b2", "offramp int4 full b2"]
    assert report["quantizations"] == ["none", "int4"] and report["llama_cpp"]["version"] == "fake"
    for r in report["per_round"]["llama.cpp b1"]:
        assert (r["tokens"], r["decode_tokens"], r["decode_steps"]) == (8, 6, 6)
    per_round = report["per_round"]
    for a, b in [("offramp full b1", "llama.cpp b1"), ("offramp int4 full b1", "llama.cpp b1"),
                 ("offramp int4 full b2", "offramp full b2")]:
        expected = statistics.median(x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(per_round[a], per_round[b]))
        assert report["ratios"][f"{a} / {b}"]["decode_tok_s"] == expected
    assert set(report["memory"]) == {"offramp", "offramp int4", "llama.cpp"}
    for label, m in report["memory"].items():
        assert "error" not in m, (label, m)
        assert 0 < m["rss_after_load_mb"] <= m["rss_after_start_mb"] <= m["rss_under_load_mb"] <= m["peak_rss_mb"]
    out = capsys.readouterr().out
    assert "llama.cpp: llama-cpp-python fake" in out and "offramp int4 full b1 / llama.cpp b1" in out
    assert "resident memory" in out

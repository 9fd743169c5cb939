"""bench.peers on the tiny model: every run generates what it should, and the ratios are the per-round ratios."""
import json
import statistics

from bench import peers


def test_peers_runs_every_configuration(tiny_folders, prompts_file, tmp_path, capsys):
    model_dir, heads_dir = tiny_folders
    output = tmp_path / "peers.json"
    assert peers.main(["--model", str(model_dir), "--heads", str(heads_dir), "--prompts", str(prompts_file),
                       "--epsilon", "0.9", "--max-tokens", "5", "--batch-size", "3", "--batch1-prompts", "2",
                       "--rounds", "2", "--threads", "1", "--output", str(output)]) == 0
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
    assert "ms/token" in capsys.readouterr().out

"""bench/gpu_check.sh --dry-run: the GPU check script's three steps run on the CPU and print their table."""
import subprocess
import sys
from pathlib import Path

import torch

from bench.gpu_check import TINY_SHAPE, write_random_model
from server.model.loader import load_model

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_prints_every_row(tmp_path):
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "OFFRAMP_HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("check"))):]
    checks = [line.split("  ")[0] for line in table[1:]]
    assert any(c.startswith("exit kernel, full vocab") for c in checks)
    assert any(c.startswith("exit kernel, shortlist") for c in checks)
    assert {"decode tiny B=1 full", "decode tiny B=1 all L/2", "decode tiny B=4 full", "decode tiny B=4 all L/2",
            "decode tiny B=4 50% L/2, 50% full"} <= {c.strip() for c in checks}
    assert any(c.startswith("server + openai client (random weights") for c in checks)
    assert all(" yes " in line for line in table[1:]), done.stdout


def test_random_model_loads_and_its_tokenizer_round_trips(tmp_path):
    """What the server check serves where no model can be fetched: a loadable folder, any text encodable."""
    loaded = load_model(str(write_random_model(tmp_path / "random", TINY_SHAPE)))
    assert loaded.config.num_hidden_layers == TINY_SHAPE["num_hidden_layers"] and loaded.config.tie_word_embeddings
    text = "Héllo, wörld! 😀"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == text
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with torch.no_grad():
        logits = loaded.model(torch.tensor([loaded.tokenizer.encode(prompt)]))
    assert logits.shape[-1] == loaded.config.vocab_size and torch.isfinite(logits).all()

"""bench/gpu_check.sh --dry-run: the GPU check script's three steps run on the CPU and print their table."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_prints_every_row(tiny_folders):
    model_dir, _ = tiny_folders
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--model", str(model_dir)],
                          capture_output=True, text=True, timeout=300, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("check"))):]
    checks = [line.split("  ")[0] for line in table[1:]]
    assert any(c.startswith("exit kernel, full vocab") for c in checks)
    assert any(c.startswith("exit kernel, shortlist") for c in checks)
    assert any(c.startswith("decode tiny B=1") for c in checks) and any("B=4" in c for c in checks)
    assert any(c.startswith("server + openai client") for c in checks)
    assert all(" yes " in line for line in table[1:]), done.stdout

"""Every script in examples/ runs and says what it promised."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_extract_api_example(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "extract_api.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    ranks = [int(ln.split("rank")[1].split()[0]) for ln in lines if " rank " in ln]
    assert len(ranks) == 6 and all(6 <= r <= 32 for r in ranks)
    assert "products agree" in lines[-1]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and (tmp_path / "adapter.safetensors").is_file()

"""Plain vs activation-whitened extraction at equal rank, judged by `evaluate` on held-out texts (issue 17).

    python benchmarks/eval_calibration.py OUT [RANKS]     # RANKS default 2,4,8; ~3 minutes on 2 busy cores

Builds OUT/causal with benchmarks/eval_pair.py (a 4-layer Llama pretrained on task A, fully fine-tuned on task B)
unless it is there, writes OUT/causal/calib.txt (128 task-B texts from the fine-tune's training stream, never the
held-out ones), calibrates on the base and on the tuned model, extracts plain and whitened adapters (exact SVD)
at each rank, and evaluates them all on OUT/causal/heldout.txt (OUT/causal/calibration.json).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import eval_pair  # noqa: E402


def lt(*args) -> None:
    subprocess.run([sys.executable, "-m", "lowrank_tools", *map(str, args), "-q", "--force"], check=True)


def main(root: Path, ranks: list[int]) -> None:
    pair = root / "causal"
    succ_a, succ_b = eval_pair.chains()
    if not (pair / "tuned").is_dir():
        eval_pair.causal(pair, succ_a, succ_b)
    (pair / "calib.txt").write_text("\n".join(eval_pair.sample(succ_b, 128, seed=3)) + "\n")
    for model in ("base", "tuned"):
        lt("calibrate", pair / model, "--data", pair / "calib.txt", "-o", pair / f"stats-{model}.safetensors")
    adapters = []
    for r in ranks:
        lt("extract", pair / "base", pair / "tuned", "-o", pair / f"plain-r{r}", "--rank", r, "--method", "exact")
        adapters.append(pair / f"plain-r{r}")
        for model in ("base", "tuned"):
            out = pair / f"whitened-{model}-r{r}"
            lt("extract", pair / "base", pair / "tuned", "-o", out, "--rank", r, "--method", "exact",
               "--calibration", pair / f"stats-{model}.safetensors")
            adapters.append(out)
    report = pair / "calibration.json"
    lt("evaluate", pair / "base", pair / "tuned", *adapters, "--data", pair / "heldout.txt", "--json", report)
    for a in json.loads(report.read_text())["adapters"]:
        print(f"{Path(a['path']).name:22s} params {a['params']:7d}  kl {a['kl']:.4f}  kl_recovered "
              f"{a['kl_recovered']:.4f}  top1 {a['top1_agreement']:.4f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "eval-pair"),
         [int(r) for r in (sys.argv[2] if len(sys.argv) > 2 else "2,4,8").split(",")])

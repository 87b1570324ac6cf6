"""Plain vs activation-whitened extraction, judged by `evaluate` on held-out texts (issue 17).

    python benchmarks/eval_calibration.py OUT [RANKS] [DAMPINGS] [PAIRS]  # 2,4,8  0.01,0.1,1  causal,encoder; ~15 min

Builds OUT/{causal,encoder} with benchmarks/eval_pair.py unless they are there (a 4-layer Llama and a 2-layer BERT,
pretrained on task A, every weight fine-tuned on task B). Per pair: OUT/<pair>/calib.txt holds 128 task-B texts of
the fine-tune's own training stream (never the held-out ones); `calibrate` runs on the base and on the tuned model;
adapters (exact SVD) are extracted in memory and saved: plain at each rank, whitened with the base's and the
tuned model's statistics at each rank and damping, whitened on the attention or the MLP inputs only (rank 4), and
plain / whitened under --budget (the parameters of uniform rank 4). `evaluate` scores them all on the held-out
texts and on the calibration texts (the gap between the two is the overfitting check): OUT/<pair>/heldout.json,
OUT/<pair>/calib.json, and one table on stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import eval_pair  # noqa: E402

CALIB_SEED = {"causal": 3, "encoder": 13}  # the seeds of eval_pair's fine-tuning texts: calib.txt is their start
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "attention.output.dense")


def lt(*args) -> None:
    subprocess.run([sys.executable, "-m", "lowrank_tools", *map(str, args), "-q", "--force"], check=True)


def _subset_stats(src: Path, dst: Path, attention: bool) -> None:
    """The statistics of ``src`` restricted to the attention inputs (or to all the others)."""
    from lowrank_tools.io.calibration import InputStats, read_calibration, write_calibration

    stats = read_calibration(src)
    keep = [InputStats(mods, stats.xtx(key), stats.tokens(key)) for key, mods in stats.groups.items()
            if any(a in key for a in ATTENTION) == attention]
    write_calibration(dst, keep, force=True)


def _adapters(pair: Path, ranks: list[int], dampings: list[float]) -> dict[str, dict]:
    """name -> extract keywords, for every variant of the module docstring."""
    variants = {}
    for r in ranks:
        variants[f"plain-r{r}"] = dict(rank=r)
        for model in ("base", "tuned"):
            for d in dampings:
                variants[f"w{model}-d{d:g}-r{r}"] = dict(rank=r, calibration=pair / f"stats-{model}.safetensors",
                                                         damping=d)
    for part in ("attn", "mlp"):
        variants[f"wbase-{part}-r4"] = dict(rank=4, calibration=pair / f"stats-base-{part}.safetensors")
    variants["plain-budget"] = dict(budget="r4")
    for model in ("base", "tuned"):
        variants[f"w{model}-budget"] = dict(budget="r4", calibration=pair / f"stats-{model}.safetensors")
    return variants


def _extract_all(pair: Path, variants: dict[str, dict]) -> list[Path]:
    from lowrank_tools.extract import extract
    from lowrank_tools.io.formats import save_adapter
    from lowrank_tools.linalg import RankRule

    budget = None
    paths = []
    for name, kw in variants.items():
        kw = dict(kw)
        if "rank" in kw:
            kw["rule"] = RankRule(rank=kw.pop("rank"))
        if kw.get("budget") == "r4":
            kw["budget"] = budget
        result = extract(pair / "base", pair / "tuned", method="exact", **kw)
        if name == "plain-r4":
            budget = result.adapter.params  # the budget variants spend what uniform rank 4 spends
        save_adapter(result.adapter, pair / "adapters" / name, format="peft", force=True)
        paths.append(pair / "adapters" / name)
    return paths


def run_pair(root: Path, kind: str, ranks: list[int], dampings: list[float]) -> None:
    pair = root / kind
    succ_a, succ_b = eval_pair.chains()
    if not (pair / "tuned").is_dir():
        (eval_pair.causal if kind == "causal" else eval_pair.encoder)(pair, succ_a, succ_b)
    (pair / "calib.txt").write_text("\n".join(eval_pair.sample(succ_b, 128, seed=CALIB_SEED[kind])) + "\n")
    for model in ("base", "tuned"):
        lt("calibrate", pair / model, "--data", pair / "calib.txt", "-o", pair / f"stats-{model}.safetensors")
    for part in ("attn", "mlp"):
        _subset_stats(pair / "stats-base.safetensors", pair / f"stats-base-{part}.safetensors", part == "attn")
    paths = _extract_all(pair, _adapters(pair, sorted(set(ranks) | {4}), dampings))
    scores = {}
    for data in ("heldout", "calib"):
        lt("evaluate", pair / "base", pair / "tuned", *paths, "--data", pair / f"{data}.txt", "--json",
           pair / f"{data}.json")
        scores[data] = {Path(a["path"]).name: a for a in json.loads((pair / f"{data}.json").read_text())["adapters"]}
    key = "kl_recovered" if kind == "causal" else "recovered"
    print(f"\n{kind}: {key} on held-out texts, on the calibration texts, and their gap")
    for name, a in scores["heldout"].items():
        c = scores["calib"][name]
        extra = f"  top1 {a['top1_agreement']:.4f}" if kind == "causal" else ""
        print(f"{name:22s} params {a['params']:7d}  heldout {a[key]:.4f}  calib {c[key]:.4f}  gap "
              f"{c[key] - a[key]:+.4f}{extra}", flush=True)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "eval-pair")
    ranks = [int(r) for r in (sys.argv[2] if len(sys.argv) > 2 else "2,4,8").split(",")]
    dampings = [float(d) for d in (sys.argv[3] if len(sys.argv) > 3 else "0.01,0.1,1").split(",")]
    for kind in (sys.argv[4] if len(sys.argv) > 4 else "causal,encoder").split(","):
        run_pair(out, kind, ranks, dampings)

"""The mergekit bar (issue 16): a 135M-shaped causal LM pair at rank 8, ours end to end against
``mergekit-extract-lora --max-rank 8`` on the CPU and against the floor of the job, in one run.

    python benchmarks/bench_mergekit.py [--work DIR] [--rounds 3] [--mergekit /work/bench-venv/bin/mergekit-extract-lora]

The pair: two Hugging Face folders (``config.json`` of a Llama with SmolLM-135M's shapes: 30 blocks, hidden 576,
intermediate 1536, 9 heads / 3 KV heads, vocabulary 49152, tied embeddings; ``model.safetensors`` in bfloat16),
generated once under ``--work`` (kept for the next run). The tuned one is a dense perturbation of every weight:
matrices as in ``llama_stack.py`` (a rank-256 delta with singular values ~ 1/i, RMS 2e-3, plus the bf16 rounding
of W'), norms W0 = 1 + 0.01 N(0, 1).

Four commands, each a fresh process timed from here (wall time, the page cache warm: both checkpoints are read
once before the first round; our package's bytecode compiled once, as a wheel's install does), run in turn,
``--rounds`` times (alternating, so load on a shared machine hits each alike; the 1-minute load average before each
run is recorded):

    floor     python -c "import torch; every tensor of load_file(base) and load_file(tuned) copied"   (interpreter,
              torch import, both checkpoints read from the page cache: what any tool must pay. Reading means
              copying: safetensors' load_file maps the file and reads nothing until a tensor is used, so a floor of
              load_file alone (this benchmark's first version, 2026-12-02/03) touched none of the 538 MB)
    floor_quick_exit   the same, ending with ``gc.freeze()``: the exit ours takes (no final cyclic collection of
              torch's objects: 0.3 s of every torch process here, see lowrank_tools/cli/threads.py), so that the
              ratio against it shows what the rest of ours costs
    ours      python -m lowrank_tools extract BASE TUNED -o OUT --rank 8 -q   (a PEFT folder; embeddings factored too)
    mergekit  mergekit-extract-lora --model TUNED --base-model BASE --out-path OUT --max-rank 8 (its defaults:
              embeddings saved whole), from its own venv (``--mergekit``; install: ``python3 -m venv /work/bench-venv
              && /work/bench-venv/bin/pip install torch==2.13.0 && /work/bench-venv/bin/pip install mergekit``)

Each run's CPU time (user + system of the child and all its threads, OpenMP spinning included) is recorded beside
its wall time: on a shared machine the wall time measures the neighbours as much as the job.

Bars: mergekit / ours >= 5 and ours / floor <= 1.5 (best of the rounds each, and the median ratio beside it); ours /
floor_quick_exit is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

HIDDEN, INTER, BLOCKS, VOCAB, HEADS, KV_HEADS = 576, 1536, 30, 49152, 9, 3
RANK = 8
MERGEKIT = "/work/bench-venv/bin/mergekit-extract-lora"
FLOOR = ("import sys, torch\nfrom safetensors.torch import load_file\n"
         "for path in sys.argv[1:]:\n    for t in load_file(path).values():\n        t.clone()\n")
FLOOR_QUICK_EXIT = FLOOR + "import gc\ngc.freeze()\n"  # the floor with the exit ours takes (no final collection)


def config() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": BLOCKS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "tie_word_embeddings": True,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 0}


def shapes() -> dict[str, tuple[int, ...]]:
    kv = HIDDEN * KV_HEADS // HEADS
    block = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (kv, HIDDEN), "self_attn.v_proj": (kv, HIDDEN),
             "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
             "mlp.down_proj": (HIDDEN, INTER), "input_layernorm": (HIDDEN,), "post_attention_layernorm": (HIDDEN,)}
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for b in range(BLOCKS):
        out.update({f"model.layers.{b}.{name}.weight": s for name, s in block.items()})
    out["model.norm.weight"] = (HIDDEN,)
    return out


def generate(work: Path) -> tuple[Path, Path]:
    """``work/base`` and ``work/tuned`` (kept when already there)."""
    import torch
    from safetensors.torch import save_file
    from llama_stack import _pair

    base, tuned = work / "base", work / "tuned"
    if (tuned / "model.safetensors").exists() and (base / "model.safetensors").exists():
        return base, tuned
    gen = torch.Generator().manual_seed(0)
    pairs = {name: _pair(shape, gen, "cpu") for name, shape in shapes().items()}
    for folder, i in ((base, 0), (tuned, 1)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config(), indent=1))
        save_file({n: p[i].contiguous() for n, p in pairs.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    return base, tuned


def commands(base: Path, tuned: Path, out: Path, mergekit: str) -> dict[str, list[str]]:
    return {
        "floor": [sys.executable, "-c", FLOOR, str(base / "model.safetensors"), str(tuned / "model.safetensors")],
        "floor_quick_exit": [sys.executable, "-c", FLOOR_QUICK_EXIT, str(base / "model.safetensors"),
                             str(tuned / "model.safetensors")],
        "ours": [sys.executable, "-m", "lowrank_tools", "extract", str(base), str(tuned), "-o", str(out / "ours"),
                 "--rank", str(RANK), "-q"],
        "mergekit": [mergekit, "--model", str(tuned), "--base-model", str(base), "--out-path", str(out / "mergekit"),
                     "--max-rank", str(RANK), "--no-copy-tokenizer", "--quiet"],
    }


def run_once(name: str, argv: list[str], out: Path) -> dict:
    shutil.rmtree(out / name, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)  # all its threads; spinning too
    return {"command": name, "seconds": seconds, "cpu_s": cpu, "load_before": load}


def summary(runs: list[dict]) -> dict:
    names = ("floor", "floor_quick_exit", "ours", "mergekit")
    by = {name: [r["seconds"] for r in runs if r["command"] == name] for name in names}
    rounds = list(zip(*(by[n] for n in names)))
    best = {name: min(v) for name, v in by.items() if v}
    return {"best_s": best,
            "mergekit_over_ours_best": best["mergekit"] / best["ours"],
            "ours_over_floor_best": best["ours"] / best["floor"],
            "ours_over_floor_quick_exit_best": best["ours"] / best["floor_quick_exit"],
            "mergekit_over_ours_median": statistics.median(m / o for _, _, o, m in rounds),
            "ours_over_floor_median": statistics.median(o / f for f, _, o, _ in rounds),
            "ours_over_floor_quick_exit_median": statistics.median(o / q for _, q, o, _ in rounds)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/lowrank-bench-135m"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mergekit", default=MERGEKIT)
    ap.add_argument("--only", default="floor,floor_quick_exit,ours,mergekit", help="comma-separated commands to run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    base, tuned = generate(args.work)
    out = args.work / "out"
    out.mkdir(exist_ok=True)
    for path in (base / "model.safetensors", tuned / "model.safetensors"):
        path.read_bytes()  # into the page cache before the first round
    # our bytecode, as a wheel's install writes it (mergekit's venv has its own; PYTHONDONTWRITEBYTECODE, set on
    # some machines, would otherwise have ours compile 60 modules from source in every run: ~0.1 s)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "lowrank_tools")], check=True,
                   capture_output=True)
    cmds = {k: v for k, v in commands(base, tuned, out, args.mergekit).items() if k in args.only.split(",")}
    runs = []
    for i in range(args.rounds):
        for name, argv_ in cmds.items():
            runs.append(run_once(name, argv_, out) | {"round": i + 1})
            print(f"round {i + 1} {name:9s} {runs[-1]['seconds']:7.2f} s wall {runs[-1]['cpu_s']:7.2f} s CPU  load "
                  f"{runs[-1]['load_before']:.2f}", flush=True)
    result = {"runs": runs, "cpus": os.cpu_count()}
    if set(cmds) == {"floor", "floor_quick_exit", "ours", "mergekit"}:
        result["summary"] = s = summary(runs)
        print(f"best: floor {s['best_s']['floor']:.2f} s (quick exit {s['best_s']['floor_quick_exit']:.2f} s), ours "
              f"{s['best_s']['ours']:.2f} s, mergekit {s['best_s']['mergekit']:.2f} s; mergekit/ours "
              f"{s['mergekit_over_ours_best']:.2f}x (median {s['mergekit_over_ours_median']:.2f}x, bar >= 5), "
              f"ours/floor {s['ours_over_floor_best']:.2f}x (median {s['ours_over_floor_median']:.2f}x, bar <= 1.5), "
              f"ours/floor with a quick exit {s['ours_over_floor_quick_exit_best']:.2f}x (median "
              f"{s['ours_over_floor_quick_exit_median']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

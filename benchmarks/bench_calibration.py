"""Issue 17's performance bars, measured side by side (the machine may be loaded: runs alternate, load recorded).

    python benchmarks/bench_calibration.py extract DIR [--blocks 1] [--rounds 2] [--rank 64]
    python benchmarks/bench_calibration.py calibrate DIR [--texts 128] [--tokens 128] [--layers 30]

``extract``: the Llama-7B-shaped pair of benchmarks/llama_stack.py (``generate DIR --blocks N``, unless DIR has it)
and synthetic input statistics for its four distinct inputs per block (q/k/v, o, gate/up, down):
``C = X X^T`` with the spectrum of real activations, a few outlier coordinates and a decaying bulk
(``diag(d) + G G^T``, G (in, 64)); then plain ``extract`` and ``extract --calibration`` (method auto: randomized,
rank 64) alternately, ``--rounds`` times each, one JSON line per run with the wall and CPU seconds (all threads of
this process: the fairer figure on a loaded machine) and the 1-minute load before and after.
Bar: whitened within 1.5x of plain.

``calibrate``: a randomly initialised model of SmolLM-135M's shape (Llama, hidden 576, MLP 1536, 30 blocks, 9 heads,
3 KV heads, vocabulary 49152, tied embeddings), a word-level tokenizer, ``--texts`` texts of ``--tokens`` tokens;
``lowrank-tools calibrate`` timed as a subprocess (wall, and the child's CPU seconds). Bar: under 2 minutes on two
cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _statistics(shape_of: dict[str, tuple[int, ...]], path: Path, tokens: int = 16384) -> None:
    from lowrank_tools.io.calibration import InputStats, write_calibration

    blocks = sorted({n.split(".")[2] for n in shape_of if n.startswith("model.layers.")}, key=int)
    g = torch.Generator().manual_seed(0)
    stats = []
    for b in blocks:
        p = f"model.layers.{b}."
        groups = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                  ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]
        for group in groups:
            width = shape_of[p + group[0] + ".weight"][1]
            d = 0.1 * torch.rand(width, generator=g, dtype=torch.float64) + 0.01
            d[torch.randperm(width, generator=g)[:6]] = 50.0  # outlier coordinates
            G = torch.randn(width, 64, generator=g, dtype=torch.float64) * (0.9 ** torch.arange(64, dtype=torch.float64))
            C = tokens * (torch.diag(d) + G @ G.T / 64)
            stats.append(InputStats(tuple(p + m for m in group), C, tokens))
    write_calibration(path, stats, force=True)


def bench_extract(folder: Path, blocks: int, rounds: int, rank: int) -> None:
    import llama_stack
    from lowrank_tools import RankRule, extract, save_adapter
    from lowrank_tools.io.checkpoint import as_checkpoint

    if not (folder / "tuned.safetensors").exists():
        print(json.dumps(llama_stack.generate(folder, blocks=blocks, hidden=4096, inter=11008, vocab=None, seed=0,
                                              device="cpu")), flush=True)
    stats = folder / "stats.safetensors"
    if not stats.exists():
        start = time.perf_counter()
        ckpt = as_checkpoint(folder / "tuned.safetensors")
        _statistics({n: ckpt.shape(n) for n in ckpt.keys()}, stats)
        print(json.dumps({"statistics_s": time.perf_counter() - start, "bytes": stats.stat().st_size}), flush=True)
    llama_stack._warm_up("cpu")
    for i in range(rounds):
        for calibration in ((None, stats) if i % 2 == 0 else (stats, None)):
            load = os.getloadavg()[0]
            start, cpu = time.perf_counter(), time.process_time()
            result = extract(folder / "base.safetensors", folder / "tuned.safetensors", rule=RankRule(rank=rank),
                             calibration=calibration)
            save_adapter(result.adapter, folder / "out", force=True)
            print(json.dumps({"run": "whitened" if calibration else "plain", "round": i,
                              "seconds": round(time.perf_counter() - start, 1),
                              "cpu_seconds": round(time.process_time() - cpu, 1), "layers": len(result.adapter.modules),
                              "load_before": load, "load_after": os.getloadavg()[0]}), flush=True)


def _small_model(folder: Path, layers: int) -> None:
    import eval_pair
    import transformers

    tok = eval_pair.tokenizer(bert=False)
    config = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=2,
                                      pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}), flush=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def bench_calibrate(folder: Path, texts: int, tokens: int, layers: int) -> None:
    import eval_pair

    model = folder / f"smol-{layers}"
    if not (model / "config.json").exists():
        _small_model(model, layers)
    data = folder / "texts.txt"
    succ_a, _ = eval_pair.chains()
    data.write_text("\n".join(eval_pair.sample(succ_a, texts, seed=1, length=(tokens + 8, tokens + 16))) + "\n")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lowrank_tools", "calibrate", str(model), "--data", str(data), "-o",
                    str(folder / "stats.safetensors"), "--max-length", str(tokens), "--device", "cpu", "--force"],
                   check=True)
    import resource

    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"calibrate_s": round(time.perf_counter() - start, 1), "texts": texts, "tokens": tokens,
                      "cpu_seconds": round(child.ru_utime + child.ru_stime, 1),
                      "layers": layers, "threads": torch.get_num_threads(), "load_before": load,
                      "load_after": os.getloadavg()[0]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    e = sub.add_parser("extract")
    e.add_argument("folder", type=Path)
    e.add_argument("--blocks", type=int, default=1)
    e.add_argument("--rounds", type=int, default=2)
    e.add_argument("--rank", type=int, default=64)
    c = sub.add_parser("calibrate")
    c.add_argument("folder", type=Path)
    c.add_argument("--texts", type=int, default=128)
    c.add_argument("--tokens", type=int, default=128)
    c.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    if args.mode == "extract":
        bench_extract(args.folder, args.blocks, args.rounds, args.rank)
    else:
        bench_calibrate(args.folder, args.texts, args.tokens, args.layers)


if __name__ == "__main__":
    main()

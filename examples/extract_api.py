"""Extract a LoRA adapter through the Python API, check it, and save it in both formats.

Run: python examples/extract_api.py [OUT_DIR]
It makes a base checkpoint and a "fine-tuned" one whose every weight moved (a rank-6 change plus
small full-rank noise, as real fine-tunes look), then asks for the smallest rank that keeps 99% of
each layer's delta energy (at most 32), and prints what the report measured.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowrank_tools import RankRule, extract, load_adapter, save_adapter


def make_checkpoints(folder: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for i in range(2):
        for name, (out, inp) in {"q_proj": (128, 128), "up_proj": (344, 128), "down_proj": (128, 344)}.items():
            key = f"model.layers.{i}.{name}.weight"
            w0 = torch.randn(out, inp, generator=g) / inp**0.5
            low_rank = torch.randn(out, 6, generator=g) @ torch.randn(6, inp, generator=g) / (6 * inp) ** 0.5
            noise = 1e-3 * torch.randn(out, inp, generator=g)
            base[key], tuned[key] = w0.to(torch.bfloat16), (w0 + low_rank + noise).to(torch.bfloat16)
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    return folder / "base.safetensors", folder / "tuned.safetensors"


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    base, tuned = make_checkpoints(out_dir)
    result = extract(base, tuned, rule=RankRule(energy=0.99, rank=32), dtype=torch.float32)
    for layer in result.report.layers:
        print(f"{layer.name:<28} rank {layer.rank:>2}  energy {layer.retained_energy:.4f}  rel_error {layer.rel_error:.4f}")
    summary = result.report.summary
    print(f"{summary['params']:,} adapter parameters ({100 * summary['param_share']:.1f}% of the covered weights), "
          f"norm-weighted rel_error {summary['rel_error']:.4f}")
    peft_dir = save_adapter(result.adapter, out_dir / "adapter", force=True)
    kohya_file = save_adapter(result.adapter, out_dir / "adapter.safetensors", format="kohya", force=True)
    again = load_adapter(kohya_file)
    worst = max(float((again.modules[n].delta() - m.delta()).norm() / m.delta().norm())
                for n, m in load_adapter(peft_dir).modules.items())
    print(f"wrote {peft_dir} (PEFT) and {kohya_file} (kohya); products agree to {worst:.1e}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="lowrank-example-")))

"""demo: the whole flow on a generated pair, for a newcomer's first run.

Builds a small MLP language-free model, trains it briefly on task A (the "base"), fine-tunes every
weight on task B for a few seconds (the "tuned" model: a genuine delta, not a planted one), saves both
as safetensors, extracts adapters at two ranks, and shows how much of the fine-tune each one keeps:
the per-layer report and the task-B loss of base, tuned and base + adapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .io.checkpoint import atomic_output, check_output
from .extract.streaming import extract
from .io.formats import save_adapter
from .linalg.svd import RankRule
from .report import format_table, report_json

__all__ = ["TinyModel", "run_demo", "DEMO_RANKS"]

DEMO_RANKS = (4, 16)


class TinyModel(nn.Module):
    """An embedding, a few residual MLP blocks (Llama-style names) and a head: 0.1 M parameters."""

    def __init__(self, vocab: int = 64, dim: int = 96, hidden: int = 256, blocks: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.ModuleDict({"up_proj": nn.Linear(dim, hidden), "down_proj": nn.Linear(hidden, dim),
                                                   "norm": nn.LayerNorm(dim)}) for _ in range(blocks))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens).mean(dim=1)  # (batch, dim): a bag of tokens
        for block in self.layers:
            x = x + block["down_proj"](torch.relu(block["up_proj"](block["norm"](x))))
        return self.lm_head(x)  # (batch, vocab)


def _tasks(seed: int, vocab: int = 64, n: int = 2048, changed: int = 6):
    """Two related synthetic tasks: the label is a table lookup of the token; task B changes ``changed``
    entries of task A's table, as a fine-tune adjusts a pretrained skill."""
    g = torch.Generator().manual_seed(seed)
    table_a = torch.randint(0, vocab, (vocab,), generator=g)
    table_b = table_a.clone()
    table_b[torch.randperm(vocab, generator=g)[:changed]] = torch.randint(0, vocab, (changed,), generator=g)
    tasks = []
    for table in (table_a, table_b):
        tokens = torch.randint(0, vocab, (n, 1), generator=g)
        tasks.append((tokens, table[tokens[:, 0]]))
    return tasks


def _train(model: nn.Module, data, seconds: float, *, finetune: bool = False) -> None:
    """AdamW pretraining; the fine-tune uses SGD with momentum, whose updates concentrate in few directions."""
    tokens, labels = data
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if finetune
           else torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0))
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for i in range(0, len(tokens), 256):
            loss = nn.functional.cross_entropy(model(tokens[i:i + 256]), labels[i:i + 256])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def _loss(model: nn.Module, state: dict, data) -> float:
    model.load_state_dict(state)
    return float(nn.functional.cross_entropy(model(data[0]), data[1]))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _with_adapter(base: dict, adapter) -> dict:
    merged = dict(base)
    for name, m in adapter.modules.items():
        merged[f"{name}.weight"] = base[f"{name}.weight"] + m.delta().to(base[f"{name}.weight"].dtype)
    return merged


def run_demo(out_dir: Path, *, seconds: float = 5.0, seed: int = 0, force: bool = False,
             echo: Callable[[str], None] | None = None, progress=None, warn=None) -> dict:
    """Run the demo into ``out_dir``; returns {name: task-B loss} for base, tuned and each adapter.
    ``echo`` receives the lines to show (the CLI passes click.echo); the global RNG state is left as it was."""
    check_output(out_dir, force=force)  # before the training: an -o that exists costs no time
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _run(Path(out_dir), seconds=seconds, seed=seed, force=force, say=echo or (lambda _msg: None),
                    progress=progress, warn=warn)


def _run(out_dir: Path, *, seconds: float, seed: int, force: bool, say, progress, warn) -> dict:
    model = TinyModel()
    task_a, task_b = _tasks(seed)
    say(f"training a {sum(p.numel() for p in model.parameters()):,}-parameter model on task A, then fine-tuning "
        f"every weight on task B for {seconds:g} s ...")
    _train(model, task_a, seconds / 2)
    base = _state(model)
    _train(model, task_b, seconds / 2, finetune=True)
    tuned = _state(model)
    losses = {"base": _loss(model, base, task_b), "tuned": _loss(model, tuned, task_b)}
    with atomic_output(Path(out_dir), force=force) as tmp:
        tmp.mkdir()
        save_file(base, str(tmp / "base.safetensors"))
        save_file(tuned, str(tmp / "tuned.safetensors"))
        for r in DEMO_RANKS:
            result = extract(tmp / "base.safetensors", tmp / "tuned.safetensors", rule=RankRule(rank=r), warn=warn,
                             progress=progress(f"extract r={r}") if progress else None)
            save_adapter(result.adapter, tmp / f"adapter-r{r}")
            (tmp / f"report-r{r}.json").write_text(report_json(result.report))
            losses[f"base + adapter r={r}"] = _loss(model, _with_adapter(base, result.adapter), task_b)
            say(f"\n== rank {r} ==\n{format_table(result.report)}")
    say("\ntask-B loss (lower is better): " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))
    say(f"files in {out_dir}/: base.safetensors, tuned.safetensors, "
        + ", ".join(f"adapter-r{r}/ (PEFT), report-r{r}.json" for r in DEMO_RANKS))
    say(f"next: lowrank-tools analyze {out_dir}/base.safetensors {out_dir}/tuned.safetensors")
    return losses

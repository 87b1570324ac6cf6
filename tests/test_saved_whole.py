"""What a PEFT target cannot hold as a LoRA is saved whole (io/layers.py WHOLE_LEAVES, routers of a transformers
model: tests/test_module_names.py), and fused MoE experts left out are named with their relative change."""

from __future__ import annotations

import torch

from lowrank_tools.adapter import ModuleKind
from lowrank_tools.extract import extract
from lowrank_tools.io.checkpoint import as_checkpoint, pair_tensors
from lowrank_tools.io.layers import FUSED_EXPERTS, plan_layers
from lowrank_tools.linalg import RankRule


def _rank2(out: int, inp: int, g) -> torch.Tensor:
    return 0.1 * torch.randn(out, 2, generator=g) @ torch.randn(2, inp, generator=g)


def _pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"model.decoder.embed_positions.weight": torch.randn(34, 16, generator=g),
            "encoder.rel_embeddings.weight": torch.randn(16, 16, generator=g),
            "model.decoder.layers.0.fc1.weight": torch.randn(32, 16, generator=g),
            "model.layers.0.mlp.experts.gate_up_proj": torch.randn(2, 16, 64, generator=g)}
    tuned = {k: v + _rank2(v.shape[0], v[0].numel(), g).reshape(v.shape) for k, v in base.items()}
    return as_checkpoint(base), as_checkpoint(tuned)


def test_positional_and_relative_tables_are_saved_whole_for_peft_only():
    base, tuned = _pair()
    pairing = pair_tensors(base, tuned)
    peft = plan_layers(base, tuned, pairing)
    assert set(peft.full) == {"model.decoder.embed_positions.weight", "encoder.rel_embeddings.weight"}
    assert peft.layers == {"model.decoder.layers.0.fc1.weight": ModuleKind.LINEAR}
    assert any("saved whole" in n and "embed_positions" in n for n in peft.notes)
    kohya = plan_layers(base, tuned, pairing, embeddings=False)  # kohya holds neither embeddings nor whole tensors
    assert not kohya.full and "encoder.rel_embeddings.weight" in kohya.layers


def test_fused_experts_are_named_with_their_relative_change():
    base, tuned = _pair()
    plan = plan_layers(base, tuned, pair_tensors(base, tuned))
    assert plan.skipped[FUSED_EXPERTS] == ["model.layers.0.mlp.experts.gate_up_proj"]
    warned = []
    result = extract(base, tuned, rule=RankRule(rank=2), warn=warned.append)
    W0, W1 = base.get("model.layers.0.mlp.experts.gate_up_proj"), tuned.get("model.layers.0.mlp.experts.gate_up_proj")
    rel = float((W1 - W0).norm() / W0.norm())
    note = next(n for n in result.report.notes if "fused MoE expert" in n)
    assert "model.layers.0.mlp.experts.gate_up_proj (2, 16, 64)" in note and f"{rel:.3g}" in note
    assert note in warned
    assert set(result.adapter.full_tensors) == {"model.decoder.embed_positions.weight", "encoder.rel_embeddings.weight"}


def test_check_accepts_the_tensors_saved_whole(tmp_path):
    """modules_to_save tensors (``base_model.model.<module>.weight``, a router's bias too) are what PEFT loads as they
    are, not unknown keys."""
    from lowrank_tools.check import check_adapter
    from lowrank_tools.io.formats import save_adapter

    base, tuned = _pair()
    result = extract(base, tuned, rule=RankRule(rank=2))
    save_adapter(result.adapter, tmp_path / "ad")
    found = check_adapter(tmp_path / "ad", "peft")
    assert not [p for p in found.findings if p.severity.value == "error"], found.findings

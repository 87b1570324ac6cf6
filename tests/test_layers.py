"""layers: kinds, tied heads, tensors saved whole, shape changes, and what extract makes of them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_pair, planted_delta
from lowrank_tools.adapter import ModuleKind
from lowrank_tools.io.checkpoint import as_checkpoint, open_checkpoint, pair_tensors
from lowrank_tools.errors import InvalidOption, ShapeMismatch
from lowrank_tools.extract import extract
from lowrank_tools.io.base_model import find_tied_heads, tied_head_module
from lowrank_tools.io.layers import layer_kind, plan_layers
from lowrank_tools.linalg import RankRule

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
SHAPES = {EMB: (40, 8), "model.layers.0.q_proj.weight": (8, 8), "model.norm.weight": (8,)}


@pytest.mark.parametrize(("name", "shape", "kind"), [
    ("conv1d.weight", (8, 4, 3), ModuleKind.CONV),
    ("conv3d.weight", (8, 4, 3, 3, 3), ModuleKind.CONV),
    ("proj.weight", (8, 4, 1, 1), ModuleKind.CONV),
    ("transformer.wte.weight", (50, 8), ModuleKind.EMBEDDING),
    ("bert.embeddings.word_embeddings.weight", (50, 8), ModuleKind.EMBEDDING),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 8), ModuleKind.EMBEDDING),
    ("text_model.embeddings.position_embedding.weight", (77, 8), ModuleKind.EMBEDDING),
    # Linear layers whose names merely contain "embed" or "shared" stay linear (PEFT would ignore embedding keys)
    ("x_embedder.weight", (8, 64), ModuleKind.LINEAR),
    ("context_embedder.weight", (8, 64), ModuleKind.LINEAR),
    ("embed_out.weight", (50, 8), ModuleKind.LINEAR),
    ("model.layers.0.mlp.shared_expert_gate.weight", (1, 8), ModuleKind.LINEAR),
    ("time_embedding.linear_1.weight", (8, 4), ModuleKind.LINEAR),
    ("x.weight", (8, 0), None),
    ("x.weight", (2, 2, 2, 2, 2, 2), None),
])
def test_layer_kinds(name, shape, kind):
    assert layer_kind(name, shape) is kind


def _tied_pair(*, stored: bool, seed: int = 0):
    """Base/tuned dicts of a tied model: the head equal to the embedding on both sides (or absent)."""
    base, tuned = make_pair(SHAPES, k=2, seed=seed)
    if stored:
        base[HEAD], tuned[HEAD] = base[EMB].clone(), tuned[EMB].clone()
    return base, tuned


def _folder(tmp_path, name, tensors, config):
    (tmp_path / name).mkdir()
    save_file(tensors, str(tmp_path / name / "model.safetensors"))
    (tmp_path / name / "config.json").write_text(json.dumps(config))
    return tmp_path / name


LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}


@pytest.mark.parametrize("stored", [True, False])
def test_tied_head_factored_once_carried_on_both_sides(tmp_path, stored):
    base, tuned = _tied_pair(stored=stored)
    if stored:
        b, t = base, tuned
    else:
        b, t = (_folder(tmp_path, n, sd, LLAMA_CONFIG) for n, sd in (("b", base), ("t", tuned)))
    result = extract(b, t, rule=RankRule(rank=8), method="exact")
    emb, head = result.adapter.modules["model.embed_tokens"], result.adapter.modules["lm_head"]
    assert emb.kind is ModuleKind.EMBEDDING and head.kind is ModuleKind.LINEAR
    d = tuned[EMB] - base[EMB]  # (vocab, dim)
    assert torch.allclose(emb.delta(), d, atol=1e-5) and torch.allclose(head.delta(), d, atol=1e-5)
    assert torch.equal(head.B, emb.A.t()) and torch.equal(head.A, emb.B.t())  # PEFT's own tied layout
    assert [r.name for r in result.report.layers].count("model.embed_tokens") == 1  # factored once
    assert "lm_head" not in [r.name for r in result.report.layers]
    assert any("lm_head shares model.embed_tokens.weight" in n for n in result.report.notes)


def test_untied_or_unequal_heads_stay_separate(tmp_path):
    base, tuned = _tied_pair(stored=True)
    tuned[HEAD] = tuned[HEAD] + 0.1 * planted_delta(40, 8, 1, seed=9)  # fine-tune untied them
    assert find_tied_heads(as_checkpoint(base), as_checkpoint(tuned)) == []
    result = extract(base, tuned, rule=RankRule(rank=8), method="exact")
    assert torch.allclose(result.adapter.modules["lm_head"].delta(), tuned[HEAD] - base[HEAD], atol=1e-5)
    # absent head but the config unties it, or no head architecture: nothing is tied
    plain_base, plain_tuned = _tied_pair(stored=False)
    for config in ({"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False},
                   {"architectures": ["BertModel"]}):
        b = open_checkpoint(_folder(tmp_path, f"b{len(config)}{config['architectures'][0]}", plain_base, config))
        t = open_checkpoint(_folder(tmp_path, f"t{len(config)}{config['architectures'][0]}", plain_tuned, config))
        assert find_tied_heads(b, t) == []


def test_tied_head_module_layout():
    base, tuned = _tied_pair(stored=True)
    emb = extract(base, tuned, rule=RankRule(rank=3), method="exact").adapter.modules["model.embed_tokens"]
    head = tied_head_module(emb)
    assert head.weight_shape == (40, 8) and head.B.shape == (40, 3) and head.A.shape == (3, 8)
    assert torch.allclose(head.delta(), emb.delta(), atol=1e-6)


def test_vocabulary_growth_is_named_error_unless_saved_whole():
    base, tuned = make_pair(SHAPES, k=2)
    tuned[EMB] = torch.cat([tuned[EMB], torch.randn(3, 8)])  # 3 new tokens
    with pytest.raises(ShapeMismatch, match=r"model\.embed_tokens\.weight changed shape .*\(40, 8\) -> \(43, 8\).*"
                                            r"vocabulary grew.*--full-modules"):
        extract(base, tuned, rule=RankRule(rank=2))
    result = extract(base, tuned, rule=RankRule(rank=2), full_modules=["embed_tokens"])
    assert torch.equal(result.adapter.full_tensors[EMB], tuned[EMB])
    assert "model.embed_tokens" not in result.adapter.modules
    assert "model.layers.0.q_proj" in result.adapter.modules
    assert not result.report.notes or "different shapes" not in result.report.notes[0]  # saved, not skipped
    # excluded: left out on purpose, no error
    assert "model.embed_tokens" not in extract(base, tuned, rule=RankRule(rank=2), exclude=["embed"]).adapter.modules


def test_full_modules_saves_any_tensor_whole_and_skips_its_lora():
    base, tuned = make_pair(SHAPES, k=2)
    result = extract(base, tuned, rule=RankRule(rank=2), full_modules=[r"q_proj", r"model\.norm"])
    assert set(result.adapter.full_tensors) == {"model.layers.0.q_proj.weight", "model.norm.weight"}
    assert set(result.adapter.modules) == {"model.embed_tokens"}
    assert "model.norm.weight" not in result.report.changed_1d
    with pytest.raises(InvalidOption, match="--full-modules"):
        extract(base, tuned, rule=RankRule(rank=2), full_modules=["("])


def test_dtype_casts_tensors_saved_whole_everywhere():
    """--dtype is that of everything written: factors and --full-modules tensors alike, through extract, resize,
    merge and save; a whole tensor that overflows the dtype is an error naming it."""
    from lowrank_tools.errors import NumericalError
    from lowrank_tools.merge import merge
    from lowrank_tools.resize import resize

    base, tuned = make_pair(SHAPES, k=2)
    result = extract(base, tuned, rule=RankRule(rank=2), full_modules=["embed_tokens"], dtype=torch.bfloat16)
    adapter = result.adapter
    assert {m.B.dtype for m in adapter.modules.values()} == {torch.bfloat16}
    assert adapter.full_tensors[EMB].dtype == torch.bfloat16
    assert torch.equal(adapter.full_tensors[EMB], tuned[EMB].bfloat16())
    kept = extract(base, tuned, rule=RankRule(rank=2), full_modules=["embed_tokens"]).adapter
    assert kept.full_tensors[EMB].dtype == torch.float32  # auto: as stored
    assert resize(kept, rule=RankRule(rank=1), dtype=torch.float16).adapter.full_tensors[EMB].dtype == torch.float16
    assert merge([kept], dtype=torch.bfloat16).adapter.full_tensors[EMB].dtype == torch.bfloat16
    assert kept.to(dtype=torch.float16).full_tensors[EMB].dtype == torch.float16
    tuned[EMB] = tuned[EMB] * 1e6  # beyond float16's 65504
    with pytest.raises(NumericalError, match=r"model\.embed_tokens\.weight \(saved whole\) overflows torch\.float16"):
        extract(base, tuned, rule=RankRule(rank=2), full_modules=["embed_tokens"], dtype=torch.float16)


def test_tied_pair_saved_whole_on_both_sides(tmp_path):
    base, tuned = _tied_pair(stored=False)
    tuned[EMB] = torch.cat([tuned[EMB], torch.randn(2, 8)])
    b, t = (_folder(tmp_path, n, sd, LLAMA_CONFIG) for n, sd in (("b", base), ("t", tuned)))
    result = extract(b, t, rule=RankRule(rank=2), full_modules=["embed_tokens"])
    assert torch.equal(result.adapter.full_tensors[EMB], tuned[EMB])
    assert torch.equal(result.adapter.full_tensors[HEAD], tuned[EMB])  # the absent head takes the embedding


def test_conv_rank_and_conv1d():
    shapes = {"conv.weight": (16, 8, 3, 3), "conv1d.weight": (12, 6, 5), "lin.weight": (16, 16)}
    base, tuned = make_pair(shapes, k=6)
    result = extract(base, tuned, rule=RankRule(rank=4), conv_rank=2, method="exact")
    assert result.adapter.ranks == {"conv": 2, "conv1d": 2, "lin": 4}
    full = extract(base, tuned, rule=RankRule(rank=6), method="exact").adapter.modules
    for name in ("conv", "conv1d"):
        d = tuned[f"{name}.weight"] - base[f"{name}.weight"]
        assert full[name].kind is ModuleKind.CONV and full[name].weight_shape == tuple(d.shape)
        assert torch.allclose(full[name].delta(), d, atol=1e-5)
    with pytest.raises(InvalidOption, match="--conv-rank"):
        extract(base, tuned, rule=RankRule(rank=4), conv_rank=0)


def test_embeddings_left_out_for_kohya_with_their_tied_head():
    base, tuned = _tied_pair(stored=True)
    ckb, ckt = as_checkpoint(base), as_checkpoint(tuned)
    plan = plan_layers(ckb, ckt, pair_tensors(ckb, ckt), embeddings=False)
    assert EMB not in plan.layers and HEAD not in plan.layers and not plan.tied
    reason = next(r for r in plan.skipped if r.startswith("embedding"))
    assert set(plan.skipped[reason]) == {EMB, HEAD}


# ---------------------------------------------------------------------------------------------------- CLI


def _run(*args):
    from click.testing import CliRunner

    from lowrank_tools.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_grown_vocabulary_error_then_full_modules(tmp_path):
    from safetensors import safe_open

    base, tuned = make_pair(SHAPES, k=2)
    tuned[EMB] = torch.cat([tuned[EMB], torch.randn(3, 8)])
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    failed = _run("extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "-o", tmp_path / "a", "-q")
    errors = [ln for ln in failed.output.splitlines() if ln.startswith("Error")]
    assert failed.exit_code == 1 and len(errors) == 1 and "model.embed_tokens.weight changed shape" in errors[0]
    assert not (tmp_path / "a").exists()
    kohya = _run("extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "-o", tmp_path / "k.safetensors",
                 "--format", "kohya", "--full-modules", "embed_tokens")
    assert kohya.exit_code == 2 and "--full-modules needs --format peft" in kohya.output
    ok = _run("extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "-o", tmp_path / "a", "-q", "-r", 2,
              "--full-modules", "embed_tokens")
    assert ok.exit_code == 0, ok.output
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.embed_tokens"] and config["target_modules"] == ["model.layers.0.q_proj"]
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("base_model.model.model.embed_tokens.weight"), tuned[EMB])


def test_cli_conv_rank_and_kohya_leaves_embeddings_out(tmp_path):
    shapes = {"conv.weight": (16, 8, 3, 3), "lin.weight": (16, 16), "tok_embeddings.weight": (30, 16)}
    base, tuned = make_pair(shapes, k=6)
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    out = tmp_path / "k.safetensors"
    result = _run("extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "-o", out, "--format", "kohya",
                  "-r", 4, "--conv-rank", 2)
    assert result.exit_code == 0, result.output
    assert "embedding (the target format cannot hold it" in result.output and "tok_embeddings.weight" in result.output
    from lowrank_tools.io.formats import load_adapter

    assert load_adapter(out).ranks == {"conv": 2, "lin": 4}


@pytest.mark.parametrize("budget", [60, 200, 500])
def test_budget_counts_the_tied_head_copy(budget):
    """The tied embedding's factors are written twice (embedding and head): the file must stay within --budget."""
    base, tuned = _tied_pair(stored=True)
    result = extract(base, tuned, budget=budget, method="exact")
    written = result.adapter.params
    assert written <= budget
    assert result.report.summary["params"] == written  # the report counts what the file holds
    emb = result.adapter.modules.get("model.embed_tokens")
    if emb is not None:
        assert result.adapter.modules["lm_head"].params == emb.params

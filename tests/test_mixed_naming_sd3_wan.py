"""SD3 and Wan in mixed namings (tests/test_mixed_naming.py does Flux): a kohya adapter in the original names
(SAI MMDiT ``joint_blocks``, fused qkv; Wan ``blocks.N.self_attn.q``) applied onto a diffusers ``SD3Transformer2DModel``
/ ``WanTransformer3DModel`` folder, a diffusers-named adapter applied onto an original-named single file, and a merge
of one adapter in both namings at 0.5 / 0.5.

Known answers: each original module's delta is sliced by rows (or its (shift, scale) halves swapped) by hand here,
from the table below, written from diffusers' single_file_utils (convert_sd3_transformer_checkpoint_to_diffusers,
the Wan converters) for the tiny configs' shapes."""

from __future__ import annotations

import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lowrank_tools.adapter import Adapter, LoraModule
from lowrank_tools.cli import main
from lowrank_tools.io.formats import load_adapter, save_adapter
from test_mixed_naming import check_applied, swap

D = 16
CONFIGS = {
    "sd3": ("SD3Transformer2DModel", dict(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                          num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                          pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16,
                                          dual_attention_layers=(0,))),
    "wan": ("WanTransformer3DModel", dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                          in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                          num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                          rope_max_seq_len=32)),
}
T0 = "transformer_blocks.0"
# original module -> (rows, diffusers parts in row order, swap (shift, scale) halves)
TABLE = {
    "sd3": {
        "joint_blocks.0.x_block.attn.qkv": (3 * D, [f"{T0}.attn.to_q", f"{T0}.attn.to_k", f"{T0}.attn.to_v"], False),
        "joint_blocks.0.context_block.attn.qkv": (3 * D, [f"{T0}.attn.add_q_proj", f"{T0}.attn.add_k_proj",
                                                          f"{T0}.attn.add_v_proj"], False),
        "joint_blocks.0.x_block.attn2.qkv": (3 * D, [f"{T0}.attn2.to_q", f"{T0}.attn2.to_k", f"{T0}.attn2.to_v"], False),
        "joint_blocks.0.x_block.attn.proj": (D, [f"{T0}.attn.to_out.0"], False),
        "joint_blocks.0.context_block.mlp.fc1": (4 * D, [f"{T0}.ff_context.net.0.proj"], False),
        "joint_blocks.0.x_block.adaLN_modulation.1": (9 * D, [f"{T0}.norm1.linear"], False),
        "joint_blocks.1.context_block.adaLN_modulation.1": (2 * D, ["transformer_blocks.1.norm1_context.linear"], True),
        "final_layer.adaLN_modulation.1": (2 * D, ["norm_out.linear"], True),
    },
    "wan": {
        "blocks.0.self_attn.q": (D, ["blocks.0.attn1.to_q"], False),
        "blocks.0.cross_attn.o": (D, ["blocks.0.attn2.to_out.0"], False),
        "blocks.0.ffn.0": (2 * D, ["blocks.0.ffn.net.0.proj"], False),
        "head.head": (D, ["proj_out"], False),
        "time_projection.1": (6 * D, ["condition_embedder.time_proj"], False),
    },
}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def lora(rows: int, rank: int, alpha: float, seed: int) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(B=torch.randn(rows, rank, generator=g), A=torch.randn(rank, D, generator=g), alpha=alpha)


def delta(m: LoraModule) -> torch.Tensor:
    return m.scale * m.B.double() @ m.A.double()


def original_adapter(kind: str) -> Adapter:
    return Adapter(modules={name: lora(rows, 2 + i % 2, 1.0 + i, seed=i)
                            for i, (name, (rows, _, _)) in enumerate(TABLE[kind].items())})


def sliced(kind: str, adapter: Adapter) -> dict[str, torch.Tensor]:
    """The original adapter's deltas as the diffusers model's parameters see them."""
    out = {}
    for name, (rows, parts, swapped) in TABLE[kind].items():
        d = delta(adapter.modules[name])
        d = swap(d) if swapped else d
        out.update(zip(parts, d.split(rows // len(parts))))
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def diffusers_base(request, tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    kind = request.param
    cls, config = CONFIGS[kind]
    folder = tmp_path_factory.mktemp(kind) / "base"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        getattr(diffusers, cls)(**config).save_pretrained(folder)
    return kind, folder, load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_original_kohya_adapter_onto_a_diffusers_model(diffusers_base, tmp_path):
    kind, folder, base = diffusers_base
    adapter = original_adapter(kind)
    path = save_adapter(adapter, tmp_path / "k.safetensors", format="kohya")
    bare = load_file(str(path))  # read as another tool's file: no name record, names from the tables
    save_file(bare, str(tmp_path / "bare.safetensors"))
    result = run("apply", folder, tmp_path / "bare.safetensors", "-o", tmp_path / "out.safetensors", "--quiet")
    assert result.exit_code == 0, result.output
    check_applied(load_file(str(tmp_path / "out.safetensors")), base, sliced(kind, adapter))


def original_file(kind: str, path, prefix: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    tensors = {f"{prefix}{name}.weight": torch.randn(rows, D, generator=g) for name, (rows, _, _) in TABLE[kind].items()}
    save_file(tensors, str(path))
    return tensors


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_diffusers_adapter_onto_an_original_single_file(tmp_path, kind, prefix):
    """A diffusers-named adapter (one rank-2 module per part, its own alpha each) onto a SAI / Wan file: fused rows
    stacked, modulations swapped."""
    base = original_file(kind, tmp_path / "model.safetensors", prefix)
    modules, expected = {}, {}
    for i, (name, (rows, parts, swapped)) in enumerate(TABLE[kind].items()):
        ms = [lora(rows // len(parts), 2, 4.0 - (i + j) % 3, seed=30 + 5 * i + j) for j in range(len(parts))]
        modules.update({f"transformer.{p}": m for p, m in zip(parts, ms)})
        stacked = torch.cat([delta(m) for m in ms])
        expected[name] = swap(stacked) if swapped else stacked
    save_adapter(Adapter(modules=modules), tmp_path / "peft", format="peft")
    result = run("apply", tmp_path / "model.safetensors", tmp_path / "peft", "-o", tmp_path / "out.safetensors",
                 "--quiet")
    assert result.exit_code == 0, result.output
    out = load_file(str(tmp_path / "out.safetensors"))
    for name, d in expected.items():
        key = f"{prefix}{name}.weight"
        torch.testing.assert_close(out[key].double(), base[key].double() + d, rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_merge_of_both_namings_half_each_is_the_adapter(tmp_path, kind):
    adapter = original_adapter(kind)
    save_adapter(adapter, tmp_path / "orig.safetensors", format="kohya")
    save_adapter(adapter, tmp_path / "diffusers", format="peft")
    result = run("merge", f"{tmp_path / 'orig.safetensors'}:0.5", f"{tmp_path / 'diffusers'}:0.5",
                 "-o", tmp_path / "merged", "--quiet")
    assert result.exit_code == 0, result.output
    merged = load_adapter(tmp_path / "merged")
    got = {n[len("transformer."):] if n.startswith("transformer.") else n: delta(m) for n, m in merged.modules.items()}
    expected = sliced(kind, adapter)
    assert got.keys() == expected.keys()
    for name, d in expected.items():
        torch.testing.assert_close(got[name], d, rtol=0, atol=1e-5, msg=name)
    result = run("merge", f"{tmp_path / 'diffusers'}:0.5", f"{tmp_path / 'orig.safetensors'}:0.5",
                 "-o", tmp_path / "merged.safetensors", "--quiet")  # the other order, to kohya: original names
    assert result.exit_code == 0, result.output
    back = load_adapter(tmp_path / "merged.safetensors")
    assert set(back.modules) == set(TABLE[kind])
    for name, m in back.modules.items():
        torch.testing.assert_close(delta(m), delta(adapter.modules[name]), rtol=0, atol=1e-5, msg=name)

"""An adapter and a base (or two adapters) of one transformer diffusion model in different namings line up exactly:
a BFL/kohya Flux adapter (fused qkv, linear1) applied onto a diffusers ``FluxTransformer2DModel`` folder, a diffusers
one onto a BFL / ComfyUI single file, and a merge of the same adapter in both namings at 0.5 / 0.5.

Known answers: the applied weight is W0 + the adapter's delta, sliced (diffusers base) or stacked (BFL base) by hand
here, the final modulation's (shift, scale) halves swapped; the merge's product is the adapter's."""

from __future__ import annotations

import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lowrank_tools.adapter import Adapter, LoraModule
from lowrank_tools.apply import apply
from lowrank_tools.cli import main
from lowrank_tools.errors import AdapterMismatch
from lowrank_tools.io.arch_convert import to_base_naming, to_common_naming, to_diffusers
from lowrank_tools.io.architectures import architecture_named
from lowrank_tools.io.formats import load_adapter, save_adapter

D, MLP = 16, 64  # the tiny Flux's inner width and single-block MLP width (mlp_ratio 4)
FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
# BFL module -> (rows, cols) of the tiny Flux
SHAPES = {"double_blocks.0.img_attn.qkv": (3 * D, D), "double_blocks.0.txt_attn.qkv": (3 * D, D),
          "single_blocks.0.linear1": (3 * D + MLP, D), "double_blocks.0.img_attn.proj": (D, D),
          "final_layer.adaLN_modulation.1": (2 * D, D)}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def lora(rows: int, cols: int, rank: int, alpha: float, seed: int) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(B=torch.randn(rows, rank, generator=g), A=torch.randn(rank, cols, generator=g), alpha=alpha)


def delta(m: LoraModule) -> torch.Tensor:
    return m.scale * m.B.double() @ m.A.double()


def bfl_adapter() -> Adapter:
    """A BFL-named Flux adapter: fused qkv (rank 2, alpha 1), linear1 (rank 3), a plain proj and the swapped
    final modulation."""
    return Adapter(modules={name: lora(*shape, rank=2 + i % 2, alpha=1.0 + i, seed=i)
                            for i, (name, shape) in enumerate(SHAPES.items())})


def swap(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


def diffusers_deltas(bfl: Adapter) -> dict[str, torch.Tensor]:
    """The BFL adapter's deltas as the diffusers model's parameters see them, sliced by hand."""
    m = {k: delta(v) for k, v in bfl.modules.items()}
    qkv, txt, lin1 = m["double_blocks.0.img_attn.qkv"], m["double_blocks.0.txt_attn.qkv"], m["single_blocks.0.linear1"]
    out = {f"transformer_blocks.0.attn.to_{p}": qkv[j * D:(j + 1) * D] for j, p in enumerate("qkv")}
    out |= {f"transformer_blocks.0.attn.add_{p}_proj": txt[j * D:(j + 1) * D] for j, p in enumerate("qkv")}
    out |= {f"single_transformer_blocks.0.attn.to_{p}": lin1[j * D:(j + 1) * D] for j, p in enumerate("qkv")}
    out["single_transformer_blocks.0.proj_mlp"] = lin1[3 * D:]
    out["transformer_blocks.0.attn.to_out.0"] = m["double_blocks.0.img_attn.proj"]
    out["norm_out.linear"] = swap(m["final_layer.adaLN_modulation.1"])
    return out


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    """A tiny diffusers FluxTransformer2DModel folder and its weights."""
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path_factory.mktemp("flux") / "base"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        diffusers.FluxTransformer2DModel(**FLUX).save_pretrained(folder)
    return folder, load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def check_applied(out: dict, base: dict, expected: dict[str, torch.Tensor], prefix: str = "") -> None:
    for name, d in expected.items():
        key = f"{prefix}{name}.weight"
        torch.testing.assert_close(out[key].double(), base[key].double() + d, rtol=0, atol=1e-5, msg=key)
    untouched = [k for k in base if k[len(prefix):-len(".weight")] not in expected]
    assert untouched and all(torch.equal(out[k], base[k]) for k in untouched)


@pytest.mark.parametrize("naming", ["bfl-kohya", "diffusers-peft"])
def test_apply_either_naming_onto_diffusers_flux(flux_base, tmp_path, naming):
    folder, base = flux_base
    bfl = bfl_adapter()
    path = tmp_path / ("a.safetensors" if naming == "bfl-kohya" else "a")
    save_adapter(bfl, path, format="kohya" if naming == "bfl-kohya" else "peft")
    result = run("apply", folder, path, "-o", tmp_path / "out.safetensors", "--quiet")
    assert result.exit_code == 0, result.output
    check_applied(load_file(str(tmp_path / "out.safetensors")), base, diffusers_deltas(bfl))


def bfl_base(path, prefix: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    tensors = {f"{prefix}{name}.weight": torch.randn(*shape, generator=g) for name, shape in SHAPES.items()}
    tensors[f"{prefix}single_blocks.0.linear2.weight"] = torch.randn(D, D + MLP, generator=g)
    save_file(tensors, str(path))
    return tensors


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
def test_diffusers_adapter_onto_bfl_single_file(tmp_path, prefix):
    """A diffusers-named adapter (split q/k/v, one part of linear1 only, rank 2 each) onto a BFL / ComfyUI file."""
    base = bfl_base(tmp_path / "flux.safetensors", prefix)
    parts = ([f"transformer_blocks.0.attn.to_{p}" for p in "qkv"] + ["single_transformer_blocks.0.proj_mlp",
             "norm_out.linear"])
    rows = {"single_transformer_blocks.0.proj_mlp": MLP, "norm_out.linear": 2 * D}
    adapter = Adapter(modules={f"transformer.{n}": lora(rows.get(n, D), D, rank=2, alpha=4.0 - i, seed=20 + i)
                               for i, n in enumerate(parts)})
    d = {n[len("transformer."):]: delta(m) for n, m in adapter.modules.items()}
    expected = {"double_blocks.0.img_attn.qkv": torch.cat([d[f"transformer_blocks.0.attn.to_{p}"] for p in "qkv"]),
                "single_blocks.0.linear1": torch.cat([torch.zeros(3 * D, D, dtype=torch.float64),
                                                      d["single_transformer_blocks.0.proj_mlp"]]),
                "final_layer.adaLN_modulation.1": swap(d["norm_out.linear"])}
    apply(tmp_path / "flux.safetensors", [adapter], tmp_path / "out.safetensors")
    check_applied(load_file(str(tmp_path / "out.safetensors")), base, expected, prefix)


def test_merge_both_namings_half_each_is_the_adapter(tmp_path):
    bfl = bfl_adapter()
    save_adapter(bfl, tmp_path / "bfl.safetensors", format="kohya")
    save_adapter(bfl, tmp_path / "diffusers", format="peft")
    result = run("merge", f"{tmp_path / 'bfl.safetensors'}:0.5", f"{tmp_path / 'diffusers'}:0.5",
                 "-o", tmp_path / "merged", "--quiet")
    assert result.exit_code == 0, result.output
    merged = load_adapter(tmp_path / "merged")
    expected = diffusers_deltas(bfl)
    got = {n[len("transformer."):]: delta(m) for n, m in merged.modules.items()}
    assert got.keys() == expected.keys()
    for name, d in expected.items():
        torch.testing.assert_close(got[name], d, rtol=0, atol=1e-5, msg=name)


def test_common_naming_follows_the_first_input():
    bfl = bfl_adapter()
    split = to_diffusers(bfl, architecture_named("flux"))
    first, second = to_common_naming([split, bfl])
    assert first is split and set(second.modules) == set(split.modules)
    first, second = to_common_naming([bfl, split])
    assert first is bfl and set(second.modules) == set(bfl.modules)


def test_base_naming_leaves_other_models_alone():
    bfl = bfl_adapter()
    assert to_base_naming(bfl, ["model.layers.0.self_attn.q_proj"]) is bfl  # not a table's model
    assert to_base_naming(bfl, [f"double_blocks.0.{n}" for n in ("img_attn.qkv", "img_attn.proj")] +
                          ["single_blocks.0.linear1"]) is bfl  # same naming and prefix: nothing to do
    llm = Adapter(modules={"model.layers.0.self_attn.q_proj": lora(4, 4, 1, 1.0, 0)})
    assert to_base_naming(llm, ["single_transformer_blocks.0.attn.to_q"]) is llm


def test_evaluate_patch_lines_up_a_bfl_adapter_on_a_diffusers_flux():
    diffusers = pytest.importorskip("diffusers")
    from lowrank_tools.evaluate.patch import applied, plan_patch

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**FLUX)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bfl = bfl_adapter()
    patch = plan_patch(model, bfl, "bfl", prefix="transformer")
    with applied(model, patch):
        check_applied(model.state_dict(), before, diffusers_deltas(bfl))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_dora_part_that_cannot_fuse_is_refused_naming_it(tmp_path):
    """A DoRA q/k/v part onto a BFL base would need the fused layer's magnitude: exit 1, naming the module,
    nothing written."""
    bfl_base(tmp_path / "flux.safetensors", "")
    m = lora(D, D, rank=2, alpha=2.0, seed=1)
    m.magnitude = torch.ones(D)
    save_adapter(Adapter(modules={"transformer.transformer_blocks.0.attn.to_q": m}), tmp_path / "dora", format="peft")
    result = run("apply", tmp_path / "flux.safetensors", tmp_path / "dora", "-o", tmp_path / "out.safetensors",
                 "--quiet")
    assert result.exit_code == 1
    assert "transformer_blocks.0.attn.to_q" in result.output and "--format" not in result.output
    assert not (tmp_path / "out.safetensors").exists()


def test_filters_see_the_adapters_own_names(flux_base, tmp_path):
    folder, base = flux_base
    bfl = bfl_adapter()
    save_adapter(bfl, tmp_path / "a.safetensors", format="kohya")
    result = run("apply", folder, tmp_path / "a.safetensors", "-o", tmp_path / "out.safetensors", "--quiet",
                 "--exclude", r"^single_blocks\.0\.linear1$")
    assert result.exit_code == 0, result.output
    expected = {k: v for k, v in diffusers_deltas(bfl).items() if not k.startswith("single_transformer_blocks.0.")}
    check_applied(load_file(str(tmp_path / "out.safetensors")), base, expected)


def test_merge_filters_see_each_inputs_own_names(tmp_path):
    """--exclude on the BFL input's name drops its linear1 before the naming step; the diffusers input's linear1
    parts stay, at weight 0.5: the merged single block is half the adapter's, the rest all of it."""
    bfl = bfl_adapter()
    save_adapter(bfl, tmp_path / "bfl.safetensors", format="kohya")
    save_adapter(bfl, tmp_path / "diffusers", format="peft")
    result = run("merge", f"{tmp_path / 'diffusers'}:0.5", f"{tmp_path / 'bfl.safetensors'}:0.5",
                 "-o", tmp_path / "merged", "--quiet", "--exclude", r"^single_blocks\.0\.linear1$")
    assert result.exit_code == 0, result.output
    got = {n[len("transformer."):]: delta(m) for n, m in load_adapter(tmp_path / "merged").modules.items()}
    for name, d in diffusers_deltas(bfl).items():
        half = 0.5 if name.startswith("single_transformer_blocks.0.") else 1.0
        torch.testing.assert_close(got[name], half * d, rtol=0, atol=1e-5, msg=name)


def test_a_module_the_base_lacks_after_renaming_is_named_in_the_bases_naming(tmp_path):
    tensors = bfl_base(tmp_path / "flux.safetensors", "")
    del tensors["final_layer.adaLN_modulation.1.weight"]
    save_file(tensors, str(tmp_path / "flux.safetensors"))
    adapter = Adapter(modules={"transformer.norm_out.linear": lora(2 * D, D, 2, 2.0, 0),
                               "transformer.single_transformer_blocks.0.proj_out": lora(D, D + MLP, 2, 2.0, 1)})
    with pytest.raises(AdapterMismatch, match=r"module final_layer\.adaLN_modulation\.1 is not in base .*--exclude on its "
                                        r"name in the adapter"):
        apply(tmp_path / "flux.safetensors", [adapter], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()

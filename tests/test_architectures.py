"""Transformer diffusion models' names and fused layers (io/architectures, io/arch_convert, linalg/fused): exact
fused <-> split algebra, detection of the architecture from a whole file's names, reading kohya / ComfyUI / OneTrainer
names without a base, and info naming the architecture. No diffusers needed (tests/test_flux_consumer.py loads for
real)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from lowrank_tools.adapter import Adapter, LoraModule
from lowrank_tools.cli import main
from lowrank_tools.errors import ConversionError
from lowrank_tools.io.arch_convert import for_format, to_diffusers, to_original
from lowrank_tools.io.architectures import Naming, architecture_named, detect_architecture
from lowrank_tools.io.formats import load_adapter, save_adapter
from lowrank_tools.linalg.fused import fuse_rows, split_rows, swap_halves

FLUX, SD3, WAN = (architecture_named(n) for n in ("flux", "sd3", "wan"))
D = 8  # hidden width of the hand-made models


def lora(out, inp, r, *, alpha=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LoraModule(B=torch.randn(out, r, generator=g, dtype=torch.float64),
                      A=torch.randn(r, inp, generator=g, dtype=torch.float64), alpha=float(alpha or r))


def test_split_of_a_fuse_gives_each_part_back_with_its_rank():
    parts = [(lora(D, D, r, seed=r).B, lora(D, D, r, seed=r).A, s) for r, s in ((1, 0.5), (2, 1.0), (3, 2.0))]
    B, A = fuse_rows(parts)
    assert B.shape == (3 * D, 6) and A.shape == (6, D)
    dense = torch.cat([s * b @ a for b, a, s in parts])
    torch.testing.assert_close(B @ A, dense, rtol=0, atol=1e-12)
    back = split_rows(B, A, [D, D, D])
    assert [a.shape[0] for _, a in back] == [1, 2, 3]
    for (b, a), (b0, a0, s) in zip(back, parts):
        torch.testing.assert_close(b @ a, s * b0 @ a0, rtol=0, atol=1e-12)


def test_split_of_a_shared_down_keeps_the_whole_rank_and_an_untouched_part_has_none():
    B, A = torch.randn(3 * D, 4, dtype=torch.float64), torch.randn(4, D, dtype=torch.float64)
    B[2 * D:] = 0  # v untouched
    parts = split_rows(B, A, [D, D, D])
    assert [a.shape[0] for _, a in parts] == [4, 4, 0]
    torch.testing.assert_close(torch.cat([b @ a for b, a in parts]), B @ A, rtol=0, atol=0)


def test_fuse_with_a_rank_is_the_optimal_truncation():
    parts = [(lora(D, D, 3, seed=s).B, lora(D, D, 3, seed=s).A, 1.0) for s in range(3)]
    dense = torch.cat([b @ a for b, a, _ in parts])
    S = torch.linalg.svdvals(dense)
    B, A = fuse_rows(parts, rank=4)
    assert A.shape[0] == 4
    err = torch.linalg.matrix_norm(dense - B @ A)
    torch.testing.assert_close(err, S[4:].square().sum().sqrt(), rtol=1e-9, atol=1e-9)


def test_swap_halves_is_its_own_inverse():
    B = torch.arange(8.0).reshape(4, 2)
    assert swap_halves(B)[0].tolist() == [4.0, 5.0]
    torch.testing.assert_close(swap_halves(swap_halves(B)), B)


def flux_diffusers_adapter(*, alphas=(1, 2, 3)) -> Adapter:
    """Diffusers-named Flux modules of one double and one single block, each part with its own rank and alpha."""
    t = "transformer."
    mods = {f"{t}transformer_blocks.0.attn.{p}": lora(D, D, r, alpha=a, seed=r)
            for p, r, a in zip(("to_q", "to_k", "to_v"), (1, 2, 3), alphas)}
    mods[f"{t}transformer_blocks.0.attn.to_out.0"] = lora(D, D, 2, alpha=4, seed=9)
    mods.update({f"{t}single_transformer_blocks.0.{p}": lora(rows, D, 2, alpha=2, seed=10 + i)
                 for i, (p, rows) in enumerate((("attn.to_q", D), ("attn.to_k", D), ("attn.to_v", D),
                                                ("proj_mlp", 4 * D)))})
    mods[f"{t}single_transformer_blocks.0.proj_out"] = lora(D, 5 * D, 2, seed=20)
    mods[f"{t}norm_out.linear"] = lora(2 * D, D, 2, seed=21)
    return Adapter(modules=mods)


def dense_by_name(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {n: m.delta_matrix().double() if m.B.dtype != torch.float64 else m.scale * m.B @ m.A
            for n, m in adapter.modules.items()}


def test_to_original_fuses_exactly_and_back_splits_to_the_same_modules():
    adapter = flux_diffusers_adapter()
    fused = to_original(adapter, FLUX)
    assert list(fused.modules) == ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj",
                                   "single_blocks.0.linear1", "single_blocks.0.linear2", "final_layer.adaLN_modulation.1"]
    qkv = fused.modules["double_blocks.0.img_attn.qkv"]
    assert qkv.rank == 6 and qkv.scale == 1.0  # scales 1, 1, 1 -> kept
    before = dense_by_name(adapter)
    expect = torch.cat([before[f"transformer.transformer_blocks.0.attn.{p}"] for p in ("to_q", "to_k", "to_v")])
    torch.testing.assert_close(qkv.scale * qkv.B @ qkv.A, expect, rtol=0, atol=1e-12)
    final = fused.modules["final_layer.adaLN_modulation.1"]
    torch.testing.assert_close(final.scale * final.B @ final.A, swap_halves(before["transformer.norm_out.linear"]))
    back = to_diffusers(fused, FLUX)
    assert set(back.modules) == set(adapter.modules)
    for name, delta in dense_by_name(back).items():
        torch.testing.assert_close(delta, before[name], rtol=0, atol=1e-12)
        assert back.modules[name].rank == adapter.modules[name].rank, name


def test_split_keeps_the_scale_not_the_fused_alpha():
    """sd-scripts #2204: a fused rank-3r module of alpha a splits into rank-r parts of alpha a / 3 (scale a / 3r)."""
    B = torch.block_diag(*(torch.randn(D, 4, dtype=torch.float64) for _ in range(3)))  # (3D, 12)
    fused = Adapter(modules={"double_blocks.0.img_attn.qkv": LoraModule(B=B, A=torch.randn(12, D, dtype=torch.float64),
                                                                       alpha=6.0)})
    parts = to_diffusers(fused, FLUX).modules
    assert {m.rank for m in parts.values()} == {4}
    assert {m.alpha for m in parts.values()} == {2.0} and {m.scale for m in parts.values()} == {0.5}


def test_mixed_scales_are_folded_into_the_fused_up():
    fused = to_original(flux_diffusers_adapter(alphas=(1, 4, 9)), FLUX).modules["double_blocks.0.img_attn.qkv"]
    assert fused.alpha == fused.rank == 6  # scale 1, scales inside B


def test_a_missing_part_is_zero_rows_and_a_part_of_the_wrong_size_refuses():
    adapter = flux_diffusers_adapter()
    del adapter.modules["transformer.transformer_blocks.0.attn.to_k"]
    qkv = to_original(adapter, FLUX).modules["double_blocks.0.img_attn.qkv"]
    assert qkv.B.shape == (3 * D, 4) and not qkv.B[D:2 * D].any()
    adapter.modules["transformer.transformer_blocks.0.attn.to_v"] = lora(D + 1, D, 1)
    with pytest.raises(ConversionError, match="to_v is 9x8, but part 2 of double_blocks.0.img_attn.qkv is 8x8"):
        to_original(adapter, FLUX)


@pytest.mark.parametrize("names, arch, naming", [
    (["double_blocks.0.img_attn.qkv", "single_blocks.3.linear1"], "flux", Naming.ORIGINAL),
    (["transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.proj_mlp"], "flux",
     Naming.DIFFUSERS),
    (["joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.mlp.fc1"], "sd3", Naming.ORIGINAL),
    (["transformer_blocks.0.attn2.to_q", "transformer_blocks.0.attn.to_q"], "sd3", Naming.DIFFUSERS),
    (["blocks.0.self_attn.q", "blocks.0.cross_attn.k_img", "blocks.0.ffn.0"], "wan", Naming.ORIGINAL),
    (["blocks.0.attn1.to_q", "blocks.0.ffn.net.0.proj"], "wan", Naming.DIFFUSERS),
    (["transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.img_mod.1", "img_in"], "qwen_image",
     Naming.ORIGINAL),  # one naming: ComfyUI's Qwen-Image keeps diffusers' names
])
def test_detection_from_all_names(names, arch, naming):
    found = detect_architecture(names)
    assert (found.architecture.name, found.naming) == (arch, naming)


def test_names_two_architectures_share_are_decided_by_the_base_or_not_at_all():
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj"]
    assert detect_architecture(names) is None
    assert detect_architecture(names, base_names=["pos_embed.pos_embed", "transformer_blocks.0.attn.to_q"]
                               ).architecture.name == "sd3"
    assert detect_architecture(names, base_names=["single_transformer_blocks.0.proj_mlp"]).architecture.name == "flux"
    assert detect_architecture(["model.layers.0.self_attn.q_proj", "down_blocks.0.attentions.0.proj_in"]) is None


def test_an_unknown_model_is_left_alone():
    adapter = Adapter(modules={"model.layers.0.self_attn.q_proj": lora(D, D, 2)})
    assert for_format(adapter, True) == (adapter, None)


def kohya_file(path, keys: dict[str, tuple[int, int, int]], *, metadata=None):
    tensors = {}
    for key, (out, inp, r) in keys.items():
        tensors[f"{key}.lora_down.weight"] = torch.randn(r, inp)
        tensors[f"{key}.lora_up.weight"] = torch.randn(out, r)
        tensors[f"{key}.alpha"] = torch.tensor(float(r))
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("keys, names", [
    (["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_modulation_lin",
      "lora_unet_final_layer_adaLN_modulation_1"],
     ["double_blocks.0.img_attn.qkv", "single_blocks.1.modulation.lin", "final_layer.adaLN_modulation.1"]),
    (["diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.0.ffn.0"], ["blocks.0.self_attn.q", "blocks.0.ffn.0"]),
    (["lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_cross_attn_v_img"],
     ["blocks.0.self_attn.q", "blocks.0.cross_attn.v_img"]),
    (["lora_unet_joint_blocks_2_context_block_adaLN_modulation_1", "lora_unet_joint_blocks_2_x_block_attn2_qkv"],
     ["joint_blocks.2.context_block.adaLN_modulation.1", "joint_blocks.2.x_block.attn2.qkv"]),
    (["lora_transformer_single_transformer_blocks_0_attn_to_q", "lycoris_transformer_blocks_1_ff_context_net_0_proj"],
     ["transformer.single_transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.1.ff_context.net.0.proj"]),
    (["lora_te3_encoder_block_0_layer_0_SelfAttention_q"], ["text_encoder_3.encoder.block.0.layer.0.SelfAttention.q"]),
    (["lora_unet_transformer_blocks_0_img_mlp_net_0_proj", "lora_unet_transformer_blocks_0_txt_mod_1"],
     ["transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.0.txt_mod.1"]),
], ids=["kohya-flux", "comfyui-wan", "musubi-wan", "kohya-sd3", "onetrainer-simpletuner", "t5", "qwen-image"])
def test_names_read_without_a_base(tmp_path, keys, names):
    path = kohya_file(tmp_path / "a.safetensors", {k: (D, D, 2) for k in keys})
    assert sorted(load_adapter(path).modules) == sorted(names)


def test_info_states_the_architecture_and_naming(tmp_path):
    path = kohya_file(tmp_path / "a.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": (3 * D, D, 2),
                                                   "lora_unet_single_blocks_0_linear2": (D, 5 * D, 2)})
    result = CliRunner().invoke(main, ["info", str(path), "--json"], catch_exceptions=False)
    assert json.loads(result.output)["architecture"] == "Flux (BFL names)"
    result = CliRunner().invoke(main, ["info", str(path)], catch_exceptions=False)
    assert "read as Flux (BFL names)" in result.output + (result.stderr if result.stderr_bytes else "")


def test_kohya_output_of_diffusers_names_is_bfl_and_reads_back(tmp_path):
    adapter = flux_diffusers_adapter()
    path = save_adapter(adapter, tmp_path / "k.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in f.keys()}
    assert keys == {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
                    "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2",
                    "lora_unet_final_layer_adaLN_modulation_1"}
    folder = save_adapter(load_adapter(path), tmp_path / "peft")  # back to diffusers names, split
    again = load_adapter(folder)
    before = dense_by_name(adapter)
    assert set(again.modules) == set(before)
    for name, m in again.modules.items():
        torch.testing.assert_close(m.delta_matrix(), before[name].float(), rtol=1e-5, atol=1e-5)


def test_names_two_models_share_are_written_by_the_base_the_adapter_records(tmp_path):
    """An SD3 adapter of attention modules only (names Flux's double blocks share): its base decides."""
    save_file({"pos_embed.pos_embed": torch.zeros(1, 4, D), "transformer_blocks.0.attn.to_q.weight": torch.zeros(D, D)},
              str(tmp_path / "sd3.safetensors"))
    mods = {f"transformer_blocks.0.attn.{p}": lora(D, D, 2, seed=i) for i, p in enumerate(("to_q", "to_k", "to_v"))}
    path = save_adapter(Adapter(modules=mods, base_model=str(tmp_path / "sd3.safetensors")), tmp_path / "k.safetensors")
    assert set(load_adapter(path).modules) == {"joint_blocks.0.x_block.attn.qkv"}
    path = save_adapter(Adapter(modules=mods), tmp_path / "plain.safetensors")  # nothing decides: names kept
    assert set(load_adapter(path).modules) == set(mods)


# ComfyUI's own module names for one block of each model (derived from comfy/ldm/flux/{model,layers}.py,
# comfy/ldm/modules/diffusionmodules/mmdit.py and comfy/ldm/wan/model.py: the Linear layers each block holds).
# comfy/lora.py's model_lora_keys_unet maps "lora_unet_" + <name with . -> _> of each of them, nothing else.
COMFY_NAMES = {
    "flux": """img_in txt_in time_in.in_layer time_in.out_layer vector_in.in_layer vector_in.out_layer
        guidance_in.in_layer guidance_in.out_layer final_layer.linear final_layer.adaLN_modulation.1
        double_blocks.0.img_mod.lin double_blocks.0.img_attn.qkv double_blocks.0.img_attn.proj double_blocks.0.img_mlp.0
        double_blocks.0.img_mlp.2 double_blocks.0.txt_mod.lin double_blocks.0.txt_attn.qkv double_blocks.0.txt_attn.proj
        double_blocks.0.txt_mlp.0 double_blocks.0.txt_mlp.2 single_blocks.0.linear1 single_blocks.0.linear2
        single_blocks.0.modulation.lin""",
    "sd3": """x_embedder.proj context_embedder t_embedder.mlp.0 t_embedder.mlp.2 y_embedder.mlp.0 y_embedder.mlp.2
        final_layer.linear final_layer.adaLN_modulation.1 joint_blocks.0.x_block.attn.qkv joint_blocks.0.x_block.attn.proj
        joint_blocks.0.x_block.attn2.qkv joint_blocks.0.x_block.attn2.proj joint_blocks.0.x_block.mlp.fc1
        joint_blocks.0.x_block.mlp.fc2 joint_blocks.0.x_block.adaLN_modulation.1 joint_blocks.0.context_block.attn.qkv
        joint_blocks.0.context_block.attn.proj joint_blocks.0.context_block.mlp.fc1 joint_blocks.0.context_block.mlp.fc2
        joint_blocks.0.context_block.adaLN_modulation.1""",
    "wan": """patch_embedding text_embedding.0 text_embedding.2 time_embedding.0 time_embedding.2 time_projection.1
        head.head img_emb.proj.1 img_emb.proj.3 blocks.0.self_attn.q blocks.0.self_attn.k blocks.0.self_attn.v
        blocks.0.self_attn.o blocks.0.cross_attn.q blocks.0.cross_attn.k blocks.0.cross_attn.v blocks.0.cross_attn.o
        blocks.0.cross_attn.k_img blocks.0.cross_attn.v_img blocks.0.ffn.0 blocks.0.ffn.2""",
}


@pytest.mark.parametrize("kind", list(COMFY_NAMES))
def test_every_diffusers_module_is_written_as_a_key_comfyui_maps(kind, tmp_path):
    """Every diffusers module of the table, written to kohya, becomes one of ComfyUI's keys, and all are reached."""
    arch = architecture_named(kind)
    comfy = {"lora_unet_" + n.replace(".", "_") for n in COMFY_NAMES[kind].split()}
    mods = {}
    for rule in arch.rules:
        for j in range(len(rule.parts)):
            rows = (rule.sizes[j] if rule.sizes else 1) * D
            mods["transformer." + arch.module_name(rule, "0", Naming.DIFFUSERS, j)] = lora(rows, D, 1, seed=j)
    path = save_adapter(Adapter(modules=mods), tmp_path / "k.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = {k.split(".")[0] for k in f.keys()}
    assert keys == comfy


def test_a_comfyui_native_file_of_lora_a_b_keys_writes_plain_bfl_kohya_keys(tmp_path):
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(2, D),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(3 * D, 2)},
              str(tmp_path / "comfy.safetensors"))
    assert detect_architecture(load_adapter(tmp_path / "comfy.safetensors").modules).describe() == "Flux (BFL names)"
    path = save_adapter(load_adapter(tmp_path / "comfy.safetensors"), tmp_path / "k.safetensors")
    with safe_open(str(path), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"lora_unet_double_blocks_0_img_attn_qkv"}


def test_a_t5_text_encoder_is_written_lora_te3_with_its_own_names(tmp_path):
    """Flux's T5 is diffusers' text_encoder_2, SD3's text_encoder_3: sd-scripts and ComfyUI name both lora_te3_."""
    mods = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": lora(D, D, 1),
            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q": lora(D, D, 1)}
    path = save_adapter(Adapter(modules=mods), tmp_path / "k.safetensors")
    with safe_open(str(path), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                                       "lora_te3_encoder_block_0_layer_0_SelfAttention_q"}
    assert set(load_adapter(path).modules) == set(mods)  # the recorded names


def test_resize_of_a_fused_file_is_the_optimal_truncation_of_the_stacked_layer(tmp_path):
    """Split -> fused with a rank: write kohya (exact fuse, rank = sum), then resize: Eckart-Young on [q; k; v]."""
    adapter = flux_diffusers_adapter()
    save_adapter(adapter, tmp_path / "k.safetensors")
    result = CliRunner().invoke(main, ["resize", str(tmp_path / "k.safetensors"), "-o", str(tmp_path / "r.safetensors"),
                                       "--rank", "2", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    qkv = load_adapter(tmp_path / "r.safetensors").modules["double_blocks.0.img_attn.qkv"]
    before = dense_by_name(adapter)
    stacked = torch.cat([before[f"transformer.transformer_blocks.0.attn.{p}"] for p in ("to_q", "to_k", "to_v")])
    S = torch.linalg.svdvals(stacked)
    err = torch.linalg.matrix_norm(stacked - qkv.delta_matrix().double())
    assert qkv.rank == 2
    torch.testing.assert_close(err, S[2:].square().sum().sqrt(), rtol=1e-4, atol=1e-5)


# module names (diffusers, under transformer.) of models outside the tables that share some names with them
LUMINA2 = ["x_embedder", "layers.0.attn.to_q", "layers.0.feed_forward.linear_1", "norm_out.linear_1"]
PIXART = ["pos_embed.proj", "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_q",
          "transformer_blocks.0.ff.net.0.proj", "proj_out", "adaln_single.linear"]
COGVIDEOX = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.ff.net.0.proj", "norm_out.linear", "proj_out"]


@pytest.mark.parametrize("names", [LUMINA2, PIXART, COGVIDEOX], ids=["lumina2", "pixart", "cogvideox"])
def test_names_shared_with_a_table_do_not_decide_alone(names):
    """Lumina2's x_embedder is Flux's diffusers img_in, PixArt's attn2 SD3.5's: neither model is in the tables, and
    without one of an architecture's own blocks nothing is detected (nor asks for a base)."""
    from lowrank_tools.io.architectures import needs_base

    full = [f"transformer.{n}" for n in names]
    assert detect_architecture(full) is None and not needs_base(full)


@pytest.mark.parametrize("names, arch, naming", [
    (["transformer.x_embedder", "transformer.single_transformer_blocks.0.attn.to_q"], "flux", Naming.DIFFUSERS),
    (["img_in", "double_blocks.0.img_attn.qkv"], "flux", Naming.ORIGINAL),
    (["transformer.pos_embed.proj", "transformer.transformer_blocks.0.attn2.to_q", "transformer.transformer_blocks.0."
      "attn.to_q", "transformer.transformer_blocks.0.ff_context.net.2"], "sd3", Naming.DIFFUSERS),
    (["transformer.blocks.0.attn1.to_q", "transformer.patch_embedding"], "wan", Naming.DIFFUSERS),
    (["transformer.transformer_blocks.0.img_mod.1", "transformer.img_in"], "qwen_image", Naming.ORIGINAL)])
def test_a_marker_of_the_architecture_lets_its_other_names_count(names, arch, naming):
    found = detect_architecture(names)
    assert found is not None and (found.architecture.name, found.naming) == (arch, naming)


def test_lumina2_converts_back_to_its_own_names(tmp_path):
    """A Lumina2 adapter to kohya and back: x_embedder stays x_embedder (read as Flux it became img_in)."""
    mods = {f"transformer.{n}": lora(D, D, 2, seed=i) for i, n in enumerate(LUMINA2)}
    path = save_adapter(Adapter(modules=mods), tmp_path / "k.safetensors")
    assert set(load_adapter(path).modules) == set(mods)

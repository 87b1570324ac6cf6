"""Tiny, seeded models of real architectures for the model zoo (tests/test_model_zoo.py).

Each ``Spec`` builds a model from its library's own config class at one shared tiny size (hidden 16, one or two
layers, two heads, vocabulary 48), says how to call it, and which parameters a fine-tune moves. ``plant`` moves
those parameters by an exactly rank-2 delta (per expert for 3-D MoE weights), so an extraction at rank 2 must give
back the fine-tune exactly."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from safetensors.torch import save_file

H, FF, VOCAB, HEADS = 16, 32, 48, 2
RANK = 2


@dataclass(frozen=True)
class Spec:
    """One architecture: ``build()`` a fresh seeded model, ``inputs()`` for its forward pass."""

    name: str
    library: str  # "transformers" or "diffusers"
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict] = field(default=lambda: {})
    plant: str = r"."  # regex over in-memory parameter names: which ones the fine-tune moves
    prefix: str = ""  # diffusers: the component's folder and prefix in a pipeline LoRA file ("unet", "transformer")
    pipeline: str = ""  # diffusers: the pipeline class model_index.json names


def _ids(*shape, vocab=VOCAB, seed=7):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _causal():
    return {"input_ids": _ids(2, 6)}


def _seq2seq():
    return {"input_ids": _ids(2, 6), "decoder_input_ids": _ids(2, 5, seed=8)}


def _tf(cls_name: str, config_name: str, **config):
    """A builder of transformers' ``cls_name`` from ``config_name(**config)``, seeded."""

    def build():
        import transformers

        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = getattr(transformers, cls_name)(getattr(transformers, config_name)(**config))
        return model.eval()

    return build


LLAMA_LIKE = dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=1, num_attention_heads=HEADS,
                  num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32)


def _transformers_specs() -> list[Spec]:
    llama = dict(LLAMA_LIKE, tie_word_embeddings=False)
    gemma = dict(LLAMA_LIKE, head_dim=8)
    specs = [
        Spec("llama", "transformers", _tf("LlamaForCausalLM", "LlamaConfig", **llama), _causal),
        Spec("mistral", "transformers", _tf("MistralForCausalLM", "MistralConfig", **llama), _causal),
        Spec("qwen2", "transformers", _tf("Qwen2ForCausalLM", "Qwen2Config", **llama), _causal),
        Spec("qwen3", "transformers", _tf("Qwen3ForCausalLM", "Qwen3Config", **llama, head_dim=8), _causal),
        Spec("gemma", "transformers", _tf("GemmaForCausalLM", "GemmaConfig", **gemma), _causal),
        Spec("gemma2", "transformers", _tf("Gemma2ForCausalLM", "Gemma2Config", **gemma), _causal),
        Spec("gemma3", "transformers", _tf("Gemma3ForCausalLM", "Gemma3TextConfig", **gemma), _causal),
        Spec("phi3", "transformers", _tf("Phi3ForCausalLM", "Phi3Config", **llama, pad_token_id=0), _causal),
        Spec("gpt_neox", "transformers", _tf("GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_size=H, intermediate_size=FF,
                                              num_hidden_layers=1, num_attention_heads=HEADS, vocab_size=VOCAB,
                                              max_position_embeddings=32), _causal),
        Spec("falcon", "transformers", _tf("FalconForCausalLM", "FalconConfig", hidden_size=H, num_hidden_layers=1,
                                            num_attention_heads=HEADS, vocab_size=VOCAB), _causal),
        Spec("bloom", "transformers", _tf("BloomForCausalLM", "BloomConfig", hidden_size=H, n_layer=1, n_head=HEADS,
                                           vocab_size=VOCAB), _causal),
        Spec("opt", "transformers", _tf("OPTForCausalLM", "OPTConfig", hidden_size=H, ffn_dim=FF, num_hidden_layers=1,
                                         num_attention_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=32,
                                         word_embed_proj_dim=H), _causal),
        Spec("gpt_bigcode", "transformers", _tf("GPTBigCodeForCausalLM", "GPTBigCodeConfig", n_embd=H, n_layer=1,
                                                 n_head=HEADS, vocab_size=VOCAB, n_positions=32), _causal),
        Spec("mpt", "transformers", _tf("MptForCausalLM", "MptConfig", d_model=H, n_layers=1, n_heads=HEADS,
                                         vocab_size=VOCAB, max_seq_len=32), _causal),
        Spec("gpt2", "transformers", _tf("GPT2LMHeadModel", "GPT2Config", n_embd=H, n_layer=1, n_head=HEADS,
                                          vocab_size=VOCAB, n_positions=32), _causal),
        Spec("bert", "transformers", _tf("BertModel", "BertConfig", hidden_size=H, intermediate_size=FF,
                                          num_hidden_layers=1, num_attention_heads=HEADS, vocab_size=VOCAB,
                                          max_position_embeddings=32), _causal),
        Spec("roberta", "transformers", _tf("RobertaModel", "RobertaConfig", hidden_size=H, intermediate_size=FF,
                                             num_hidden_layers=1, num_attention_heads=HEADS, vocab_size=VOCAB,
                                             max_position_embeddings=32), _causal),
        Spec("deberta_v2", "transformers", _tf("DebertaV2Model", "DebertaV2Config", hidden_size=H, intermediate_size=FF,
                                                num_hidden_layers=1, num_attention_heads=HEADS, vocab_size=VOCAB,
                                                max_position_embeddings=32, relative_attention=True,
                                                position_buckets=8, pos_att_type=["p2c", "c2p"]), _causal),
        Spec("t5", "transformers", _tf("T5ForConditionalGeneration", "T5Config", d_model=H, d_ff=FF, d_kv=8,
                                        num_layers=1, num_heads=HEADS, vocab_size=VOCAB,
                                        relative_attention_num_buckets=8), _seq2seq),
        Spec("bart", "transformers", _tf("BartForConditionalGeneration", "BartConfig", d_model=H, encoder_layers=1,
                                          decoder_layers=1, encoder_attention_heads=HEADS,
                                          decoder_attention_heads=HEADS, encoder_ffn_dim=FF, decoder_ffn_dim=FF,
                                          vocab_size=VOCAB, max_position_embeddings=32), _seq2seq),
        Spec("whisper", "transformers", _tf("WhisperForConditionalGeneration", "WhisperConfig", d_model=H,
                                             encoder_layers=1, decoder_layers=1, encoder_attention_heads=HEADS,
                                             decoder_attention_heads=HEADS, encoder_ffn_dim=FF, decoder_ffn_dim=FF,
                                             vocab_size=VOCAB, num_mel_bins=8, max_source_positions=8,
                                             max_target_positions=16, pad_token_id=0, bos_token_id=1,
                                             eos_token_id=2, decoder_start_token_id=1,
                                             begin_suppress_tokens=None, suppress_tokens=None),
             lambda: {"input_features": torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(9)),
                      "decoder_input_ids": _ids(2, 5)}),
        Spec("mixtral", "transformers", _tf("MixtralForCausalLM", "MixtralConfig", **llama, num_local_experts=2,
                                             num_experts_per_tok=1), _causal),
        Spec("qwen2_moe", "transformers", _tf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **llama, num_experts=2,
                                               num_experts_per_tok=1, moe_intermediate_size=FF,
                                               shared_expert_intermediate_size=FF), _causal),
        Spec("qwen3_moe", "transformers", _tf("Qwen3MoeForCausalLM", "Qwen3MoeConfig", **llama, num_experts=2,
                                               num_experts_per_tok=1, moe_intermediate_size=FF, head_dim=8), _causal),
        # stores its experts fused on disk too: (experts, in, 2 * ff) gate_up_proj, (experts, ff, in) down_proj
        Spec("gpt_oss", "transformers", _tf("GptOssForCausalLM", "GptOssConfig", **llama, num_local_experts=2,
                                             num_experts_per_tok=1, head_dim=8, layer_types=["full_attention"]),
             _causal),
        Spec("llava", "transformers", _llava, _llava_inputs),
    ]
    return specs


def _llava():
    """LLaVA: a CLIP vision tower (8 px images, 4 px patches: 4 image tokens), a projector and a Llama."""
    import transformers

    vision = transformers.CLIPVisionConfig(hidden_size=H, intermediate_size=FF, num_hidden_layers=1,
                                           num_attention_heads=HEADS, image_size=8, patch_size=4, projection_dim=H)
    text = transformers.LlamaConfig(**LLAMA_LIKE, tie_word_embeddings=False)
    torch.manual_seed(0)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB - 1,
                                      vision_feature_layer=-1)
    return transformers.LlavaForConditionalGeneration(config).eval()


def _llava_inputs():
    image = torch.full((2, 4), VOCAB - 1)
    return {"input_ids": torch.cat([image, _ids(2, 3, vocab=VOCAB - 1)], 1),
            "pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))}


def _df(cls_name: str, **config):
    def build():
        import diffusers

        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = getattr(diffusers, cls_name)(**config)
        return model.eval()

    return build


UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=HEADS, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=False,
            axes_dims_rope=(2, 2, 4))
SD3 = dict(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=HEADS,
           caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=8, out_channels=4,
           pos_embed_max_size=16, dual_attention_layers=(0,))
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=8, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
           rope_max_seq_len=32)
QWEN_IMAGE = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8,
                  num_attention_heads=HEADS, joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
HUNYUAN_VIDEO = dict(in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=8, num_layers=1,
                     num_single_layers=1, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                     text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))


MORE_DIFFUSERS = (  # further transformers diffusers 0.42 builds cheaply: (name, class, config, pipeline)
    ("sana", "SanaTransformer2DModel", dict(in_channels=4, out_channels=4, num_attention_heads=HEADS,
                                            attention_head_dim=8,
                                            num_layers=1, num_cross_attention_heads=HEADS, cross_attention_head_dim=8,
                                            cross_attention_dim=16, caption_channels=16, mlp_ratio=2.0, sample_size=8,
                                            patch_size=1, norm_elementwise_affine=False), "SanaPipeline"),
    ("ltx_video", "LTXVideoTransformer3DModel", dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                                                     num_attention_heads=HEADS, attention_head_dim=8,
                                                     cross_attention_dim=16, num_layers=1, caption_channels=16),
     "LTXPipeline"),
    ("cogvideox", "CogVideoXTransformer3DModel", dict(num_attention_heads=HEADS, attention_head_dim=8, in_channels=4,
                                                      out_channels=4, time_embed_dim=16, text_embed_dim=16,
                                                      num_layers=1,
                                                      sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                                                      max_text_seq_length=8), "CogVideoXPipeline"),
    ("auraflow", "AuraFlowTransformer2DModel", dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                                    num_single_dit_layers=1, attention_head_dim=8,
                                                    num_attention_heads=HEADS, joint_attention_dim=16,
                                                    caption_projection_dim=16, out_channels=4, pos_embed_max_size=16),
     "AuraFlowPipeline"),
    ("pixart", "PixArtTransformer2DModel", dict(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                                num_attention_heads=HEADS, in_channels=4, out_channels=8,
                                                cross_attention_dim=16, caption_channels=16, norm_num_groups=2),
     "PixArtSigmaPipeline"),
    ("chroma", "ChromaTransformer2DModel", dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                                attention_head_dim=8, num_attention_heads=HEADS, joint_attention_dim=16,
                                                axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
                                                approximator_hidden_dim=16, approximator_layers=1), "ChromaPipeline"),
    ("lumina2", "Lumina2Transformer2DModel", dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=16,
                                                  num_layers=1, num_refiner_layers=1, num_attention_heads=HEADS,
                                                  num_kv_heads=1, multiple_of=8, cap_feat_dim=16,
                                                  axes_dim_rope=(2, 2, 4), axes_lens=(32, 32, 32)), "Lumina2Pipeline"),
    ("cogview4", "CogView4Transformer2DModel", dict(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                                    num_attention_heads=HEADS, out_channels=4, text_embed_dim=16,
                                                    time_embed_dim=16, condition_dim=4, pos_embed_max_size=16,
                                                    sample_size=8, rope_axes_dim=(4, 4)), "CogView4Pipeline"),
)


def _diffusers_specs() -> list[Spec]:
    models = (("unet", "UNet2DConditionModel", UNET, "StableDiffusionPipeline"),
              ("flux", "FluxTransformer2DModel", FLUX, "FluxPipeline"),
              ("sd3", "SD3Transformer2DModel", SD3, "StableDiffusion3Pipeline"),
              ("wan", "WanTransformer3DModel", WAN, "WanPipeline"),
              ("qwen_image", "QwenImageTransformer2DModel", QWEN_IMAGE, "QwenImagePipeline"),
              ("hunyuan_video", "HunyuanVideoTransformer3DModel", HUNYUAN_VIDEO, "HunyuanVideoPipeline"),
              *MORE_DIFFUSERS)
    return [Spec(name, "diffusers", _df(cls, **config), prefix="unet" if name == "unet" else "transformer",
                 pipeline=pipeline) for name, cls, config, pipeline in models]


SPECS = {s.name: s for s in _transformers_specs() + _diffusers_specs()}


def planted_rank2(shape: tuple[int, ...], g: torch.Generator, *, experts: bool = False) -> torch.Tensor:
    """A delta of ``shape`` whose (out, rest) flattening is exactly rank 2; ``experts`` (a fused 3-D MoE parameter,
    (experts, a, b)): rank 2 per expert."""
    if experts:
        return torch.stack([planted_rank2(shape[1:], g) for _ in range(shape[0])])
    out, rest = shape[0], int(torch.tensor(shape[1:]).prod())
    return (0.1 * torch.randn(out, RANK, generator=g) @ torch.randn(RANK, rest, generator=g)).reshape(shape)


def adaptable(model: torch.nn.Module) -> set[str]:
    """Names of the parameters a full fine-tune moves and a LoRA can carry: every module's ``weight`` of ndim >= 2
    (Linear, Embedding, Conv, transformers' Conv1D, an MoE router) and fused 3-D MoE expert parameters
    (``experts.gate_up_proj``). Raw parameters (a DiT's ``scale_shift_table``, positional tables) are not: a
    fine-tune that moves them has no exact adapter."""
    names = set()
    for prefix, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            if leaf == "weight" or (p.ndim == 3 and "experts" in prefix):
                names.add(f"{prefix}.{leaf}" if prefix else leaf)
    return names


@torch.no_grad()
def plant(model: torch.nn.Module, pattern: str, *, seed: int = 3) -> list[str]:
    """Move every floating LoRA-adaptable parameter (``adaptable``) of ndim >= 2 whose name matches ``pattern``
    by a rank-2 delta, in place (a tied weight once). Returns the names moved."""
    g = torch.Generator().manual_seed(seed)
    moved, allowed = [], adaptable(model)
    for name, p in model.named_parameters():  # named_parameters lists a tied tensor once
        if name in allowed and p.ndim >= 2 and p.dtype.is_floating_point and re.search(pattern, name):
            p += planted_rank2(tuple(p.shape), g, experts=p.ndim == 3 and not name.endswith("weight"))
            moved.append(name)
    return moved


def save_model(model: torch.nn.Module, folder):
    """``model.save_pretrained(folder)`` without its warnings; returns ``folder``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    return folder


def peft_folder(path, module: str, A: torch.Tensor, B: torch.Tensor):
    """A hand-made PEFT folder adapting one module (as another tool would write it)."""
    path.mkdir()
    save_file({f"base_model.model.{module}.lora_A.weight": A, f"base_model.model.{module}.lora_B.weight": B},
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": A.shape[0],
                                                          "lora_alpha": A.shape[0], "target_modules": [module]}))
    return path

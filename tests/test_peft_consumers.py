"""Real consumers: PEFT loads every PEFT adapter we write (tiny BERT, untied Llama, a conv/embedding model) with no
missing or unexpected keys, and computes the outputs of the hand-merged weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lowrank_tools.extract import extract  # noqa: E402
from lowrank_tools.io.formats import load_adapter, save_adapter  # noqa: E402
from lowrank_tools.linalg import RankRule  # noqa: E402


def perturbed(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A tuned state dict: every weight of ndim >= 2 moved by a rank-2 delta, 1-D tensors untouched."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        if t.ndim >= 2 and t.dtype.is_floating_point:
            m = t.reshape(t.shape[0], -1)
            d = 0.05 * torch.randn(m.shape[0], 2, generator=g) @ torch.randn(2, m.shape[1], generator=g)
            t = t + d.reshape(t.shape)
        out[name] = t.clone()
    return out


def load_with_peft(make_model, base_state, adapter_dir) -> nn.Module:
    """PEFT loads the adapter onto a fresh base: all of its keys used, none missing."""
    model = make_model()
    model.load_state_dict(base_state)
    config = peft.PeftConfig.from_pretrained(adapter_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, config)
    outcome = peft.set_peft_model_state_dict(wrapped, peft.utils.load_peft_weights(str(adapter_dir)))
    assert outcome.unexpected_keys == []
    assert [k for k in outcome.missing_keys if "lora_" in k or "modules_to_save" in k] == []
    return wrapped.eval()


def hand_merged(make_model, base_state, adapter) -> nn.Module:
    model = make_model()
    state = {k: v.clone() for k, v in base_state.items()}
    for name, m in adapter.modules.items():
        state[f"{name}.weight"] += m.delta()
    state.update(adapter.full_tensors)
    model.load_state_dict(state)
    return model.eval()


def check(make_model, base_state, tuned_state, tmp_path, inputs, **options):
    result = extract(base_state, tuned_state, rule=RankRule(rank=2), method="exact", **options)
    save_adapter(result.adapter, tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        got = load_with_peft(make_model, base_state, tmp_path / "adapter")(**inputs)
        want = hand_merged(make_model, base_state, adapter)(**inputs)
        base_out = hand_merged(make_model, base_state, type(adapter)())(**inputs)
    got, want, base_out = (o if isinstance(o, torch.Tensor) else o[0] for o in (got, want, base_out))
    assert (want - base_out).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    return result.adapter


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=24, type_vocab_size=2)
    return transformers.BertModel(config).eval()


def test_bert_embeddings_and_layernorm_saved_whole(tmp_path):
    base = tiny_bert().state_dict()
    tuned = perturbed(tiny_bert(), seed=1)
    tuned["embeddings.LayerNorm.weight"] = tuned["embeddings.LayerNorm.weight"] * 1.5
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    adapter = check(tiny_bert, base, tuned, tmp_path, {"input_ids": ids, "token_type_ids": (ids % 2)},
                    full_modules=[r"embeddings\.LayerNorm"])
    kinds = {n: m.kind.value for n, m in adapter.modules.items()}
    assert kinds["embeddings.word_embeddings"] == kinds["embeddings.token_type_embeddings"] == "embedding"
    assert set(adapter.full_tensors) == {"embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"}


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=40, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def test_untied_llama_embedding_lora_and_head_saved_whole(tmp_path):
    base = tiny_llama().state_dict()
    tuned = perturbed(tiny_llama(), seed=3)
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(4))
    adapter = check(tiny_llama, base, tuned, tmp_path, {"input_ids": ids}, full_modules=["lm_head"])
    assert adapter.modules["model.embed_tokens"].kind.value == "embedding"
    assert list(adapter.full_tensors) == ["lm_head.weight"] and "lm_head" not in adapter.modules


class ConvNet(nn.Module):
    """Every layer kind a PEFT LoRA can adapt: embedding, Conv1d, kxk and 1x1 Conv2d, linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(30, 8)
        self.conv1d = nn.Conv1d(8, 6, kernel_size=3, padding=1)
        self.conv = nn.Conv2d(6, 5, kernel_size=3, padding=1)
        self.pointwise = nn.Conv2d(5, 4, kernel_size=1)
        self.head = nn.Linear(4 * 3, 7)

    def forward(self, ids):
        x = self.conv1d(self.embed(ids).transpose(1, 2))  # (b, 6, L)
        x = self.pointwise(self.conv(x.unsqueeze(-1).expand(-1, -1, -1, 3)))  # (b, 4, L, 3)
        return self.head(x.mean(2).flatten(1))


def test_conv_and_embedding_layers(tmp_path):
    base = ConvNet().state_dict()
    tuned = perturbed(ConvNet(), seed=5)
    ids = torch.randint(0, 30, (3, 6), generator=torch.Generator().manual_seed(6))
    adapter = check(ConvNet, base, tuned, tmp_path, {"ids": ids})
    assert {n: m.kind.value for n, m in adapter.modules.items()} == {
        "embed": "embedding", "conv1d": "conv", "conv": "conv", "pointwise": "conv", "head": "linear"}
    weights = peft.utils.load_peft_weights(str(tmp_path / "adapter"))
    assert weights["base_model.model.conv.lora_A.weight"].shape == (2, 6, 3, 3)  # (r, in, kh, kw)
    assert weights["base_model.model.conv.lora_B.weight"].shape == (5, 2, 1, 1)  # (out, r, 1, 1)
    assert weights["base_model.model.conv1d.lora_A.weight"].shape == (2, 8, 3)
    assert weights["base_model.model.embed.lora_embedding_A"].shape == (2, 30)  # (r, vocab)
    assert weights["base_model.model.embed.lora_embedding_B"].shape == (8, 2)  # (dim, r)


class Nested(nn.Module):
    """``proj`` is also the dotted tail of ``block.proj``: PEFT's rank_pattern key for one must not match the other."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)
        self.block = nn.ModuleDict({"proj": nn.Linear(8, 8)})

    def forward(self, x):
        return self.block["proj"](self.proj(x))


def test_pattern_keys_of_nested_names(tmp_path):
    from lowrank_tools.adapter import Adapter, LoraModule

    g = torch.Generator().manual_seed(0)
    adapter = Adapter(modules={
        "proj": LoraModule(B=torch.randn(8, 1, generator=g), A=torch.randn(1, 8, generator=g), alpha=3.0),
        "block.proj": LoraModule(B=torch.randn(8, 3, generator=g), A=torch.randn(3, 8, generator=g), alpha=1.0),
    })
    save_adapter(adapter, tmp_path / "adapter")
    x = torch.randn(4, 8, generator=g)
    with torch.no_grad():
        got = load_with_peft(Nested, Nested().state_dict(), tmp_path / "adapter")(x)
        assert torch.allclose(got, hand_merged(Nested, Nested().state_dict(), adapter)(x), atol=1e-5)

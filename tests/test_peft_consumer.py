"""A real consumer: PEFT loads what extract writes onto a tiny transformers Llama and computes the same outputs."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lowrank_tools.extract import extract  # noqa: E402
from lowrank_tools.io.formats import load_adapter, save_adapter  # noqa: E402
from lowrank_tools.linalg import RankRule  # noqa: E402


def tiny_llama(seed: int = 0, tie: bool = False):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                                      tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def fine_tuned_copy(model, steps: int = 20, seed: int = 1):
    """Fine-tune every weight for a few real steps (a genuine delta, not a planted one)."""
    tuned = tiny_llama(tie=model.config.tie_word_embeddings)
    tuned.load_state_dict(model.state_dict())
    tuned.train()
    g = torch.Generator().manual_seed(seed)
    # norms stay frozen: 1-D tensors are never in an adapter, so at full rank base + adapter == tuned
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.ndim >= 2], lr=0.5)
    for _ in range(steps):
        ids = torch.randint(0, 96, (4, 12), generator=g)
        loss = tuned(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tuned.eval()


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama()
    tuned = fine_tuned_copy(base)
    base.save_pretrained(root / "base")
    tuned.save_pretrained(root / "tuned")
    return root, base, tuned


def _load_peft(base_dir, adapter_dir):
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    problems = [str(w.message) for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    return peft_model, problems


def _hand_merged(base_dir, adapter):
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in adapter.modules.items():
            params[f"{name}.weight"] += m.delta()
    return model


@pytest.mark.parametrize("rank", [4, 64])
def test_peft_loads_extracted_adapter_and_matches(llama_pair, rank, tmp_path):
    root, base, tuned = llama_pair
    result = extract(root / "base", root / "tuned", rule=RankRule(rank=rank))
    save_adapter(result.adapter, tmp_path / "adapter")
    peft_model, problems = _load_peft(root / "base", tmp_path / "adapter")
    assert problems == []
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
        want = _hand_merged(root / "base", load_adapter(tmp_path / "adapter"))(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
        if rank >= 64:  # full rank: base + adapter is the fine-tuned model
            assert torch.allclose(got, tuned(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_peft_state_dict_keys_all_consumed(llama_pair, tmp_path):
    root, _, _ = llama_pair
    result = extract(root / "base", root / "tuned", rule=RankRule(rank=4), exclude=["embed_tokens"])
    save_adapter(result.adapter, tmp_path / "adapter")
    model = transformers.LlamaForCausalLM.from_pretrained(root / "base")
    config = peft.PeftConfig.from_pretrained(tmp_path / "adapter")
    peft_model = peft.get_peft_model(model, config)
    weights = peft.utils.load_peft_weights(str(tmp_path / "adapter"))
    outcome = peft.set_peft_model_state_dict(peft_model, weights)
    assert outcome.unexpected_keys == []
    lora_missing = [k for k in outcome.missing_keys if "lora_" in k]
    assert lora_missing == []

"""Tied input/output embeddings end to end: a tiny tied Llama, fine-tuned for real, through PEFT."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lowrank_tools.errors import ShapeMismatch  # noqa: E402
from lowrank_tools.extract import extract  # noqa: E402
from lowrank_tools.io.formats import load_adapter, save_adapter  # noqa: E402
from lowrank_tools.linalg import RankRule  # noqa: E402

VOCAB = 64


def tiny_llama(*, tie: bool, vocab: int = VOCAB, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=32,
                                      tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def fine_tune(model, *, steps: int = 8, vocab: int = VOCAB):
    """Real SGD steps on every 2-D weight (norms frozen: 1-D tensors are never in an adapter)."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.ndim >= 2], lr=1.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (4, 10), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def tied_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    base = tiny_llama(tie=True)
    base.save_pretrained(root / "base")
    tuned = fine_tune(tiny_llama(tie=True))
    assert tuned.lm_head.weight is tuned.model.embed_tokens.weight
    tuned.save_pretrained(root / "tuned")
    return root, tuned


def _peft(base_dir, adapter_dir):
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
    config = peft.PeftConfig.from_pretrained(adapter_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that tied layers are targeted: that is the point here
        wrapped = peft.get_peft_model(model, config)
        outcome = peft.set_peft_model_state_dict(wrapped, peft.utils.load_peft_weights(str(adapter_dir)))
        loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base_dir), adapter_dir)
    assert outcome.unexpected_keys == []
    assert [k for k in outcome.missing_keys if "lora_" in k or "modules_to_save" in k] == []
    return loaded.eval()


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))


def test_checkpoint_has_no_head_and_config_ties(tied_pair):
    root, _ = tied_pair
    assert json.loads((root / "tuned" / "config.json").read_text())["tie_word_embeddings"] is True
    from lowrank_tools.io.checkpoint import open_checkpoint
    assert "lm_head.weight" not in open_checkpoint(root / "tuned")


def test_full_rank_tied_adapter_reproduces_fine_tune(tied_pair, tmp_path):
    root, tuned = tied_pair
    result = extract(root / "base", root / "tuned", rule=RankRule(rank=64))
    adapter = result.adapter
    assert adapter.modules["model.embed_tokens"].kind.value == "embedding"
    assert adapter.modules["lm_head"].kind.value == "linear"
    save_adapter(adapter, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert {"model.embed_tokens", "lm_head"} <= set(config["target_modules"])
    with torch.no_grad():
        got = _peft(root / "base", tmp_path / "a")(input_ids=IDS).logits
        want = tuned(input_ids=IDS).logits
        base_out = transformers.LlamaForCausalLM.from_pretrained(root / "base").eval()(input_ids=IDS).logits
    assert (want - base_out).abs().max() > 1e-2  # the fine-tune changed the outputs
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_one_side_alone_loses_the_fine_tune(tied_pair, tmp_path):
    """Why both sides: the embedding's LoRA alone leaves the output projection at W0."""
    root, tuned = tied_pair
    adapter = extract(root / "base", root / "tuned", rule=RankRule(rank=64)).adapter
    del adapter.modules["lm_head"]
    save_adapter(adapter, tmp_path / "one-sided")
    with torch.no_grad():
        got = _peft(root / "base", tmp_path / "one-sided")(input_ids=IDS).logits
    assert (got - tuned(input_ids=IDS).logits).abs().max() > 1e-2


def test_low_rank_tied_adapter_matches_hand_merged(tied_pair, tmp_path):
    root, _ = tied_pair
    save_adapter(extract(root / "base", root / "tuned", rule=RankRule(rank=3)).adapter, tmp_path / "a")
    adapter = load_adapter(tmp_path / "a")
    untied = tiny_llama(tie=False)  # hand merge on untied weights: each side gets its own delta once
    state = transformers.LlamaForCausalLM.from_pretrained(root / "base").state_dict()
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    untied.load_state_dict(state)
    params = dict(untied.named_parameters())
    with torch.no_grad():
        for name, m in adapter.modules.items():
            params[f"{name}.weight"] += m.delta()
        got = _peft(root / "base", tmp_path / "a")(input_ids=IDS).logits
        assert torch.allclose(got, untied(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)


def test_grown_vocabulary_saved_whole_loads_in_peft(tmp_path):
    base = tiny_llama(tie=True)
    base.save_pretrained(tmp_path / "base")
    tuned = tiny_llama(tie=True)
    tuned.resize_token_embeddings(VOCAB + 4)  # new tokens, then a real fine-tune over the grown vocabulary
    fine_tune(tuned, vocab=VOCAB + 4)
    tuned.save_pretrained(tmp_path / "tuned")
    with pytest.raises(ShapeMismatch, match=r"model\.embed_tokens\.weight changed shape"):
        extract(tmp_path / "base", tmp_path / "tuned", rule=RankRule(rank=64))
    result = extract(tmp_path / "base", tmp_path / "tuned", rule=RankRule(rank=64), full_modules=["embed_tokens"])
    assert set(result.adapter.full_tensors) == {"model.embed_tokens.weight", "lm_head.weight"}
    save_adapter(result.adapter, tmp_path / "a")
    grown = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    grown.resize_token_embeddings(VOCAB + 4)  # the user resizes the base first, as with any new-token adapter
    grown.save_pretrained(tmp_path / "base-grown")
    ids = torch.randint(0, VOCAB + 4, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = _peft(tmp_path / "base-grown", tmp_path / "a")(input_ids=ids).logits
        assert torch.allclose(got, tuned(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

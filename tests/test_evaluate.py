"""evaluate: behaviour kept by base + adapter, on tiny real transformers models with answers known in advance."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from lowrank_tools.adapter import Adapter  # noqa: E402
from lowrank_tools.cli import main  # noqa: E402
from lowrank_tools.errors import AdapterMismatch, DataError, InvalidOption, MissingExtra, NotACheckpoint  # noqa: E402
from lowrank_tools.evaluate import evaluate, read_texts  # noqa: E402
from lowrank_tools.io.models import require_transformers  # noqa: E402
from lowrank_tools.evaluate.patch import applied, plan_patch  # noqa: E402
from lowrank_tools.extract import extract  # noqa: E402
from lowrank_tools.io.formats import load_adapter, save_adapter  # noqa: E402
from lowrank_tools.linalg import RankRule  # noqa: E402

VOCAB = 64
WORDS = [f"w{i}" for i in range(40)]


def make_texts(n: int = 24, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 14, (n,), generator=g)  # some one-word texts: one token, no next-token position
    return [" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (int(k),), generator=g)) for k in lengths]


def make_tokenizer(texts):
    """A word-level tokenizer trained offline on the texts, wrapped as transformers' fast tokenizer."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts + [" ".join(WORDS)],
                            tokenizers.trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def _llama(tie: bool):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                      tie_word_embeddings=tie, architectures=["LlamaForCausalLM"])
    return transformers.LlamaForCausalLM(config)


def _save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def causal_pair(root, *, tie: bool = False, steps: int = 12):
    """Base and a real fine-tune (SGD steps on the texts; norms frozen so a full-rank adapter is exact)."""
    texts = make_texts(48, seed=1)
    tokenizer = make_tokenizer(texts)
    torch.manual_seed(0)
    base = _llama(tie)
    tuned = _llama(tie)
    tuned.load_state_dict(base.state_dict())
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.ndim >= 2], lr=0.5)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    for _ in range(steps):
        loss = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _save(base.eval(), tokenizer, root / "base"), _save(tuned.eval(), tokenizer, root / "tuned")


def pair_with_texts(root) -> dict:
    """causal_pair in ``root`` and its texts (also as ``root / "texts.txt"``): for the other evaluate test files."""
    base, tuned = causal_pair(root)
    (root / "texts.txt").write_text("\n".join(make_texts()) + "\n")
    return {"root": root, "base": base, "tuned": tuned, "texts": make_texts()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_llama")
    base, tuned = causal_pair(root)
    full = extract(base, tuned, rule=RankRule(rank=64)).adapter  # rank >= every side: the exact delta
    low = extract(base, tuned, rule=RankRule(rank=2)).adapter
    save_adapter(low, root / "low_peft")
    linear = Adapter(modules={n: m for n, m in low.modules.items() if m.kind.value == "linear"})
    save_adapter(linear, root / "low.safetensors", format="kohya")  # kohya files hold no embeddings
    (root / "texts.txt").write_text("\n".join(make_texts()) + "\n")
    return {"root": root, "base": base, "tuned": tuned, "full": full, "low": low, "linear": linear,
            "texts": make_texts()}


def _hand_causal(base_dir, tuned_dir, texts, model=None):
    """Mean KL(tuned || model), top-1 agreement and loss, each text alone (no padding), float64."""
    tok = transformers.AutoTokenizer.from_pretrained(tuned_dir)
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tuned_dir).eval()
    model = model if model is not None else transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    kl = agree = nll = n = 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text, truncation=True, max_length=128)["input_ids"]])
            if ids.shape[1] < 2:
                continue
            lt = torch.log_softmax(tuned(input_ids=ids).logits[0, :-1].double(), -1)
            lm = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            kl += float((lt.exp() * (lt - lm)).sum())
            agree += int((lt.argmax(-1) == lm.argmax(-1)).sum())
            nll -= float(lm.gather(1, ids[0, 1:, None]).sum())
            n += ids.shape[1] - 1
    return kl / n, agree / n, nll / n, n


# ------------------------------------------------------------------------------------------ known answers


def test_full_rank_adapter_recovers_all_and_empty_adapter_none(llama):
    ev = evaluate(llama["base"], llama["tuned"], [("full", llama["full"]), ("empty", Adapter())],
                  texts=llama["texts"], batch_size=4, device="cpu")
    full, empty = ev.adapters
    assert ev.kind.value == "causal" and ev.base.kl > 1e-3
    assert full.kl_recovered == pytest.approx(1.0, abs=1e-6)
    assert full.top1_agreement == 1.0 and full.loss == pytest.approx(ev.tuned_loss, rel=1e-5)
    assert empty.kl_recovered == 0.0 and empty.kl == ev.base.kl and empty.params == 0
    assert ev.skipped > 0 and ev.samples + ev.skipped == len(llama["texts"])  # one-word texts: nothing to predict


def test_kl_top1_and_loss_match_a_hand_computation(llama):
    ev = evaluate(llama["base"], llama["tuned"], [], texts=llama["texts"], batch_size=3, device="cpu")
    kl, agree, nll, n = _hand_causal(llama["base"], llama["tuned"], llama["texts"])
    assert ev.tokens == n
    assert ev.base.kl == pytest.approx(kl, rel=1e-5)
    assert ev.base.top1_agreement == pytest.approx(agree)
    assert ev.base.loss == pytest.approx(nll, rel=1e-6)


def test_padding_does_not_change_the_numbers(llama):
    runs = [evaluate(llama["base"], llama["tuned"], [("low", llama["low"])], texts=llama["texts"], batch_size=b,
                     device="cpu") for b in (1, 4)]
    one, four = (r.adapters[0] for r in runs)
    assert runs[0].tokens == runs[1].tokens
    assert four.kl == pytest.approx(one.kl, rel=1e-5) and four.loss == pytest.approx(one.loss, rel=1e-6)
    assert four.top1_agreement == one.top1_agreement
    assert runs[1].base.kl == pytest.approx(runs[0].base.kl, rel=1e-5)


def test_agrees_with_peft_loaded_outputs(llama):
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(llama["base"]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(base, llama["root"] / "low_peft").eval()
    kl, agree, nll, _ = _hand_causal(llama["base"], llama["tuned"], llama["texts"], model=peft_model)
    ev = evaluate(llama["base"], llama["tuned"], [("peft", load_adapter(llama["root"] / "low_peft"))],
                  texts=llama["texts"], batch_size=4, device="cpu")
    ours = ev.adapters[0]
    assert 0.05 < ours.kl_recovered < 0.999  # a rank-2 adapter keeps some, not all
    assert ours.kl == pytest.approx(kl, rel=1e-4) and ours.loss == pytest.approx(nll, rel=1e-5)
    assert ours.top1_agreement == pytest.approx(agree, abs=1.5 / ev.tokens)


def test_in_memory_apply_matches_peft_logits_and_restores_weights_bit_for_bit(llama):
    peft = pytest.importorskip("peft")
    ours = transformers.AutoModelForCausalLM.from_pretrained(llama["base"]).eval()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(llama["base"]),
                                                llama["root"] / "low_peft").eval()
    ids = torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with applied(ours, plan_patch(ours, load_adapter(llama["root"] / "low_peft"), "low")):
            got = ours(input_ids=ids).logits
        want = theirs(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    after = ours.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_kohya_file_gives_the_in_memory_numbers(llama):
    adapters = [("memory", llama["linear"]),
                ("kohya", load_adapter(llama["root"] / "low.safetensors", base=llama["base"]))]
    ev = evaluate(llama["base"], llama["tuned"], adapters, texts=llama["texts"], device="cpu")
    assert ev.adapters[1].kl == pytest.approx(ev.adapters[0].kl, rel=1e-6)


def test_tied_embeddings_take_the_delta_once(tmp_path):
    base, tuned = causal_pair(tmp_path, tie=True, steps=6)
    full = extract(base, tuned, rule=RankRule(rank=64)).adapter
    assert any(n.endswith("lm_head") for n in full.modules)  # extract carries the tie on both sides
    ev = evaluate(base, tuned, [("full", full)], texts=make_texts(), device="cpu")
    assert ev.adapters[0].kl_recovered == pytest.approx(1.0, abs=1e-6)


def test_base_equal_to_tuned_gives_null_ratios(llama, tmp_path):
    ev = evaluate(llama["tuned"], llama["tuned"], [("empty", Adapter())], texts=llama["texts"], device="cpu")
    assert ev.base.kl == 0.0 and ev.adapters[0].kl_recovered is None
    out = tmp_path / "e.json"
    assert CliRunner().invoke(main, ["evaluate", str(llama["tuned"]), str(llama["tuned"]),
                                     str(llama["root"] / "low_peft"), "--data", str(llama["root"] / "texts.txt"),
                                     "--device", "cpu", "--json", str(out), "-q"]).exit_code == 0
    data = json.loads(out.read_text())
    assert data["base_kl"] == 0.0 and data["adapters"][0]["kl_recovered"] is None


def test_adapter_for_another_model_is_one_line(llama):
    stranger = Adapter(modules={"model.layers.9.mlp.up_proj": next(iter(llama["low"].modules.values()))})
    with pytest.raises(AdapterMismatch, match=r"module model\.layers\.9\.mlp\.up_proj is not in the model"):
        evaluate(llama["base"], llama["tuned"], [("x", stranger)], texts=llama["texts"], device="cpu")


# ------------------------------------------------------------------------------------------ encoders


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BertModel and a 'fine-tune' with planted rank-3 deltas on attention and MLP weights."""
    root = tmp_path_factory.mktemp("evaluate_bert")
    texts = make_texts(32, seed=2)
    tokenizer = make_tokenizer(texts)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, architectures=["BertModel"])
    torch.manual_seed(0)
    base = transformers.BertModel(config).eval()
    tuned = transformers.BertModel(config).eval()
    tuned.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.ndim == 2 and "embeddings" not in name:
                p.add_(0.05 * torch.randn(p.shape[0], 3, generator=g) @ torch.randn(3, p.shape[1], generator=g) / 3)
    return _save(base, tokenizer, root / "base"), _save(tuned, tokenizer, root / "tuned"), texts


def test_encoder_full_delta_recovers_all_and_empty_none(bert):
    base, tuned, texts = bert
    full = extract(base, tuned, rule=RankRule(rank=64)).adapter
    low = extract(base, tuned, rule=RankRule(rank=2)).adapter
    ev = evaluate(base, tuned, [("full", full), ("low", low), ("empty", Adapter())], texts=texts, batch_size=4,
                  device="cpu")
    full_s, low_s, empty_s = ev.adapters
    assert ev.kind.value == "encoder" and ev.base.cosine < 0.999
    assert full_s.recovered == pytest.approx(1.0, abs=1e-6) and full_s.rel_l2_error < 1e-5
    assert 0 < low_s.recovered < 1
    assert empty_s.recovered == 0.0 and empty_s.cosine == ev.base.cosine
    assert full_s.kl is None and ev.tuned_loss is None
    one = evaluate(base, tuned, [("low", low)], texts=texts, batch_size=1, device="cpu").adapters[0]
    assert one.cosine == pytest.approx(low_s.cosine, abs=1e-9) and one.recovered == pytest.approx(low_s.recovered,
                                                                                                 rel=1e-5)


# ------------------------------------------------------------------------------------------ command line


def test_cli_adapters_json_keys_and_table(llama, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["evaluate", str(llama["base"]), str(llama["tuned"]),
                                       str(llama["root"] / "low_peft"), "--data", str(llama["root"] / "texts.txt"),
                                       "--device", "cpu", "--batch-size", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert {"kind", "samples", "tokens", "tuned_loss", "base_loss", "base_kl"} <= set(data)
    row = data["adapters"][0]
    assert {"path", "params", "kl", "kl_recovered", "top1_agreement", "loss"} <= set(row)
    assert row["path"] == str(llama["root"] / "low_peft") and row["params"] == llama["low"].params
    assert "recovered" in result.output and "low_peft" in result.output


def test_cli_rank_curve_marks_levels_and_plots(llama, tmp_path):
    pytest.importorskip("matplotlib")
    out, plots = tmp_path / "curve.json", tmp_path / "plots"
    result = CliRunner().invoke(main, ["evaluate", str(llama["base"]), str(llama["tuned"]), "--ranks", "1,2,64",
                                       "--budgets", "3000", "--data", str(llama["root"] / "texts.txt"),
                                       "--device", "cpu", "--json", str(out), "--plot", str(plots), "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    by_rank = {a["size"]["rank"]: a for a in data["adapters"] if "rank" in a.get("size", {})}
    assert by_rank[64]["kl_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert by_rank[1]["params"] < by_rank[2]["params"] < by_rank[64]["params"]
    assert data["reached"]["rank"]["0.99"] == "rank 64"
    assert (plots / "recovered_vs_params.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_curve_and_adapters_are_exclusive(llama):
    result = CliRunner().invoke(main, ["evaluate", str(llama["base"]), str(llama["tuned"]),
                                       str(llama["root"] / "low_peft"), "--ranks", "4",
                                       "--data", str(llama["root"] / "texts.txt")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ data and extras


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "\n  \n", r"empty\.txt:1: no sample"),
    ("bad.jsonl", '{"text": "a b"}\n{oops\n', r"bad\.jsonl:2: not a JSON object"),
    ("field.jsonl", '{"body": "a b"}\n', r"field\.jsonl:1: no field 'text' \(found: body\)"),
    ("notstr.jsonl", '{"text": 3}\n', r"notstr\.jsonl:1: field 'text' is int"),
    ("dict.json", '{"text": "a"}', r"dict\.json:1: a JSON dict, expected a list of strings"),
    ("items.json", '["a", 3]', r"items\.json: item 1 of the list is int"),
    ("broken.json", '[\n"a",\n', r"broken\.json:3: not valid JSON"),
])
def test_bad_data_files_are_one_line_naming_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_texts(path)
    assert "\n" not in str(info.value)


def test_data_formats_and_options(tmp_path):
    (tmp_path / "a.txt").write_text("one two\n\nthree\n")
    (tmp_path / "b.jsonl").write_text('{"body": "x y"}\n\n{"body": "z"}\n')
    (tmp_path / "c.json").write_text('["p q", "", "r"]')
    (tmp_path / "a.csv").write_text("x\n")
    assert read_texts(tmp_path / "a.txt") == ["one two", "three"]
    assert read_texts(tmp_path / "b.jsonl", text_field="body", max_samples=1) == ["x y"]
    assert read_texts(tmp_path / "c.json") == ["p q", "r"]
    with pytest.raises(InvalidOption, match="unknown suffix"):
        read_texts(tmp_path / "a.csv")
    with pytest.raises(InvalidOption, match="--text-field applies to .jsonl"):
        read_texts(tmp_path / "a.txt", text_field="body")


def test_bad_data_through_the_cli_exits_1_with_one_line(llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n[1]\n')
    result = CliRunner().invoke(main, ["evaluate", str(llama["base"]), str(llama["tuned"]),
                                       str(llama["root"] / "low_peft"), "--data", str(bad)])
    assert result.exit_code == 1 and "bad.jsonl:2:" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_extra_names_it(monkeypatch, llama):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(MissingExtra, match=r"lowrank-tools\[eval\]"):
        require_transformers()
    result = CliRunner().invoke(main, ["evaluate", str(llama["base"]), str(llama["tuned"]),
                                       str(llama["root"] / "low_peft"), "--data", str(llama["root"] / "texts.txt")])
    assert result.exit_code == 2 and "lowrank-tools[eval]" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_diffusers_folder_against_a_transformers_model_is_refused(tmp_path, llama):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(NotACheckpoint, match="diffusers pipeline without unet/config.json"):
        evaluate(tmp_path / "pipe", llama["tuned"], [], texts=["w1 w2"], device="cpu")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(InvalidOption, match="diffusers UNet2DConditionModel but tuned .* transformers model"):
        evaluate(tmp_path / "unet", llama["tuned"], [], texts=["w1 w2"], device="cpu")


def test_blocks_of_positions_and_truncation_give_the_same_numbers(llama, monkeypatch):
    from lowrank_tools.evaluate import metrics

    whole = evaluate(llama["base"], llama["tuned"], [("low", llama["low"])], texts=llama["texts"], max_length=5,
                     device="cpu")
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 3 * VOCAB)  # three positions per float64 block
    blocks = evaluate(llama["base"], llama["tuned"], [("low", llama["low"])], texts=llama["texts"], max_length=5,
                      device="cpu")
    tok = transformers.AutoTokenizer.from_pretrained(llama["tuned"])
    lengths = [len(tok(t)["input_ids"]) for t in llama["texts"]]
    assert whole.tokens == sum(min(n, 5) - 1 for n in lengths if n >= 2)
    assert blocks.adapters[0].kl == pytest.approx(whole.adapters[0].kl, rel=1e-12)
    assert blocks.base.loss == pytest.approx(whole.base.loss, rel=1e-12)
    assert blocks.adapters[0].top1_agreement == whole.adapters[0].top1_agreement


def test_head_checkpoint_names_map_onto_the_base_model():
    """A BertForMaskedLM adapter (``bert.`` names, ``cls.`` head) on the BertModel that AutoModel loads."""
    from lowrank_tools.adapter import LoraModule

    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)
    model = transformers.BertModel(config)
    module = LoraModule(B=torch.ones(32, 1), A=torch.ones(1, 32), alpha=1.0)
    adapter = Adapter(modules={"bert.encoder.layer.0.attention.self.query": module,
                               "cls.predictions.transform.dense": module})
    patch = plan_patch(model, adapter, "mlm", skip_heads=True)
    assert list(patch.terms) == ["encoder.layer.0.attention.self.query.weight"]
    assert patch.outside == ["cls.predictions.transform.dense"]
    with pytest.raises(AdapterMismatch, match="cls.predictions.transform.dense is not in the model"):
        plan_patch(model, adapter, "mlm")

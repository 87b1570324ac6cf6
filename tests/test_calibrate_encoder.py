"""calibrate on an encoder whose files carry base_model_prefix (BertForMaskedLM: ``bert.encoder...``) while the
model runs as AutoModel (``encoder...``): the statistics take the checkpoint's names, so extract finds them."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_evaluate import make_texts, make_tokenizer  # noqa: E402

from lowrank_tools.calibrate import calibrate  # noqa: E402
from lowrank_tools.extract import extract  # noqa: E402
from lowrank_tools.io.calibration import write_calibration  # noqa: E402
from lowrank_tools.linalg import RankRule  # noqa: E402


def _save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("head", [True, False])
def test_statistics_carry_the_checkpoint_names(tmp_path, head):
    texts = make_texts(8, seed=4)
    tokenizer = make_tokenizer(texts)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=24, max_position_embeddings=64)
    torch.manual_seed(0)
    model = (transformers.BertForMaskedLM if head else transformers.BertModel)(config).eval()
    base = _save(model, tokenizer, tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tuned = _save(model, tokenizer, tmp_path / "tuned")
    result = calibrate(base, texts=texts, max_length=16, batch_size=4, device="cpu")
    names = {m for s in result.stats for m in s.modules}
    prefix = "bert." if head else ""
    assert f"{prefix}encoder.layer.0.attention.self.query" in names
    assert all(n.startswith(prefix) for n in names)
    write_calibration(tmp_path / "stats.safetensors", result.stats)
    out = extract(base, tuned, rule=RankRule(rank=2), calibration=tmp_path / "stats.safetensors")
    whitened = {r.name for r in out.report.layers if r.extra.get("whitened")}
    assert f"{prefix}encoder.layer.0.attention.self.query" in whitened
    assert f"{prefix}encoder.layer.0.output.dense" in whitened

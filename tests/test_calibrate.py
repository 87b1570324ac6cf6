"""calibrate and its statistics file: X^T X per distinct Linear input, on a tiny real Llama."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_evaluate import causal_pair, make_texts  # noqa: E402

from lowrank_tools.calibrate import calibrate  # noqa: E402
from lowrank_tools.cli import main  # noqa: E402
from lowrank_tools.errors import CorruptCheckpoint, NotACheckpoint  # noqa: E402
from lowrank_tools.io.atomic import write_safetensors  # noqa: E402
from lowrank_tools.io.calibration import InputStats, read_calibration, write_calibration  # noqa: E402

LAYER = "model.layers.0.self_attn"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    base, tuned = causal_pair(root, steps=4)
    texts = make_texts(10, seed=3)
    (root / "texts.txt").write_text("\n".join(texts) + "\n")
    return {"root": root, "base": base, "tuned": tuned, "texts": texts}


def _by_hand(folder, texts, module: str) -> tuple[torch.Tensor, int]:
    """sum x^T x of ``module``'s inputs, one text at a time (no padding at all)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    seen = []
    model.get_submodule(module).register_forward_hook(lambda m, a, o: seen.append(a[0][0].double()))
    with torch.no_grad():
        for t in texts:
            model(input_ids=torch.tensor([tok(t, truncation=True, max_length=128)["input_ids"]]))
    X = torch.cat(seen)  # (tokens, in)
    return X.T @ X, X.shape[0]


def test_statistics_are_the_sums_by_hand_and_padding_free(pair):
    one = calibrate(pair["base"], texts=pair["texts"], batch_size=1, device="cpu")
    four = calibrate(pair["base"], texts=pair["texts"], batch_size=4, device="cpu")
    by_key = {s.modules[0]: s for s in one.stats}
    for module in (f"{LAYER}.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        xtx, tokens = _by_hand(pair["base"], pair["texts"], module)
        torch.testing.assert_close(by_key[module].xtx, xtx, rtol=1e-5, atol=1e-6)
        assert by_key[module].tokens == tokens == one.tokens
    for a, b in zip(one.stats, four.stats):  # padding is never summed: batch 1 and 4 agree (float32 forward
        assert a.modules == b.modules and a.tokens == b.tokens  # passes differ in their last bits with padding)
        torch.testing.assert_close(a.xtx, b.xtx, rtol=1e-4, atol=1e-5 * float(a.xtx.abs().max()))
    assert one.unmasked == []


def test_modules_reading_one_input_share_one_matrix(pair):
    stats = calibrate(pair["base"], texts=pair["texts"][:3], device="cpu").stats
    groups = {s.modules[0]: s.modules for s in stats}
    assert groups[f"{LAYER}.q_proj"] == (f"{LAYER}.q_proj", f"{LAYER}.k_proj", f"{LAYER}.v_proj")
    assert groups["model.layers.0.mlp.gate_proj"] == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert groups[f"{LAYER}.o_proj"] == (f"{LAYER}.o_proj",)
    assert len(stats) == 2 * 4 + 1  # per block: qkv, o, gate/up, down; and lm_head
    assert stats[0].xtx.dtype == torch.float64 and stats[0].xtx.shape == (32, 32)


def test_file_round_trip_and_bad_files(tmp_path):
    stats = [InputStats(("a.q", "a.k"), torch.eye(3, dtype=torch.float64) * 2, 7),
             InputStats(("b",), torch.ones(2, 2, dtype=torch.float64), 5)]
    path = write_calibration(tmp_path / "s.safetensors", list(stats), model="m")
    read = read_calibration(path)
    assert read.groups == {"a.q": ("a.q", "a.k"), "b": ("b",)} and read.model == "m"
    assert read.module_key["a.k"] == "a.q" and read.tokens("a.q") == 7 and read.in_features("b") == 2
    torch.testing.assert_close(read.xtx("a.q"), stats[0].xtx)
    write_safetensors({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(NotACheckpoint, match="not a statistics file"):
        read_calibration(tmp_path / "plain.safetensors")
    write_safetensors({"a.xtx": torch.zeros(2, 3, dtype=torch.float64), "a.tokens": torch.zeros(1, dtype=torch.int64)},
                      tmp_path / "bad.safetensors",
                      metadata={"lowrank_tools_calibration": "1", "groups": json.dumps({"a": ["a"]})})
    with pytest.raises(CorruptCheckpoint, match=r"'a.xtx' is torch.float64 \(2, 3\)"):
        read_calibration(tmp_path / "bad.safetensors")


def test_cli_writes_the_file_atomically(pair):
    out = pair["root"] / "stats.safetensors"
    args = ["calibrate", str(pair["base"]), "--data", str(pair["root"] / "texts.txt"), "-o", str(out), "--device",
            "cpu", "--max-samples", "4", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    stats = read_calibration(out)
    assert f"{LAYER}.v_proj" in stats.module_key and stats.model == str(pair["base"])
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "--force" in again.output
    missing = CliRunner().invoke(main, ["calibrate", str(pair["base"]), "--data", str(pair["root"] / "none.txt"),
                                        "-o", str(pair["root"] / "x.safetensors")])
    assert missing.exit_code != 0 and len(missing.output.strip().splitlines()) == 1
    assert not (pair["root"] / "x.safetensors").exists()

"""Never run code hidden in a file: a pickle whose ``__reduce__`` would create a marker file is refused wherever a
checkpoint or an adapter may be a torch pickle, with an error that points to safetensors; and no code path calls
``torch.load`` without ``weights_only=True`` (checked on the package's source)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import LLAMA_SHAPES, make_pair
from lowrank_tools.io.checkpoint import open_checkpoint
from lowrank_tools.cli import main
from lowrank_tools.errors import UnsafeCheckpoint
from lowrank_tools.io.formats import load_adapter

PACKAGE = Path(__file__).resolve().parent.parent / "lowrank_tools"
Q = "model.layers.0.self_attn.q_proj"


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears if the pickle is ever executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil(path: Path, marker: Path, *, legacy: bool = False, tensors: dict | None = None) -> Path:
    """A torch file holding real tensors and the payload (zip format, or the legacy pickle format)."""
    obj = dict(tensors or {"w.weight": torch.randn(4, 4)})
    obj["__payload__"] = Payload(marker)
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path, marker):
    """The control: the same file loaded the unsafe way creates the marker, so its absence below means something."""
    path = _evil(tmp_path / "evil.bin", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
@pytest.mark.parametrize("name", ["model.bin", "model.pt", "model.pth", "model.ckpt"])
def test_pickle_checkpoint_is_refused(tmp_path, marker, name, legacy):
    path = _evil(tmp_path / name, marker, legacy=legacy)
    with pytest.raises(UnsafeCheckpoint, match=rf"{re.escape(name)} holds Python objects .*safetensors"):
        open_checkpoint(path)
    assert not marker.exists()


def test_pickle_inside_hf_folder_is_refused(tmp_path, marker):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    _evil(folder / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeCheckpoint, match=r"pytorch_model\.bin holds Python objects .*safetensors"):
        open_checkpoint(folder)
    assert not marker.exists()


def test_pickle_shard_of_an_index_is_refused(tmp_path, marker):
    """Sharded .bin folders: a clean first shard does not vouch for the second."""
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save({"a.weight": torch.randn(2, 2)}, folder / "pytorch_model-00001-of-00002.bin")
    _evil(folder / "pytorch_model-00002-of-00002.bin", marker, tensors={"b.weight": torch.randn(2, 2)})
    index = {"weight_map": {"a.weight": "pytorch_model-00001-of-00002.bin",
                            "b.weight": "pytorch_model-00002-of-00002.bin"}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeCheckpoint, match=r"00002-of-00002\.bin holds Python objects"):
        open_checkpoint(folder)
    assert not marker.exists()


def test_pickle_adapter_is_refused(tmp_path, marker):
    """As a PEFT folder's adapter_model.bin, and as a lone adapter file."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    factors = {f"base_model.model.{Q}.lora_A.weight": torch.randn(2, 32),
               f"base_model.model.{Q}.lora_B.weight": torch.randn(32, 2)}
    _evil(folder / "adapter_model.bin", marker, tensors=factors)
    with pytest.raises(UnsafeCheckpoint, match=r"adapter_model\.bin holds Python objects .*safetensors"):
        load_adapter(folder)
    with pytest.raises(UnsafeCheckpoint, match=r"lora\.pt holds Python objects .*safetensors"):
        load_adapter(_evil(tmp_path / "lora.pt", marker, tensors=factors))
    assert not marker.exists()


def test_pickle_under_a_safetensors_name_is_never_unpickled(tmp_path, marker):
    from lowrank_tools.errors import CorruptCheckpoint

    path = _evil(tmp_path / "model.safetensors", marker, legacy=True)
    with pytest.raises(CorruptCheckpoint, match=r"model\.safetensors"):
        open_checkpoint(path)
    assert not marker.exists()


def test_cli_refuses_pickles_everywhere(tmp_path, marker):
    """Through every command that reads a checkpoint or an adapter: exit 1, one line naming the file."""
    base, tuned = make_pair(LLAMA_SHAPES, k=2)
    save_file(base, str(tmp_path / "base.safetensors"))
    evil_ckpt = _evil(tmp_path / "tuned.bin", marker, tensors=tuned)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    _evil(folder / "adapter_model.bin", marker, tensors={f"base_model.model.{Q}.lora_A.weight": torch.randn(2, 32),
                                                         f"base_model.model.{Q}.lora_B.weight": torch.randn(32, 2)})
    b = str(tmp_path / "base.safetensors")
    commands = [["extract", b, str(evil_ckpt), "-o", str(tmp_path / "o1")],
                ["analyze", b, str(evil_ckpt)],
                ["apply", str(evil_ckpt), str(folder), "-o", str(tmp_path / "o2.safetensors")],
                ["apply", b, str(folder), "-o", str(tmp_path / "o3.safetensors")],
                ["resize", str(folder), "-o", str(tmp_path / "o4.safetensors"), "--rank", "1"],
                ["merge", str(folder), "-o", str(tmp_path / "o5.safetensors")],
                ["convert", str(folder), "-o", str(tmp_path / "o6.safetensors"), "--format", "kohya"],
                ["info", str(folder)]]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in commands:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and re.search(r"(tuned|adapter_model)\.bin holds Python objects.*safetensors",
                                             lines[0]), (args, result.output)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------------------------------------------------ the source


def _sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the package is where we think it is
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_every_torch_load_passes_weights_only_true():
    """Grep for ``torch.load(`` in code (not docstrings), then check each call's keywords on the syntax tree."""
    calls = 0
    for path in _sources():
        text = path.read_text()
        tree = ast.parse(text)
        found = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _dotted(n.func) in (
            "torch.load", "torch.serialization.load", "serialization.load")]
        code_lines = {n.lineno for n in found}
        for lineno, line in enumerate(text.splitlines(), 1):  # the grep: every code line calling it is a checked call
            stripped = line.split("#", 1)[0]
            if re.search(r"\btorch\.load\(", stripped) and not re.search(r"``torch\.load\(", stripped):
                assert lineno in code_lines, f"{path.name}:{lineno}: torch.load( outside a recognised call: {line}"
        for call in found:
            weights_only = [k for k in call.keywords if k.arg == "weights_only"]
            value = weights_only[0].value if weights_only else None
            ok = isinstance(value, ast.Constant) and value.value is True
            assert ok, f"{path.name}:{call.lineno}: torch.load without weights_only=True"
            calls += 1
    assert calls >= 1  # the checkpoint reader's one call is seen, so the check is not vacuous


def test_no_other_unpickling():
    """pickle.load / loads of outside bytes, Unpickler, numpy's allow_pickle, joblib / dill: none in the package.
    (Round-tripping our own object, ``pickle.loads(pickle.dumps(x))``, reads no outside bytes.)"""
    banned = re.compile(r"\bpickle\.(load\b|loads\((?!pickle\.dumps\()|Unpickler\b)|allow_pickle\s*=\s*True|"
                        r"\bjoblib\.load\b|\bdill\b|\bcloudpickle\b|\bmarshal\.loads?\b|\beval\(|\bexec\(")
    for path in _sources():
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not banned.search(code), f"{path.name}:{lineno}: {line.strip()}"

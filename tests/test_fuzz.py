"""Fuzzing the readers through the real CLI, in-process (``CliRunner`` on ``lowrank_tools.cli.main``).

Random mutations of valid inputs (a kohya safetensors adapter: header bytes, length prefix, offsets, dtypes,
shapes, metadata; a PEFT ``adapter_config.json``; a sharded model folder's ``model.safetensors.index.json``) go
through ``info``, ``convert`` and ``extract``. Every outcome must be one of:

- exit 0 with a correct result: the output (if any) is readable back, and a safetensors input we accepted is also
  accepted by the reference library (``safetensors.safe_open``), with the same tensors;
- exit 1 or 2 with exactly one ``Error:`` line and nothing else on stderr, no traceback, no ``unexpected`` error;

never a hang (a per-case alarm and hypothesis' deadline), never a stray file (the working folder holds exactly the
inputs, plus the output on success), inputs unchanged. The CI budget is small (``LOWRANK_FUZZ_EXAMPLES`` unset:
60 cases per target, well under a minute); a long run: ``LOWRANK_FUZZ_EXAMPLES=5000``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import tempfile
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis.errors import InvalidArgument
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from lowrank_tools.cli import main

EXAMPLES = int(os.environ.get("LOWRANK_FUZZ_EXAMPLES", "60"))
CASE_SECONDS = 30  # a case that runs longer is a hang
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=CASE_SECONDS), database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


# ---------------------------------------------------------------------------------------------- seeds


def _kohya_bytes() -> bytes:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key in ("lora_unet_q_proj", "lora_unet_v_proj"):
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, 8, generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(8, 2, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    with tempfile.TemporaryDirectory() as d:
        save_file(tensors, f"{d}/k.safetensors", metadata={"format": "pt", "lowrank_tools.modules": json.dumps(
            {"lora_unet_q_proj": Q, "lora_unet_v_proj": V})})
        return Path(f"{d}/k.safetensors").read_bytes()


KOHYA = _kohya_bytes()
HEADER_LEN = struct.unpack("<Q", KOHYA[:8])[0]
HEADER = json.loads(KOHYA[8:8 + HEADER_LEN])
DATA = KOHYA[8 + HEADER_LEN:]
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
          "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "use_rslora": False, "use_dora": False,
          "base_model_name_or_path": "m", "bias": "none"}


def _peft_tensors() -> dict:
    g = torch.Generator().manual_seed(1)
    return {f"base_model.model.{m}.lora_{ab}.weight": torch.randn(*(2, 8) if ab == "A" else (8, 2), generator=g)
            for m in (Q, V) for ab in "AB"}


def _model(folder: Path, seed: int, index: dict | None = None) -> None:
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    base = torch.Generator().manual_seed(7)
    tensors = {f"{m}.weight": torch.randn(8, 8, generator=base) + 0.1 * seed * torch.randn(8, 8, generator=g)
               for m in (Q, V)}
    names = list(tensors)
    save_file({names[0]: tensors[names[0]]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({names[1]: tensors[names[1]]}, str(folder / "model-00002-of-00002.safetensors"))
    index = index if index is not None else {"metadata": {"total_size": 512}, "weight_map": {
        names[0]: "model-00001-of-00002.safetensors", names[1]: "model-00002-of-00002.safetensors"}}
    text = index if isinstance(index, str) else json.dumps(index)
    (folder / "model.safetensors.index.json").write_text(text)


# ---------------------------------------------------------------------------------------------- strategies

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2**63, 2**64]),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                      st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "Q4_K", "", "F8_E4M3", "F64"]))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def mutated_header(draw) -> bytes:
    """A kohya file whose header JSON is edited: an entry's dtype, shape or offsets, metadata, a key duplicated."""
    header = json.loads(json.dumps(HEADER))
    names = [k for k in header if k != "__metadata__"]
    text = None
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "metadata", "drop", "shift"]))
        name = draw(st.sampled_from(names))
        if name not in header:
            continue
        if what in ("dtype", "shape", "data_offsets") and isinstance(header[name], dict):
            header[name][what] = draw(JSON_VALUE | st.lists(st.integers(-4, 2**64), max_size=4))
        elif what == "entry":
            header[name] = draw(JSON_VALUE)
        elif what == "metadata":
            header["__metadata__"] = draw(JSON_VALUE | st.dictionaries(st.text(max_size=20), st.text(max_size=20)))
        elif what == "drop":
            header.pop(name)
        elif what == "shift" and isinstance(header[name], dict) and isinstance(header[name].get("data_offsets"), list) \
                and len(header[name]["data_offsets"]) == 2:
            begin, end = header[name]["data_offsets"]
            if isinstance(begin, int) and isinstance(end, int):
                delta = draw(st.integers(-16, 16))
                header[name]["data_offsets"] = [begin + delta, end + draw(st.sampled_from([0, delta]))]
    text = json.dumps(header, allow_nan=True)
    if draw(st.integers(0, 3)) == 0 and names:  # a key written twice
        dup = draw(st.sampled_from(names))
        if dup in header:
            text = text[:-1] + f", {json.dumps(dup)}: {json.dumps(header[dup], allow_nan=True)}}}"
    raw = text.encode()
    tail = draw(st.integers(0, 7))  # mostly the data as it was; else 4 bytes more (covered by no tensor) or fewer
    data = DATA + b"\0" * 4 if tail == 0 else DATA[:-4] if tail == 1 else DATA
    return struct.pack("<Q", len(raw)) + raw + data


@st.composite
def mutated_bytes(draw) -> bytes:
    """A kohya file with bytes flipped, inserted or cut, or its length prefix changed."""
    data = bytearray(KOHYA)
    what = draw(st.sampled_from(["flip", "insert", "truncate", "length", "length-small"]))
    if what == "flip":
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, 8 + HEADER_LEN - 1))
            data[at] = draw(st.integers(0, 255))
    elif what == "insert":
        at = draw(st.integers(8, 8 + HEADER_LEN))
        data[at:at] = draw(st.binary(min_size=1, max_size=8))
    elif what == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif what == "length":
        data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    else:
        data[:8] = struct.pack("<Q", max(0, HEADER_LEN + draw(st.integers(-40, 40))))
    return bytes(data)


@st.composite
def mutated_config(draw) -> str:
    config = json.loads(json.dumps(CONFIG))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*CONFIG, "rank_pattern", "alpha_pattern"]))
        choice = draw(st.sampled_from(["value", "pattern", "drop"]))
        if choice == "value":
            config[key] = draw(JSON_VALUE)
        elif choice == "pattern":
            pattern = draw(st.sampled_from(["q_proj", "^" + Q, "layers\\.\\d+\\.self_attn\\.v_proj", "(a+)+$",
                                            "([a-z0-9_.]|[a-z0-9_.])*Z", "[", ".*.*.*.*", "v_proj|q_proj", "\\1"]))
            config[draw(st.sampled_from(["rank_pattern", "alpha_pattern"]))] = {
                pattern: draw(st.sampled_from([2, 4, 0, -1, 2.5, 1e308, True, "2", None]))}
        else:
            config.pop(key, None)
    text = json.dumps(config, allow_nan=True)
    if draw(st.booleans()):  # byte-level damage on top
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + draw(st.sampled_from(["", "[", "{", "]", '"', "NaN", "1e400", ",", "\\"])) + text[at + 1:]
    return text


@st.composite
def mutated_index(draw) -> str:
    index = {"metadata": {"total_size": 512}, "weight_map": {f"{Q}.weight": "model-00001-of-00002.safetensors",
                                                             f"{V}.weight": "model-00002-of-00002.safetensors"}}
    what = draw(st.sampled_from(["value", "map", "entry", "path", "text"]))
    if what == "value":
        index[draw(st.sampled_from(["metadata", "weight_map"]))] = draw(JSON_VALUE)
    elif what == "map":
        index["weight_map"] = draw(JSON_VALUE)
    elif what == "entry":
        index["weight_map"][draw(st.sampled_from([f"{Q}.weight", "x.weight"]))] = draw(JSON_VALUE)
    elif what == "path":
        index["weight_map"][f"{Q}.weight"] = draw(st.sampled_from(
            ["../model-00001-of-00002.safetensors", "/etc/passwd", "", ".", "model-00002-of-00002.safetensors",
             "missing.safetensors", "a\0b", "config.json"]))
    text = json.dumps(index, allow_nan=True)
    if what == "text":
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + draw(st.sampled_from(["", "[", "]", "NaN", "1e400", '"', "}"])) + text[at:]
    return text


# ---------------------------------------------------------------------------------------------- harness


class Hang(Exception):
    pass


@contextmanager
def alarm(seconds: int):
    def handler(*_):
        raise Hang(f"no result after {seconds} s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def run_cli(folder: Path, args: list[str], output: str | None = None):
    """Run one command in ``folder``; check the outcome contract; return the click result."""
    before = _tree(folder)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with alarm(CASE_SECONDS):
            result = CliRunner().invoke(main, args)
    finally:
        os.chdir(cwd)
    after = _tree(folder)
    stderr = result.stderr.strip()
    try:
        event(f"{args[0]}: exit {result.exit_code}")  # the outcome mix, shown by --hypothesis-show-statistics
    except InvalidArgument:
        pass  # called outside a hypothesis test (the seed control)
    assert result.exit_code in (0, 1, 2), (args, result.exit_code, stderr, result.exception)
    assert "Traceback" not in result.output + stderr and "unexpected" not in stderr, (args, stderr)
    new = {k for k in after if k not in before}
    assert {k: after[k] for k in before} == before, "an input was changed or removed"
    if result.exit_code == 0:
        assert not stderr.startswith("Error"), stderr
        if output is not None:
            assert new and all(k == output or k.startswith(output + "/") for k in new), new
        else:
            assert not new, new
    else:
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (args, stderr)
        assert not new, f"stray files after a failure: {sorted(new)}"
    return result


def _reference_reads(path: Path) -> dict | None:
    """What the reference library reads from a safetensors file: {name: tensor}, or None when it refuses it."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - any refusal of the reference library
        return None


def _check_safetensors_case(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "k.safetensors").write_bytes(raw)
        info = run_cli(folder, ["info", "k.safetensors", "--json"])
        conv = run_cli(folder, ["convert", "k.safetensors", "-o", "out", "--format", "peft"], output="out")
        reference = _reference_reads(folder / "k.safetensors")
        if info.exit_code == 0 or conv.exit_code == 0:
            # what we accept, the reference library accepts too, with the same tensors
            assert reference is not None, "read a safetensors file that the reference library refuses"
            from lowrank_tools.io.checkpoint import open_checkpoint
            ckpt = open_checkpoint(folder / "k.safetensors")
            assert sorted(ckpt.keys()) == sorted(reference)
            for name, tensor in reference.items():
                assert torch.equal(ckpt.get(name), tensor), name
        if conv.exit_code == 0:
            from lowrank_tools.io.formats import load_adapter
            assert load_adapter(folder / "out").modules


# ---------------------------------------------------------------------------------------------- tests


@FUZZ
@given(mutated_header())
def test_fuzz_safetensors_header(raw):
    _check_safetensors_case(raw)


@FUZZ
@given(mutated_bytes())
def test_fuzz_safetensors_bytes(raw):
    _check_safetensors_case(raw)


@FUZZ
@given(mutated_config())
def test_fuzz_adapter_config(text):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "a").mkdir()
        save_file(_peft_tensors(), str(folder / "a" / "adapter_model.safetensors"))
        (folder / "a" / "adapter_config.json").write_text(text)
        info = run_cli(folder, ["info", "a", "--json"])
        conv = run_cli(folder, ["convert", "a", "-o", "k.safetensors", "--format", "kohya"], output="k.safetensors")
        if info.exit_code == 0:
            assert json.loads(info.stdout)["modules"] == 2
        if conv.exit_code == 0:
            from lowrank_tools.io.formats import load_adapter
            assert set(load_adapter(folder / "k.safetensors").modules) == {Q, V}


@FUZZ
@given(mutated_index())
def test_fuzz_shard_index(text):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        _model(folder / "base", 0)
        _model(folder / "tuned", 1)
        (folder / "tuned" / "model.safetensors.index.json").write_text(text)
        result = run_cli(folder, ["extract", "base", "tuned", "-o", "out", "--rank", "2", "-q"], output="out")
        if result.exit_code == 0:
            from lowrank_tools.io.formats import load_adapter
            assert set(load_adapter(folder / "out").modules) <= {Q, V}


def test_fuzz_budget_is_small_in_ci():
    """The default budget keeps the suite fast; the long run is opt-in."""
    if "LOWRANK_FUZZ_EXAMPLES" not in os.environ:
        assert EXAMPLES <= 100


@pytest.mark.parametrize("raw", [KOHYA])
def test_seed_file_is_accepted_by_both(raw):
    """The control: the unmutated seed is read by the tool and by the reference library alike."""
    _check_safetensors_case(raw)

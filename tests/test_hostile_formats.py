"""Hostile LyCORIS / DoRA / diff adapters and evaluation texts through the real CLI (in-process, CliRunner).

Every file below is wrong in one way (mismatched LoHa / LoKr factors, missing halves, zero-size, NaN, odd alphas,
bad DoRA scales, diffs that fit no module, integer / bool / fp8 tensors, one module written twice, PEFT configs that
disagree with the weights, texts that are binary or malformed) and goes through ``info``, ``convert``, ``resize -r 2``,
``merge`` and ``apply`` (or ``evaluate --data``). Each outcome is exit 0 with a correct result, or exit 1/2 with
exactly one ``Error:`` line naming the file and the module (or line) -- never a traceback, never ``unexpected``,
never a stray file, and the inputs unchanged (sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lowrank_tools.cli import main

LIN, CONV = (8, 12), (6, 4, 3, 3)


def _r(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _base() -> dict[str, torch.Tensor]:
    return {"lin.weight": _r(*LIN, seed=1), "lin.bias": _r(LIN[0], seed=2), "conv.weight": _r(*CONV, seed=3),
            "norm.weight": _r(12, seed=4)}


def _loha(**over) -> dict[str, torch.Tensor]:
    t = {"hada_w1_a": _r(8, 2, seed=10), "hada_w1_b": _r(2, 12, seed=11), "hada_w2_a": _r(8, 2, seed=12),
         "hada_w2_b": _r(2, 12, seed=13), "alpha": torch.tensor(2.0)}
    t.update(over)
    return {k: v for k, v in t.items() if v is not None}


def _lokr(**over) -> dict[str, torch.Tensor]:
    t = {"lokr_w1": _r(2, 3, seed=20), "lokr_w2_a": _r(4, 2, seed=21), "lokr_w2_b": _r(2, 4, seed=22),
         "alpha": torch.tensor(2.0)}
    t.update(over)
    return {k: v for k, v in t.items() if v is not None}


def _lora(**over) -> dict[str, torch.Tensor]:
    t = {"lora_down.weight": _r(2, 12, seed=30), "lora_up.weight": _r(8, 2, seed=31), "alpha": torch.tensor(2.0)}
    t.update(over)
    return {k: v for k, v in t.items() if v is not None}


def _kohya(parts: dict[str, torch.Tensor], module: str = "lora_unet_lin") -> dict[str, torch.Tensor]:
    return {f"{module}.{k}": v.contiguous() for k, v in parts.items()}


NAN, INF = float("nan"), float("inf")
_nan_b = _r(2, 12, seed=13)
_nan_b[1, 3] = NAN
_inf_w1 = _r(2, 3, seed=20)
_inf_w1[0, 0] = INF

# id -> the tensors of a kohya-style file (modules "lin" (8, 12), "conv" (6, 4, 3, 3) in the base)
FILES: dict[str, dict[str, torch.Tensor]] = {
    "loha-w1-rank-mismatch": _kohya(_loha(hada_w1_b=_r(3, 12, seed=11))),
    "loha-w2-rank-mismatch": _kohya(_loha(hada_w2_a=_r(8, 3, seed=12))),
    "loha-out-mismatch": _kohya(_loha(hada_w2_a=_r(7, 2, seed=12))),
    "loha-in-mismatch": _kohya(_loha(hada_w2_b=_r(2, 10, seed=13))),
    "loha-pairs-differ": _kohya(_loha(hada_w2_a=_r(8, 3, seed=12), hada_w2_b=_r(3, 12, seed=13))),
    "loha-missing-w1b": _kohya(_loha(hada_w1_b=None)),
    "loha-tucker-missing-t2": _kohya(_loha(hada_w1_a=_r(2, 6, seed=10), hada_w1_b=_r(2, 4, seed=11),
                                           hada_w2_a=_r(2, 6, seed=12), hada_w2_b=_r(2, 4, seed=13),
                                           hada_t1=_r(2, 2, 3, 3, seed=14)), "lora_unet_conv"),
    "loha-tucker-bad-core": _kohya(_loha(hada_w1_a=_r(2, 6, seed=10), hada_w1_b=_r(2, 4, seed=11),
                                         hada_w2_a=_r(2, 6, seed=12), hada_w2_b=_r(2, 4, seed=13),
                                         hada_t1=_r(2, 3, 3, 3, seed=14), hada_t2=_r(2, 2, 3, 3, seed=15)),
                                   "lora_unet_conv"),
    "loha-1d-factor": _kohya(_loha(hada_w1_a=_r(8, seed=10))),
    "loha-zero-size": _kohya(_loha(hada_w1_a=torch.zeros(8, 0), hada_w1_b=torch.zeros(0, 12))),
    "loha-nan": _kohya(_loha(hada_w2_b=_nan_b)),
    "loha-int": _kohya(_loha(hada_w1_a=torch.ones(8, 2, dtype=torch.int32))),
    "loha-bool": _kohya(_loha(hada_w1_a=torch.ones(8, 2, dtype=torch.bool))),
    "loha-fp8": _kohya(_loha(hada_w1_a=_r(8, 2, seed=10).to(torch.float8_e4m3fn))),
    "lokr-kron-misfit": _kohya(_lokr(lokr_w1=_r(2, 3, seed=20), lokr_w2_a=_r(5, 2, seed=21),
                                     lokr_w2_b=_r(2, 5, seed=22))),
    "lokr-t2-wrong": _kohya(_lokr(lokr_w1=_r(2, 2, seed=20), lokr_t2=_r(2, 3, 3, 3, seed=23),
                                  lokr_w2_a=_r(2, 3, seed=21), lokr_w2_b=_r(2, 2, seed=22)), "lora_unet_conv"),
    "lokr-w2a-without-b": _kohya(_lokr(lokr_w2_b=None)),
    "lokr-w1ab-mismatch": _kohya(_lokr(lokr_w1=None, lokr_w1_a=_r(2, 2, seed=24), lokr_w1_b=_r(3, 3, seed=25))),
    "lokr-w2ab-mismatch": _kohya(_lokr(lokr_w2_b=_r(3, 4, seed=22))),
    "lokr-zero-size": _kohya(_lokr(lokr_w1=torch.zeros(0, 3))),
    "lokr-inf": _kohya(_lokr(lokr_w1=_inf_w1)),
    "lokr-3d-w1": _kohya(_lokr(lokr_w1=_r(2, 3, 1, seed=20))),
    "alpha-0": _kohya(_loha(alpha=torch.tensor(0.0))),
    "alpha-negative": _kohya(_loha(alpha=torch.tensor(-2.0))),
    "alpha-nan": _kohya(_loha(alpha=torch.tensor(NAN))),
    "alpha-1e40-f64": _kohya(_loha(alpha=torch.tensor(1e40, dtype=torch.float64))),
    "alpha-vector": _kohya(_loha(alpha=torch.tensor([2.0, 2.0]))),
    "alpha-int": _kohya(_loha(alpha=torch.tensor(2))),
    "alpha-bool": _kohya(_loha(alpha=torch.tensor(True))),
    "dora-wrong-length": _kohya(_lora(dora_scale=_r(7, 1, seed=40).abs())),
    "dora-zeros": _kohya(_lora(dora_scale=torch.zeros(8, 1))),
    "dora-negative": _kohya(_lora(dora_scale=-_r(8, 1, seed=40).abs())),
    "dora-nan": _kohya(_lora(dora_scale=torch.full((8, 1), NAN))),
    "dora-legacy-wrong-in": _kohya(_lora(dora_scale=_r(1, 11, seed=40).abs())),
    "dora-int": _kohya(_lora(dora_scale=torch.ones(8, 1, dtype=torch.int64))),
    "diff-misfit": _kohya({"diff": _r(8, 11, seed=50)}),
    "diff-b-misfit": _kohya({"diff": _r(8, 12, seed=50), "diff_b": _r(7, seed=51)}),
    "w-norm-misfit": _kohya({"w_norm": _r(11, seed=52)}, "lora_unet_norm"),
    "diff-int": _kohya({"diff": torch.ones(8, 12, dtype=torch.int8)}),
    "diff-b-nan": _kohya({"diff": _r(8, 12, seed=50), "diff_b": torch.full((8,), NAN)}),
    "duplicate-kinds": _kohya({**_lora(), **{k: v for k, v in _loha().items() if k != "alpha"}}),
    "duplicate-modules": {**_kohya(_lora()), **_kohya(_loha(), "lycoris_lin")},
}


def _peft_lycoris(folder: Path, peft_type: str, tensors: dict, config: dict) -> None:
    folder.mkdir()
    save_file({f"base_model.model.lin.{k}": v.contiguous() for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, **config}))


_LOHA_PEFT = {k: v for k, v in _loha().items() if k != "alpha"}
_LOKR_FULL = {"lokr_w1": _r(2, 3, seed=20), "lokr_w2": _r(4, 4, seed=21)}
PEFT_FOLDERS = {
    "peft-loha-r-disagrees": ("LOHA", _LOHA_PEFT, {"r": 4, "alpha": 4}),
    "peft-loha-r-0": ("LOHA", _LOHA_PEFT, {"r": 0, "alpha": 4}),
    "peft-lokr-full-r-0": ("LOKR", _LOKR_FULL, {"r": 0, "alpha": 4}),
    "peft-loha-rank-pattern-text": ("LOHA", _LOHA_PEFT, {"r": 2, "alpha": 2, "rank_pattern": {"lin": "x"}}),
    "peft-loha-alpha-pattern-nan": ("LOHA", _LOHA_PEFT, {"r": 2, "alpha": 2, "alpha_pattern": {"lin": "nan"}}),
    "peft-loha-r-negative": ("LOHA", _LOHA_PEFT, {"r": -2, "alpha": 2}),
    "peft-loha-r-fraction": ("LOHA", _LOHA_PEFT, {"r": 2.5, "alpha": 2}),
}


@dataclass(frozen=True)
class Run:
    command: str
    args: tuple[str, ...]  # {a}: the adapter, {b}: the base, {o}: an output in the case folder


COMMANDS = [
    Run("info", ("info", "{a}")),
    Run("convert", ("convert", "{a}", "-o", "{o}/out.safetensors", "--format", "kohya", "-q")),
    Run("resize", ("resize", "{a}", "-o", "{o}/out.safetensors", "-r", "2", "-q")),
    Run("merge", ("merge", "{a}", "{a}:0.5", "-o", "{o}/out.safetensors", "-q")),
    Run("apply", ("apply", "{b}", "{a}", "-o", "{o}/model.safetensors", "-q")),
]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    inp = tmp_path_factory.mktemp("hostile")
    save_file(_base(), str(inp / "base.safetensors"))
    for name, tensors in FILES.items():
        save_file(tensors, str(inp / f"{name}.safetensors"))
    for name, (peft_type, tensors, config) in PEFT_FOLDERS.items():
        _peft_lycoris(inp / name, peft_type, tensors, config)
    return inp


def _adapter_path(inp: Path, name: str) -> Path:
    return inp / name if name in PEFT_FOLDERS else inp / f"{name}.safetensors"


def invoke(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):  # escaped the CLI's handler
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def check_outcome(code: int, stdout: str, stderr: str, *, names: str) -> None:
    """Exit 0, or exit 1/2 with exactly one ``Error:`` line matching ``names``; never a traceback / unexpected."""
    shown = f"exit {code}\nstderr:\n{stderr}\nstdout:\n{stdout}"
    assert "Traceback" not in stdout + stderr and "unexpected" not in stderr, shown
    assert code in (0, 1, 2), shown
    if code:
        errors = [line for line in stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("Error: "), shown
        assert re.search(names, errors[0]), f"{names!r} not in {errors[0]!r}"


# Errors raised outside the readers (resize / merge commands) that name the output, not the input: findings for the
# commands' owners; the line is still one clean Error.
NAMES = {("alpha-0", "resize"): r"rank 0: nothing to write", ("w-norm-misfit", "resize"): r"nothing to write",
         ("w-norm-misfit", "merge"): r"nothing to write"}


def _file(name: str) -> dict[str, torch.Tensor]:
    return {k.split(".", 1)[1]: v.double() for k, v in FILES[name].items()}


def _loha_delta(t) -> torch.Tensor:
    return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])


def _dora(t, W0) -> torch.Tensor:
    W = W0 + t["lora_up.weight"] @ t["lora_down.weight"]  # alpha 2 = r: scale 1
    return t["dora_scale"].reshape(-1, 1) * W / W.norm(dim=1, keepdim=True)


# what ``apply`` must give for lin.weight (float64), for the files read without error: the right answer, not only exit 0
APPLIED = {
    "loha-pairs-differ": lambda t, W0: W0 + _loha_delta(t),  # alpha 2, r = hada_w1_b's 2: scale 1
    "loha-fp8": lambda t, W0: W0 + _loha_delta(t),
    "alpha-0": lambda t, W0: W0,
    "alpha-negative": lambda t, W0: W0 - _loha_delta(t),
    "alpha-int": lambda t, W0: W0 + _loha_delta(t),
    "dora-zeros": lambda t, W0: torch.zeros_like(W0),
    "dora-negative": _dora,
}


CASES = [(name, run) for name in [*FILES, *PEFT_FOLDERS] for run in COMMANDS]


@pytest.mark.parametrize(("name", "run"), CASES, ids=[f"{n}-{r.command}" for n, r in CASES])
def test_hostile_adapter(name: str, run: Run, inputs: Path, tmp_path: Path):
    adapter = _adapter_path(inputs, name)
    args = [a.replace("{a}", str(adapter)).replace("{b}", str(inputs / "base.safetensors")).replace("{o}", str(tmp_path))
            for a in run.args]
    before = _snapshot(inputs)
    code, stdout, stderr = invoke(*args)
    if os.environ.get("LRT_HOSTILE_SHOW"):
        print(f"\n[{name} {run.command}] exit {code}: {stderr.strip()[:300]}")
    check_outcome(code, stdout, stderr, names=NAMES.get((name, run.command), re.escape(adapter.name)))
    if code:
        assert list(tmp_path.iterdir()) == [], "a failed run left a file"
    assert _snapshot(inputs) == before, "an input changed"
    if run.command == "apply" and name in APPLIED:
        from safetensors.torch import load_file

        assert code == 0, stderr
        got = load_file(str(tmp_path / "model.safetensors"))["lin.weight"].double()
        want = APPLIED[name](_file(name), _base()["lin.weight"].double())
        assert float((got - want).norm()) <= 1e-5 * max(float(want.norm()), 1.0)


def test_every_refused_file_is_refused_by_the_reader(inputs: Path):
    """The files that must not load do not load, whatever the command: one AdapterFormatError naming the module."""
    from lowrank_tools.errors import AdapterFormatError
    from lowrank_tools.io.formats import load_adapter

    loads = {"loha-pairs-differ", "loha-fp8", "lokr-kron-misfit", "alpha-0", "alpha-negative", "alpha-int",
             "dora-zeros", "dora-negative", "diff-misfit", "diff-b-misfit", "w-norm-misfit", "duplicate-modules"}
    for name in [*FILES, *PEFT_FOLDERS]:
        if name in loads:
            load_adapter(_adapter_path(inputs, name))
            continue
        with pytest.raises(AdapterFormatError, match=r"(module|key|rank_pattern|alpha_pattern|\br\b)") as info:
            load_adapter(_adapter_path(inputs, name))
        assert "\n" not in str(info.value) and name in str(info.value), name


# ---------------------------------------------------------------------------------------------- DoRA conversions


def _dora_bases(inp: Path) -> None:
    base = _base()
    save_file({**base, "lin.weight": (base["lin.weight"] * 10).to(torch.int8)}, str(inp / "base-int8.safetensors"))
    save_file({**base, "lin.weight": _r(8, 11, seed=1)}, str(inp / "base-narrow.safetensors"))
    save_file({k: v for k, v in base.items() if not k.startswith("lin.")}, str(inp / "base-no-lin.safetensors"))
    save_file({**base, "lin.weight": base["lin.weight"].reshape(-1)}, str(inp / "base-flat.safetensors"))


DORA_CASES = [  # (adapter file, --dora, base file, regex of the one error line or None: exit 0)
    ("dora-zeros", "lora", "base", None),
    ("dora-negative", "lora", "base", None),
    ("alpha-negative", "dora", "base", None),
    ("loha-pairs-differ", "dora", "base-int8", r"lin\.weight.*base-int8\.safetensors.*int8"),
    ("dora-negative", "lora", "base-int8", r"lin\.weight.*base-int8\.safetensors.*int8"),
    ("loha-pairs-differ", "dora", "base-narrow", r"module lin .*\(8, 11\)"),
    ("dora-zeros", "lora", "base-flat", r"lin\.weight of .*base-flat.*not a float weight matrix"),  # 1-D: named as such
]


@pytest.mark.parametrize(("name", "to", "base", "error"), DORA_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in DORA_CASES])
def test_convert_dora_hostile(name, to, base, error, inputs: Path, tmp_path: Path):
    if not (inputs / "base-int8.safetensors").exists():
        _dora_bases(inputs)
    before = _snapshot(inputs)
    out = tmp_path / "out.safetensors"
    code, stdout, stderr = invoke("convert", _adapter_path(inputs, name), "-o", out, "--format", "kohya", "--base",
                                  inputs / f"{base}.safetensors", "--dora", to, "-q")
    check_outcome(code, stdout, stderr, names=error or "")
    assert (code == 0) == (error is None), stderr
    assert out.exists() == (code == 0) and _snapshot(inputs) == before
    if code == 0:
        from safetensors.torch import load_file

        assert all(bool(torch.isfinite(v).all()) for v in load_file(str(out)).values())


# ---------------------------------------------------------------------------------------------- PEFT DoRA / lora_bias


def _peft_dora(folder: Path, **extra) -> None:
    key = "base_model.model.lin"
    tensors = {f"{key}.lora_A.weight": _r(2, 12, seed=60), f"{key}.lora_B.weight": _r(8, 2, seed=61)}
    tensors.update({f"{key}.{k}": v for k, v in extra.items()})
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                            "target_modules": ["lin"], "use_dora": True}))


PEFT_EXTRAS = {
    "magnitude-nan": ({"lora_magnitude_vector": torch.full((8,), NAN)}, r"lora_magnitude_vector.*NaN"),
    "magnitude-int": ({"lora_magnitude_vector": torch.ones(8, dtype=torch.int32)},
                      r"lora_magnitude_vector.*int32.*not a float"),
    "magnitude-short": ({"lora_magnitude_vector": torch.ones(7)}, r"lora_magnitude_vector \(7,\).*\(8\)"),
    "bias-inf": ({"lora_B.bias": torch.full((8,), INF)}, r"lora_B\.bias.*NaN/Inf"),
    "bias-fp8": ({"lora_B.bias": torch.ones(8).to(torch.float8_e4m3fn)}, None),
    "bias-alone": ({"lora_B.bias": torch.ones(8)}, None),
}


@pytest.mark.parametrize("case", list(PEFT_EXTRAS))
def test_peft_extras_hostile(case, tmp_path: Path):
    extra, error = PEFT_EXTRAS[case]
    _peft_dora(tmp_path / "adapter", **extra)
    before = _snapshot(tmp_path)
    for args in (("info", tmp_path / "adapter"), ("convert", tmp_path / "adapter", "-o", tmp_path / "o.safetensors",
                                                   "--format", "kohya", "-q")):
        code, stdout, stderr = invoke(*args)
        check_outcome(code, stdout, stderr, names=error or "")
        assert (code == 0) == (error is None), stderr
        if code:
            assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- evaluate --data


def _texts(folder: Path) -> None:
    (folder / "invalid.txt").write_bytes(b"fine\nstill fine\n\xff\xfe broken\n")
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (folder / "object.json").write_text(json.dumps({"text": ["a", "b"]}))
    (folder / "numbers.json").write_text(json.dumps(["a", 1e300, "b"]))
    (folder / "nofield.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"content": "c"}\n')
    (folder / "notjson.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (folder / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    (folder / "deep.jsonl").write_text('{"text": "a"}\n' + "[" * 200_000 + "]" * 200_000 + "\n")
    (folder / "empty.txt").write_text("\n  \n")
    (folder / "folder.txt").mkdir()
    os.mkfifo(folder / "fifo.txt")


TEXT_CASES = [  # (file, regex the one error line must match: the file and the line)
    ("invalid.txt", r"invalid\.txt:3: not UTF-8"),
    ("binary.txt", r"binary\.txt:2: not UTF-8"),  # byte 10 is a newline: 0x80 is on line 2
    ("object.json", r"object\.json:1: a JSON dict"),
    ("numbers.json", r"numbers\.json: item 1 .*float"),
    ("nofield.jsonl", r"nofield\.jsonl:3: no field 'text' \(found: content\)"),
    ("notjson.jsonl", r"notjson\.jsonl:2: not a JSON object"),
    ("deep.json", r"deep\.json:1: JSON nested too deeply"),
    ("deep.jsonl", r"deep\.jsonl:2: JSON nested too deeply"),
    ("empty.txt", r"empty\.txt:1: no sample"),
    ("folder.txt", r"folder\.txt: not a regular file"),
    ("fifo.txt", r"fifo\.txt: not a regular file"),  # reading a FIFO would block forever
]


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("texts")
    _texts(folder)
    return folder


@pytest.mark.parametrize(("name", "error"), TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_evaluate_data_hostile(name, error, texts: Path, tmp_path: Path):
    pytest.importorskip("transformers")
    before = _snapshot(texts) if name != "fifo.txt" else None
    args = ("evaluate", tmp_path / "base", tmp_path / "tuned", "--ranks", "2", "--data", texts / name, "--json",
            tmp_path / "e.json", "-q")
    if name == "fifo.txt":  # a subprocess with a timeout: a regression would block on the FIFO, not hang the suite
        proc = subprocess.run([sys.executable, "-m", "lowrank_tools", *map(str, args)], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        code, stdout, stderr = invoke(*args)
    check_outcome(code, stdout, stderr, names=error)
    assert code == 1 and list(tmp_path.iterdir()) == []
    if before is not None:
        assert _snapshot(texts) == before


def test_texts_that_are_fine(tmp_path: Path):
    """A BOM, U+2028 inside a JSON string, CRLF, and one 20 MB line are all read as written."""
    from lowrank_tools.io.texts import read_texts

    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(["a", "b"]).encode())
    assert read_texts(tmp_path / "bom.json") == ["a", "b"]
    (tmp_path / "sep.jsonl").write_text(json.dumps({"text": "x\u2028y"}, ensure_ascii=False) + "\n" +
                                        json.dumps({"text": "z"}) + "\n", encoding="utf-8")
    assert read_texts(tmp_path / "sep.jsonl") == ["x\u2028y", "z"]
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\r\n\r\n")
    assert read_texts(tmp_path / "crlf.txt") == ["one", "two"]
    (tmp_path / "big.txt").write_text("w " * 10_000_000 + "\nlast\n")
    big = read_texts(tmp_path / "big.txt")
    assert len(big) == 2 and len(big[0]) == 20_000_000 and big[1] == "last"


def test_norm_delta_matches_its_base_module(tmp_path: Path):
    from lowrank_tools.io.formats import load_adapter

    save_file(_base(), str(tmp_path / "base.safetensors"))
    save_file({"lora_unet_norm.w_norm": _r(12, seed=5)}, str(tmp_path / "norm.safetensors"))
    adapter = load_adapter(tmp_path / "norm.safetensors", base=tmp_path / "base.safetensors")
    assert set(adapter.tensor_deltas) == {"norm.weight"}

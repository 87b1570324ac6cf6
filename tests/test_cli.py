"""The command line through click's CliRunner: exit codes, one-line errors, nothing written on failure."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import LLAMA_SHAPES, make_pair
from lowrank_tools.cli import main
from lowrank_tools.io.formats import load_adapter


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def files_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_clean_error(result, code: int, pattern: str) -> None:
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("Error")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    import re

    assert re.search(pattern, lines[0]), lines[0]


def test_extract_writes_peft_and_report(planted_files, tmp_path):
    base, tuned, base_sd, tuned_sd = planted_files
    out, report = tmp_path / "adapter", tmp_path / "report.json"
    result = run("extract", base, tuned, "-o", out, "--rank", 3, "--report", report, "-q")
    assert result.exit_code == 0, result.output
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 3 and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == str(base)
    data = json.loads(report.read_text())
    assert len(data["layers"]) == 4 and data["summary"]["rel_error"] < 1e-5
    adapter = load_adapter(out)
    d = tuned_sd["model.layers.0.mlp.up_proj.weight"] - base_sd["model.layers.0.mlp.up_proj.weight"]
    assert torch.allclose(adapter.modules["model.layers.0.mlp.up_proj"].delta(), d, atol=1e-4)


def test_extract_dynamic_ranks_go_to_rank_pattern(tmp_path):
    shapes = {"a.weight": (32, 24), "b.weight": (32, 24)}
    base, tuned = make_pair(shapes, k=2)
    tuned["b.weight"] = base["b.weight"] + (tuned["b.weight"] - base["b.weight"]) + make_pair(shapes, k=5, seed=9)[1][
        "b.weight"] - make_pair(shapes, k=5, seed=9)[0]["b.weight"]
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    result = run("extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "-o", tmp_path / "out",
                 "--energy", "0.999999", "--rank", 16, "-q")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    ranks = load_adapter(tmp_path / "out").ranks
    assert ranks["a"] == 2 and ranks["b"] > 2
    assert config["rank_pattern"] and all(isinstance(v, int) for v in config["rank_pattern"].values())


def test_extract_table_and_progress(planted_files, tmp_path):
    base, tuned, _, _ = planted_files
    result = run("extract", base, tuned, "-o", tmp_path / "a", "--rank", 2)
    assert result.exit_code == 0
    assert "rel_err" in result.output and "wrote" in result.output


def test_force_overwrites(planted_files, tmp_path):
    base, tuned, _, _ = planted_files
    out = tmp_path / "a"
    assert run("extract", base, tuned, "-o", out, "-r", 2, "-q").exit_code == 0
    assert_clean_error(run("extract", base, tuned, "-o", out, "-r", 3, "-q"), 1, "exists.*--force")
    assert load_adapter(out).ranks["model.layers.0.mlp.up_proj"] == 2
    assert run("extract", base, tuned, "-o", out, "-r", 3, "-q", "--force").exit_code == 0
    assert load_adapter(out).ranks["model.layers.0.mlp.up_proj"] == 3


@pytest.mark.parametrize(("opts", "code", "pattern"), [
    (["--rank", "0"], 2, r"--rank 0"),
    (["--rank", "-3"], 2, r"--rank -3"),
    (["--rank", "x"], 2, r"'x' is not a valid integer"),
    (["--energy", "0"], 2, r"--energy 0"),
    (["--energy", "1.5"], 2, r"--energy 1.5"),
    (["--energy", "nan"], 2, r"--energy nan"),
    (["--sv-ratio", "0.5"], 2, r"--sv-ratio"),
    (["--threshold", "-1"], 2, r"--threshold"),
    (["--energy", "0.9", "--sv-ratio", "4"], 2, r"one"),
    (["--alpha", "-1"], 2, r"--alpha"),
    (["--include", "("], 2, r"--include"),
])
def test_bad_options_are_usage_errors(planted_files, tmp_path, opts, code, pattern):
    base, tuned, _, _ = planted_files
    result = run("extract", base, tuned, "-o", tmp_path / "a", *opts)
    assert_clean_error(result, code, pattern)
    assert not (tmp_path / "a").exists()


def _corrupt_files(folder: Path) -> dict[str, Path]:
    good = folder / "good.safetensors"
    save_file({"w.weight": torch.randn(8, 8)}, str(good))
    raw = good.read_bytes()
    cases = {
        "not_a_checkpoint.safetensors": b"hello, I am text",
        "empty.safetensors": b"",
        "truncated.safetensors": raw[:-20],
        "bad_header_len.safetensors": struct.pack("<Q", 10**9) + raw[8:],
        "bad_json.safetensors": struct.pack("<Q", 10) + b"{not json}" + b"\0" * 8,
    }
    out = {}
    for name, data in cases.items():
        (folder / name).write_bytes(data)
        out[name] = folder / name
    return out


@pytest.mark.parametrize("case", ["not_a_checkpoint.safetensors", "empty.safetensors", "truncated.safetensors",
                                  "bad_header_len.safetensors", "bad_json.safetensors"])
def test_bad_checkpoints_are_data_errors(planted_files, tmp_path, case):
    base, _, _, _ = planted_files
    bad = _corrupt_files(tmp_path)[case]
    before = files_in(tmp_path)
    result = run("extract", base, bad, "-o", tmp_path / "out")
    assert_clean_error(result, 1, case)
    assert files_in(tmp_path) == before


def test_missing_path(planted_files, tmp_path):
    base, _, _, _ = planted_files
    assert_clean_error(run("extract", base, tmp_path / "nope", "-o", tmp_path / "o"), 1, r"nope.*does not exist")


def test_no_common_names_and_all_shapes_differ(tmp_path):
    save_file({"a.weight": torch.randn(4, 4)}, str(tmp_path / "x.safetensors"))
    save_file({"b.weight": torch.randn(4, 4)}, str(tmp_path / "y.safetensors"))
    save_file({"a.weight": torch.randn(5, 4)}, str(tmp_path / "z.safetensors"))
    assert_clean_error(run("extract", tmp_path / "x.safetensors", tmp_path / "y.safetensors", "-o", tmp_path / "o"),
                       1, "share no tensor name")
    assert_clean_error(run("extract", tmp_path / "x.safetensors", tmp_path / "z.safetensors", "-o", tmp_path / "o"),
                       1, "shape")
    assert not (tmp_path / "o").exists()


def test_nan_weight_named(tmp_path):
    base, tuned = make_pair(LLAMA_SHAPES, k=2)
    tuned["model.layers.0.mlp.up_proj.weight"][3, 3] = float("inf")
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    result = run("extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "-o", tmp_path / "o")
    assert_clean_error(result, 1, r"model\.layers\.0\.mlp\.up_proj\.weight.*NaN/Inf")
    assert not (tmp_path / "o").exists()


def test_strict_mismatches(planted_files, tmp_path):
    base, _, _, tuned_sd = planted_files
    extra = dict(tuned_sd)
    extra["model.extra.weight"] = torch.randn(4, 4)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    warned = run("extract", base, tmp_path / "extra.safetensors", "-o", tmp_path / "o1", "-r", 2)
    assert warned.exit_code == 0 and "only in tuned" in warned.output
    strict = run("extract", base, tmp_path / "extra.safetensors", "-o", tmp_path / "o2", "-r", 2, "--strict")
    assert_clean_error(strict, 1, "model.extra.weight")


def test_inputs_never_modified(planted_files, tmp_path):
    base, tuned, _, _ = planted_files
    before = (base.read_bytes(), tuned.read_bytes())
    assert run("extract", base, tuned, "-o", tmp_path / "a", "-q").exit_code == 0
    assert (base.read_bytes(), tuned.read_bytes()) == before


def test_output_equal_to_input_refused(planted_files):
    base, tuned, _, _ = planted_files
    before = tuned.read_bytes()
    assert_clean_error(run("extract", base, tuned, "-o", tuned, "--force"), 1, "also an input")
    assert tuned.read_bytes() == before


def test_dtype_option(planted_files, tmp_path):
    base, tuned, _, _ = planted_files
    assert run("extract", base, tuned, "-o", tmp_path / "a", "--dtype", "bfloat16", "-q").exit_code == 0
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_kohya_output(planted_files, tmp_path):
    base, tuned, _, _ = planted_files
    out = tmp_path / "lora.safetensors"
    assert run("extract", base, tuned, "-o", out, "--format", "kohya", "-q", "--exclude", "embed").exit_code == 0
    keys = load_file(str(out)).keys()
    assert "lora_unet_model_layers_0_mlp_up_proj.lora_down.weight" in keys


def test_info_json(planted_files, tmp_path):
    base, tuned, _, _ = planted_files
    run("extract", base, tuned, "-o", tmp_path / "a", "-r", 2, "-q")
    result = run("info", tmp_path / "a", "--json")
    facts = json.loads(result.output)
    assert facts["modules"] == 4 and facts["ranks"] == {"2": 4} and facts["format"] == "peft"


def test_demo_runs(tmp_path):
    result = run("demo", "-o", tmp_path / "demo", "--seconds", "1", "-q")
    assert result.exit_code == 0, result.output
    assert {"base.safetensors", "tuned.safetensors", "adapter-r4", "adapter-r16"} <= set(os.listdir(tmp_path / "demo"))


def test_python_dash_m_and_console_script(planted_files, tmp_path):
    base, tuned, _, _ = planted_files
    proc = subprocess.run([sys.executable, "-m", "lowrank_tools", "extract", str(base), str(tuned), "-o",
                           str(tmp_path / "a"), "--rank", "0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: --rank 0")
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "lowrank_tools", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "lowrank-tools" in proc.stdout


def test_report_never_overwrites_an_input_or_lands_late(planted_files, tmp_path):
    base, tuned, _, _ = planted_files
    before = base.read_bytes()
    result = run("extract", base, tuned, "-o", tmp_path / "a", "--report", base, "--force", "-q")
    assert_clean_error(result, 1, "also an input")
    assert base.read_bytes() == before and not (tmp_path / "a").exists()
    (tmp_path / "r.json").write_text("{}")
    result = run("extract", base, tuned, "-o", tmp_path / "b", "--report", tmp_path / "r.json", "-q")
    assert_clean_error(result, 1, "exists")
    assert not (tmp_path / "b").exists()  # checked before any work, not after the adapter was written


def test_debug_after_the_command_shows_the_traceback(planted_files, tmp_path):
    base, _, _, _ = planted_files
    plain = run("extract", base, tmp_path / "nope", "-o", tmp_path / "o")
    assert plain.exit_code == 1 and plain.exception is None or isinstance(plain.exception, SystemExit)
    debug = run("extract", base, tmp_path / "nope", "-o", tmp_path / "o", "--debug")
    assert debug.exit_code == 1
    assert type(debug.exception).__name__ == "CheckpointNotFound"  # raised, not turned into one line

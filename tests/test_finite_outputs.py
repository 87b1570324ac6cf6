"""Every report is strict JSON and every tensor written is finite (issue 11, items 3 and 5), through the real CLI.

Failing cases assert: exit 1, exactly one stderr line ``Error: ...`` naming the tensor, nothing new in the working
folder (no output, no ``.lrt-tmp-`` temporary) and the inputs unchanged by sha256. Succeeding cases parse every
report with a parser that refuses NaN/Infinity tokens, and ``apply`` with nothing to add is checked byte for byte,
tensor by tensor (sha256 of each tensor's raw bytes). The cases in ``SUBPROCESS`` run ``python -m lowrank_tools`` in
a child (two at a time: each imports torch), the others through click's CliRunner in this process (same command,
same checks, a second instead of several on a loaded machine).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from click.testing import CliRunner

from conftest import planted_delta
from lowrank_tools.adapter import Adapter, LoraModule
from lowrank_tools.cli import main
from lowrank_tools.io.formats import save_adapter

TIMEOUT = 120
Q, UP, LN, NORM, O = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                      "model.layers.0.input_layernorm.weight", "model.norm.weight", "model.layers.0.self_attn.o_proj")


# ---------------------------------------------------------------------------------------------- helpers


def strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (Python's json accepts them; JSON does not)."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (hidden ones too) under ``folder`` -> sha256; folders -> "dir"."""
    return {str(p.relative_to(folder)): ("dir" if p.is_dir() else sha256(p)) for p in sorted(folder.rglob("*"))}


def tensor_hashes(path: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """name -> (dtype, shape, sha256 of the raw bytes) of every tensor of a safetensors file."""
    out = {}
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name).contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            out[name] = (str(t.dtype), tuple(t.shape), hashlib.sha256(raw).hexdigest())
    return out


def _module(B: torch.Tensor, A: torch.Tensor, alpha: float | None = None) -> LoraModule:
    return LoraModule(B=B, A=A, alpha=float(alpha if alpha is not None else A.shape[0]))


def build_inputs(folder: Path) -> None:
    """Checkpoints and adapters the cases share. ``base``: float32 with -0.0 entries in q_proj, an all-zero
    LayerNorm (a ratio over a zero norm), an untouched ``model.norm.weight`` of 1e5 (past float16's 65504);
    ``tuned``: planted rank-2 deltas, the LayerNorm changed, o_proj zero in the base and not in the tuned."""
    g = torch.Generator().manual_seed(0)
    base = {f"{Q}.weight": torch.randn(16, 16, generator=g), f"{UP}.weight": torch.randn(24, 16, generator=g),
            f"{O}.weight": torch.zeros(16, 16), LN: torch.zeros(16), NORM: torch.full((16,), 1e5)}
    base[f"{Q}.weight"][0, :4] = -0.0
    tuned = {k: v.clone() for k, v in base.items()}
    tuned[f"{Q}.weight"] += planted_delta(16, 16, 2, seed=1)
    tuned[f"{UP}.weight"] += planted_delta(24, 16, 2, seed=2)
    tuned[f"{O}.weight"] += planted_delta(16, 16, 2, seed=3)
    tuned[LN] += 0.1
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    small = {k: (v.clamp(max=6e4) if k == NORM else v) for k, v in base.items()}  # fits float16
    save_file({k: v.half() for k, v in small.items()}, str(folder / "base16.safetensors"))
    save_file({k: v.bfloat16() for k, v in small.items()}, str(folder / "basebf16.safetensors"))
    nan = {k: v.clone() for k, v in base.items()}
    nan[NORM][5] = float("nan")
    save_file(nan, str(folder / "base_nan.safetensors"))
    g = torch.Generator().manual_seed(1)
    adapter = Adapter(modules={Q: _module(torch.randn(16, 2, generator=g), torch.randn(2, 16, generator=g)),
                               UP: _module(torch.zeros(24, 2), torch.randn(2, 16, generator=g))})  # UP: a fresh B = 0
    save_adapter(adapter, folder / "adapter", format="peft")
    big = Adapter(modules={Q: _module(1e5 * torch.randn(16, 2, generator=g), torch.randn(2, 16, generator=g))})
    save_adapter(big, folder / "big", format="peft")  # float32 factors past float16's range
    whole = Adapter(modules={Q: _module(torch.randn(16, 2, generator=g), torch.randn(2, 16, generator=g))},
                    full_tensors={NORM: torch.full((16,), 2e5)})
    save_adapter(whole, folder / "whole", format="peft")


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    cwd: Path
    before: dict
    after: dict
    inputs_before: dict
    inputs_after: dict


def run_cli(args: list[str], inp: Path, cwd: Path, *, child: bool) -> Outcome:
    """Run one command in ``cwd``: in a subprocess (``child``) or through CliRunner after a chdir (callers run
    these one at a time, in the main thread)."""
    cwd.mkdir(parents=True)
    args = [a.replace("{in}", str(inp)) for a in args]
    before, inputs_before = snapshot(cwd), snapshot(inp)
    if child:
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200"}
        proc = subprocess.run([sys.executable, "-m", "lowrank_tools", *args], cwd=cwd, capture_output=True,
                              text=True, timeout=TIMEOUT, env=env)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        old = Path.cwd()
        os.chdir(cwd)
        try:
            result = CliRunner().invoke(main, args)
        finally:
            os.chdir(old)
        code, out, err = result.exit_code, result.stdout, result.stderr
    return Outcome(code, out, err, cwd, before, snapshot(cwd), inputs_before, snapshot(inp))


# ---------------------------------------------------------------------------------------------- the cases

# id -> (args, pattern the one Error line must match). Every one must exit 1 and write nothing.
FAILING = {
    "apply-weight-huge": (["apply", "{in}/base.safetensors", "{in}/adapter:1e39", "-o", "out.safetensors", "-q"],
                          rf"{re.escape(Q)}\.weight overflows float32 .*use smaller adapter weights"),
    "apply-untouched-fp16": (["apply", "{in}/base.safetensors", "{in}/adapter", "-o", "out.safetensors", "--dtype",
                              "float16", "-q"], rf"base tensor {re.escape(NORM)} holds values up to 1e\+05, past the "
                                                r"range of torch\.float16: pass --dtype float32"),
    "apply-untouched-fp16-folder": (["apply", "{in}/base.safetensors", "{in}/adapter", "-o", "model", "--dtype",
                                     "float16", "--shard-size", "1KB", "-q"], rf"base tensor {re.escape(NORM)} holds"),
    "apply-touched-fp16": (["apply", "{in}/base.safetensors", "{in}/big", "-o", "out.safetensors", "--dtype",
                            "float16", "-q"], rf"{re.escape(Q)}\.weight overflows torch\.float16: pass --dtype float32"),
    "apply-base-nan": (["apply", "{in}/base_nan.safetensors", "{in}/adapter", "-o", "out.safetensors", "-q"],
                       rf"base tensor {re.escape(NORM)} in .*base_nan\.safetensors holds 1 NaN/Inf values"),
    "apply-whole-fp16": (["apply", "{in}/base16.safetensors", "{in}/whole", "-o", "out.safetensors", "-q"],
                         rf"tensor {re.escape(NORM)} saved whole in the adapter holds values up to 2e\+05, past the "
                         r"range of torch\.float16"),
    "convert-peft-fp16": (["convert", "{in}/big", "-o", "c", "--format", "peft", "--dtype", "float16", "-q"],
                          rf"tensor base_model\.model\.{re.escape(Q)}\.lora_B\.weight for c would hold \d+ Inf and 0 "
                          r"NaN values in float16 .*pass --dtype float32"),
    "convert-kohya-fp16": (["convert", "{in}/big", "-o", "c.safetensors", "--format", "kohya", "--dtype", "float16",
                            "-q"], r"tensor lora_unet_model_layers_0_self_attn_q_proj\.lora_up\.weight for "
                                   r"c\.safetensors would hold \d+ Inf"),
    "merge-concat-fp16": (["merge", "{in}/big", "{in}/big:0.5", "-o", "m", "--dtype", "float16", "-q"],
                          r"tensor base_model\.model\.\S+ for m would hold \d+ Inf"),
    "resize-kohya-alpha": (["resize", "{in}/adapter", "-o", "r.safetensors", "--rank", "1", "--alpha", "1e39", "-q"],
                           rf"module {re.escape(Q)}: alpha 1e\+39 does not fit the float32 \.alpha"),
    "extract-fp16-factors": (["extract", "{in}/base.safetensors", "{in}/tuned.safetensors", "-o", "e", "--rank", "2",
                              "--alpha", "1e-9", "--dtype", "float16", "--report", "r.json", "-q"],
                             r"factors overflow torch\.float16 when cast: pass --dtype float32"),
}

# id -> args; each must exit 0, its reports strict JSON (checked per case below).
PASSING = {
    "extract-report-json": ["extract", "{in}/base.safetensors", "{in}/tuned.safetensors", "-o", "e", "--rank", "2",
                            "--report", "r.json"],
    "extract-report-csv": ["extract", "{in}/base.safetensors", "{in}/tuned.safetensors", "-o", "e", "--rank", "2",
                           "--report", "r.csv", "-q"],
    "analyze": ["analyze", "{in}/base.safetensors", "{in}/tuned.safetensors", "--json", "a.json", "--csv", "a.csv"],
    "analyze-adapter": ["analyze", "{in}/adapter", "--json", "a.json", "-q"],
    "resize-report": ["resize", "{in}/adapter", "-o", "r", "--rank", "1", "--report", "r.json", "-q"],
    "merge-report": ["merge", "{in}/adapter", "{in}/adapter:0.5", "-o", "m", "--rank", "1", "--report", "m.json", "-q"],
    "info-json": ["info", "{in}/adapter", "--json"],
    "apply-weight-0": ["apply", "{in}/base.safetensors", "{in}/adapter:0", "-o", "out.safetensors", "-q"],
    "apply-weight-0-fp16": ["apply", "{in}/base16.safetensors", "{in}/adapter:0", "-o", "out.safetensors", "-q"],
    "apply-weight-0-bf16": ["apply", "{in}/basebf16.safetensors", "{in}/adapter:0", "-o", "out.safetensors", "-q"],
    "apply-weight-0-whole": ["apply", "{in}/base.safetensors", "{in}/whole:0", "-o", "out.safetensors", "-q"],
    "apply-fp16-auto": ["apply", "{in}/base16.safetensors", "{in}/adapter", "-o", "out.safetensors", "--dtype", "auto",
                        "-q"],
    "apply-bf16": ["apply", "{in}/basebf16.safetensors", "{in}/adapter", "-o", "model", "--shard-size", "1KB", "-q"],
}


# through a real child process: one per guarantee (a sum that overflows, a cast that does, bytes kept, strict JSON)
SUBPROCESS = ("apply-weight-huge", "apply-untouched-fp16-folder", "apply-weight-0-bf16", "extract-report-json")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("finite")
    inp = root / "in"
    inp.mkdir()
    build_inputs(inp)
    cases = {**{k: v[0] for k, v in FAILING.items()}, **PASSING}
    with ThreadPoolExecutor(2) as pool:  # the children run while the in-process cases do
        futures = {k: pool.submit(run_cli, cases[k], inp, root / "work" / k, child=True) for k in SUBPROCESS}
        got = {k: run_cli(args, inp, root / "work" / k, child=False) for k, args in cases.items() if k not in SUBPROCESS}
        got.update({k: f.result() for k, f in futures.items()})
    got["_in"] = inp  # type: ignore[assignment]
    return got


@pytest.mark.parametrize("case", sorted(FAILING))
def test_failing_case_names_the_tensor_and_writes_nothing(outcomes, case):
    got = outcomes[case]
    lines = [line for line in got.stderr.splitlines() if line.strip()]
    assert got.code == 1, (got.code, got.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), got.stderr
    assert "unexpected" not in lines[0] and "Traceback" not in got.stderr
    assert re.search(FAILING[case][1], lines[0]), lines[0]
    assert got.after == got.before, f"stray files: {set(got.after) - set(got.before)}"  # .lrt-tmp- included
    assert got.inputs_after == got.inputs_before
    assert got.stdout == ""


def _ok(got: Outcome) -> None:
    assert got.code == 0, got.stderr
    assert "Error" not in got.stderr
    assert got.inputs_after == got.inputs_before
    assert not any(".lrt-tmp-" in name for name in got.after)


def test_extract_report_over_a_zero_layernorm_is_strict_json_with_null(outcomes):
    got = outcomes["extract-report-json"]
    _ok(got)
    report = strict_loads((got.cwd / "r.json").read_text())
    assert report["not_low_rank"] == {LN: None}  # ||d|| / ||W0|| over an all-zero base: null, not Infinity
    assert f"{LN} n/a (base is zero)" in got.stdout  # the reason, in the table


def test_extract_report_csv_is_finite(outcomes):
    got = outcomes["extract-report-csv"]
    _ok(got)
    rows = list(csv.DictReader(io.StringIO((got.cwd / "r.csv").read_text())))
    assert {r["name"] for r in rows} == {Q, UP, O}
    for row in rows:
        for value in row.values():
            assert not re.search(r"\b(inf|nan)\b", value, re.IGNORECASE), row


def test_analyze_json_and_csv_give_null_and_empty_for_a_zero_base(outcomes):
    got = outcomes["analyze"]
    _ok(got)
    data = strict_loads((got.cwd / "a.json").read_text())
    layers = {x["name"]: x for x in data["layers"]}
    assert layers[O]["relative_change"] is None and layers[Q]["relative_change"] > 0
    assert data["not_low_rank"] == {LN: None}
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO((got.cwd / "a.csv").read_text()))}
    assert rows[O]["relative_change"] == "" and float(rows[Q]["relative_change"]) > 0
    assert "change n/a: base is zero (1 layers, e.g. model.layers.0.self_attn.o_proj)" in got.stdout
    assert f"{LN} n/a (base is zero)" in got.stdout


@pytest.mark.parametrize("case, report", [("analyze-adapter", "a.json"), ("resize-report", "r.json"),
                                          ("merge-report", "m.json")])
def test_reports_are_strict_json(outcomes, case, report):
    got = outcomes[case]
    _ok(got)
    strict_loads((got.cwd / report).read_text())


def test_info_json_is_strict(outcomes):
    got = outcomes["info-json"]
    _ok(got)
    assert strict_loads(got.stdout)["modules"] == 2


@pytest.mark.parametrize("case, base", [("apply-weight-0", "base"), ("apply-weight-0-fp16", "base16"),
                                        ("apply-weight-0-bf16", "basebf16"), ("apply-weight-0-whole", "base")])
def test_apply_weight_zero_copies_the_base_bit_for_bit(outcomes, case, base):
    got = outcomes[case]
    _ok(got)
    want = tensor_hashes(outcomes["_in"] / f"{base}.safetensors")
    assert tensor_hashes(got.cwd / "out.safetensors") == want  # -0.0 stays -0.0: same bytes, every tensor


def test_apply_keeps_untouched_and_zero_delta_tensors_byte_identical(outcomes):
    """--dtype auto over float16 and bfloat16 bases: every tensor but q_proj's is its bytes as read (up_proj's
    module has B = 0: a delta of exactly zero), q_proj changed."""
    for case, base in [("apply-fp16-auto", "base16"), ("apply-bf16", "basebf16")]:
        got = outcomes[case]
        _ok(got)
        want = tensor_hashes(outcomes["_in"] / f"{base}.safetensors")
        out = got.cwd / ("out.safetensors" if case == "apply-fp16-auto" else "model")
        files = [out] if out.is_file() else sorted(out.glob("*.safetensors"))
        have = {k: v for f in files for k, v in tensor_hashes(f).items()}
        assert set(have) == set(want)
        assert {k for k in want if have[k] != want[k]} == {f"{Q}.weight"}, case
        assert all(have[k][0] == want[k][0] for k in want)  # dtypes kept


# ---------------------------------------------------------------------------------------------- units


def test_strict_encoding_helpers():
    from lowrank_tools.report import BASE_IS_ZERO, csv_number, finite_or_none, ratio_cell, strict_json

    with pytest.raises(ValueError, match="not JSON compliant"):
        strict_json({"x": float("inf")})  # a future Inf is a loud bug, never an invalid file
    assert strict_json({"x": finite_or_none(float("inf")), "y": finite_or_none(float("nan"))}) == \
        '{"x": null, "y": null}'
    assert finite_or_none(0.5) == 0.5 and finite_or_none(None) is None
    assert [csv_number(v) for v in (1.5, None, float("inf"), float("nan"))] == ["1.5", "", "", ""]
    assert ratio_cell(float("inf")) == BASE_IS_ZERO == "n/a (base is zero)"
    assert ratio_cell(None) == "-" and ratio_cell(0.25, ".2f") == "0.25"


def test_report_with_zero_base_encodes_null_everywhere():
    from lowrank_tools.report import LayerRecord, Report, format_table, report_csv, report_json, summarize

    rec = LayerRecord(name="a", shape=(4, 4), rank=1, delta_norm=1.0, singular_values=[1.0, 0.0],
                      retained_energy=1.0, rel_error=0.0)
    report = Report(command="extract", layers=[rec], summary=summarize([rec]), changed_1d={"n.weight": float("inf"),
                                                                                          "m.weight": 0.5})
    assert strict_loads(report_json(report))["not_low_rank"] == {"n.weight": None, "m.weight": 0.5}
    assert "n.weight n/a (base is zero), m.weight 0.5" in format_table(report)
    rec.extra["ratio"] = float("nan")  # a field nobody made null: an empty CSV field, and a loud error in JSON
    row = list(csv.DictReader(io.StringIO(report_csv(report))))[0]
    assert row["ratio"] == "" and row["rel_error"] == "0"
    with pytest.raises(ValueError, match="not JSON compliant"):
        report_json(report)


def test_writer_refuses_a_non_finite_tensor_naming_it_and_the_output(tmp_path):
    from lowrank_tools.io.atomic import ShardedWriter, atomic_output, check_finite_output, write_safetensors
    from lowrank_tools.errors import NonFiniteOutput

    with pytest.raises(NonFiniteOutput, match=r"tensor b for .*out\.safetensors would hold 1 Inf and 1 NaN values in "
                                              r"bfloat16: nothing was written; pass --dtype float32"):
        with atomic_output(tmp_path / "out.safetensors") as tmp:
            write_safetensors({"a": torch.ones(3), "b": torch.tensor([1.0, float("inf"), float("nan")]).bfloat16()},
                              tmp)
    with pytest.raises(NonFiniteOutput, match=r"tensor x for .*/model would hold 1 Inf .*float16 stops at 65504"):
        with atomic_output(tmp_path / "model") as tmp, ShardedWriter(tmp, shard_size=100) as writer:
            writer.add("ok", torch.arange(4))
            writer.add("x", torch.tensor([7e4]).half())
    assert os.listdir(tmp_path) == []  # no output, no temporary
    check_finite_output("i", torch.arange(3), tmp_path)  # integers and bools are always finite
    check_finite_output("f", torch.zeros(0), tmp_path)
    big = torch.zeros(3 << 20)
    big[-1] = float("nan")  # past the first chunk
    with pytest.raises(NonFiniteOutput, match=r"tensor big for \S+ would hold 0 Inf and 1 NaN"):
        check_finite_output("big", big, tmp_path / "f.safetensors")


def test_peft_writer_checks_tensors_before_save_file(tmp_path):
    from lowrank_tools.errors import NonFiniteOutput

    bad = Adapter(modules={"m": _module(torch.ones(4, 1), torch.ones(1, 4))}, full_tensors={"n.weight": torch.tensor(
        [float("inf")])})
    with pytest.raises(NonFiniteOutput, match=r"tensor base_model\.model\.n\.weight for \S*peft would hold 1 Inf"):
        save_adapter(bad, tmp_path / "peft", format="peft")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("alpha", [1e39, 1e-40, 1e-46])
def test_kohya_alpha_outside_float32_is_refused(alpha):
    from lowrank_tools.errors import ConversionError
    from lowrank_tools.io.kohya import kohya_state_dict

    adapter = Adapter(modules={"m": _module(torch.ones(4, 1), torch.ones(1, 4), alpha=alpha)})
    with pytest.raises(ConversionError, match=r"module m: alpha .* does not fit the float32 \.alpha"):
        kohya_state_dict(adapter)


def test_plan_drops_terms_that_add_nothing_and_the_bytes_stay():
    from lowrank_tools.apply import applied_tensors, plan_apply
    from lowrank_tools.io.checkpoint import as_checkpoint
    from lowrank_tools.weighted import WeightedAdapter

    W = torch.randn(6, 5).half()
    W[0, :3] = -0.0
    base = as_checkpoint({"a.weight": W.clone(), "b.weight": W.clone(), "c.weight": W.clone()})
    adapter = Adapter(modules={"a": _module(torch.zeros(6, 2), torch.randn(2, 5)),  # B = 0: a zero delta
                               "b": _module(torch.randn(6, 2), torch.zeros(2, 5)),  # A = 0
                               "c": _module(torch.randn(6, 2), torch.randn(2, 5))})
    plan, _ = plan_apply(base, [WeightedAdapter(adapter, 1.0)])
    assert set(plan) == {"c.weight"}
    assert plan_apply(base, [WeightedAdapter(adapter, 0.0)])[0] == {}
    out = dict(applied_tensors(base, plan))
    for name in ("a.weight", "b.weight"):
        assert torch.equal(out[name].view(torch.int16), W.view(torch.int16)), name  # -0.0 kept
    assert not torch.equal(out["c.weight"], W)


def test_all_finite_sums_a_chunk_and_checks_exactly_when_the_sum_overflows():
    from lowrank_tools.io.atomic import all_finite

    assert all_finite(torch.full((10,), 6e4).half())  # its float16 sum would overflow: summed in float32
    big = torch.full((3 << 20,), 3e38)  # finite entries whose float32 sum overflows: the exact check decides
    assert all_finite(big)
    big[-1] = float("inf")
    assert not all_finite(big)
    nan = torch.zeros(5, dtype=torch.bfloat16)
    nan[2] = float("nan")
    assert not all_finite(nan) and not all_finite(torch.tensor(float("-inf")))
    assert all_finite(torch.arange(5)) and all_finite(torch.zeros(0)) and all_finite(torch.ones(2, 3).mT)

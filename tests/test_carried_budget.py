"""extract --keep-bias / --keep-norms / --dora: the carried tensors count in --budget and in the report's totals."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from lowrank_tools.cli import main
from tests.test_extract_extras import _pair

# the pair: l (16 x 12, one rank unit = 28 parameters), l.bias (16), norm.weight (12), norm.bias (12), all changed


def _extract(tmp_path, *args, code=0):
    base, tuned, _ = _pair(tmp_path)
    out, report = tmp_path / "a.safetensors", tmp_path / "r.json"
    res = CliRunner().invoke(main, ["extract", str(base), str(tuned), "-o", str(out), "--report", str(report), "-q",
                                    *args])
    assert res.exit_code == code, res.output
    if code:
        return res, None
    file_params = sum(t.numel() for k, t in load_file(str(out)).items() if not k.endswith(".alpha"))
    return json.loads(report.read_text())["summary"], file_params


@pytest.mark.parametrize("flags,carried,rank", [
    (["--keep-bias", "--keep-norms"], 40, 2),  # 100 - 40 = 60: two rank units (56); without the count: three (84)
    (["--keep-bias"], 16, 3),  # 100 - 16 = 84: three units
    (["--keep-norms"], 24, 2),  # 100 - 24 = 76: two units
])
def test_budget_counts_the_carried_tensors(tmp_path, flags, carried, rank):
    summary, file_params = _extract(tmp_path, "--budget", "100", *flags)
    assert summary["carried_params"] == carried
    assert summary["params"] == 28 * rank + carried == file_params <= 100
    assert summary["budget"] == 100 and summary["ranks"]["max"] == rank


def test_budget_counts_dora_magnitudes(tmp_path):
    summary, file_params = _extract(tmp_path, "--budget", "100", "--dora", "--keep-bias")
    # 100 - 16 (l's magnitude) - 16 (l.bias) = 68: two rank units (56); without the count: three (84)
    assert summary["carried_params"] == 32 and summary["params"] == 56 + 32 == file_params <= 100


def test_filtered_out_modules_reserve_nothing(tmp_path):
    from lowrank_tools.extract.extras import carried_budget

    base, tuned, _ = _pair(tmp_path)
    assert carried_budget(base, tuned, biases=True, norms=False, dora=True) == 32
    assert carried_budget(base, tuned, biases=True, norms=False, dora=True, exclude=["^l$"]) == 0
    assert carried_budget(base, tuned, biases=False, norms=True) == 24


def test_report_counts_carried_tensors_without_budget(tmp_path):
    summary, file_params = _extract(tmp_path, "--rank", "2", "--keep-bias", "--keep-norms", "--dora")
    assert summary["carried_tensors"] == 4  # l.bias, norm.weight, norm.bias deltas and l's magnitude
    assert summary["carried_params"] == 16 + 24 + 16
    assert summary["params"] == 56 + 56 == file_params


def test_budget_below_the_carried_tensors_is_a_usage_error(tmp_path):
    res, _ = _extract(tmp_path, "--budget", "40", "--keep-bias", "--keep-norms", code=2)
    assert "take up to 40 parameters" in res.output
    assert not (tmp_path / "a.safetensors").exists()

"""The bad-input battery: every command, through the real CLI in a subprocess (``python -m lowrank_tools``).

Each case asserts the exit status (1: a data or file problem, 2: a usage problem), exactly one line on stderr
(``Error: ...``) that names the offending thing (path, tensor, module, or option and value), nothing on stdout, no
traceback, no new or changed file in the working folder, and inputs unchanged (sha256 of every file before and
after). Cases run two at a time (each child imports torch, ~1.3 s). ``LRT_BATTERY_TABLE=1`` also writes
``tests/battery_cases.md``: every case with the message it got. Ctrl-C is in ``test_atomic_kill.py``.

Unreadable paths: ``chmod 000`` does not stop root (these tests often run as root), so an unreadable input is
simulated by a directory where a file is expected and by a FIFO (opening one for reading would block forever).
A full disk is simulated with ``RLIMIT_FSIZE`` in the child (SIGXFSZ ignored, so a write fails with EFBIG).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import signal
import stat
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import LLAMA_SHAPES, make_pair

TABLE = Path(__file__).resolve().parent / "battery_cases.md"
WORKERS = 2
TIMEOUT = 60


# ---------------------------------------------------------------------------------------------- inputs


def _safetensors_raw(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _peft_folder(folder: Path, tensors: dict, config: dict | str) -> None:
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))


class _Marker:
    """A pickle that would create a file if it were ever unpickled without weights_only."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def build_inputs(inp: Path) -> None:
    """Every bad (and good) input the cases name, in ``inp``."""
    from lowrank_tools import Adapter, LoraModule, save_adapter

    base, tuned = make_pair(LLAMA_SHAPES, k=3)
    save_file(base, str(inp / "base.safetensors"))
    save_file(tuned, str(inp / "tuned.safetensors"))
    g = torch.Generator().manual_seed(0)
    adapter = Adapter(modules={k[: -len(".weight")]: LoraModule(B=torch.randn(v.shape[0], 2, generator=g), alpha=2.0,
                                                                 A=torch.randn(2, v.shape[1], generator=g))
                               for k, v in base.items() if v.ndim == 2})
    save_adapter(adapter, inp / "peft")
    save_adapter(adapter, inp / "kohya.safetensors", format="kohya")
    q = "model.layers.0.self_attn.q_proj"

    # unreadable: a folder where a file is expected, a FIFO; a regular file where a folder is expected
    (inp / "folder.safetensors").mkdir()
    os.mkfifo(inp / "fifo.safetensors")
    (inp / "plain.txt").write_text("not a folder\n")

    # damaged safetensors
    raw = (inp / "tuned.safetensors").read_bytes()
    (inp / "empty.safetensors").write_bytes(b"")
    (inp / "short.safetensors").write_bytes(b"\x10\x00\x00")
    (inp / "badlen.safetensors").write_bytes(struct.pack("<Q", 10**12) + raw[8:])
    (inp / "badjson.safetensors").write_bytes(struct.pack("<Q", 12) + b'{"a": [1, 2' + b"\0" * 16)
    (inp / "truncated.safetensors").write_bytes(raw[: len(raw) - 100])
    (inp / "listheader.safetensors").write_bytes(_safetensors_raw([1, 2]))  # type: ignore[arg-type]
    (inp / "q4.safetensors").write_bytes(_safetensors_raw({f"{q}.weight": {"dtype": "Q4_K", "shape": [32, 32],
                                                                            "data_offsets": [0, 576]}}, b"\0" * 576))

    # integer and quantized weights in place of the tuned float weights
    ints = {k: (v * 100).to(torch.int32) if v.ndim == 2 else v for k, v in tuned.items()}
    save_file(ints, str(inp / "int32.safetensors"))
    int8 = {}
    for k, v in tuned.items():
        int8[k] = (v * 40).round().clamp(-127, 127).to(torch.int8) if v.ndim == 2 else v
        if v.ndim == 2:
            int8[k.replace(".weight", ".weight_scale")] = torch.tensor([1 / 40])
    save_file(int8, str(inp / "int8.safetensors"))
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in tuned.items()}  # plain fp8 is read
    fp8.update({k.replace(".weight", ".weight_scale"): torch.ones(2, 2) for k, v in tuned.items() if v.ndim == 2})
    save_file(fp8, str(inp / "fp8blk.safetensors"))  # block-wise scales are not (yet)
    nf4 = {}  # bitsandbytes 4-bit: two values per uint8, flattened, plus quantization state
    for k, v in tuned.items():
        if v.ndim == 2:
            nf4[k] = torch.randint(0, 255, (v.numel() // 2, 1), dtype=torch.uint8)
            nf4[f"{k}.absmax"] = torch.rand(v.numel() // 64)
            nf4[f"{k}.quant_map"] = torch.linspace(-1, 1, 16)
        else:
            nf4[k] = v
    save_file(nf4, str(inp / "nf4.safetensors"))

    # torch pickles
    torch.save({"step": 3, "lr": 0.1}, inp / "numbers.bin")
    torch.save([base[f"{q}.weight"]], inp / "list.pt")
    torch.save({"model": _Marker(str(inp.parent / "pwned"))}, inp / "evil.bin")
    (inp / "text.ckpt").write_text("this is not a torch file\n")
    torch.save(tuned, inp / "tuned.pt")
    pt = (inp / "tuned.pt").read_bytes()
    (inp / "truncated.pt").write_bytes(pt[: len(pt) // 2])

    # bad weights
    nan = dict(tuned)
    nan[f"{q}.weight"] = tuned[f"{q}.weight"].clone()
    nan[f"{q}.weight"][1, 2] = float("nan")
    save_file(nan, str(inp / "nan.safetensors"))
    save_file({"a.weight": torch.zeros(0, 32)}, str(inp / "zero_base.safetensors"))
    save_file({"a.weight": torch.zeros(0, 32)}, str(inp / "zero_tuned.safetensors"))
    save_file({f"{q}.weight": base[f"{q}.weight"]}, str(inp / "same.safetensors"))

    # bad adapters
    key = f"base_model.model.{q}"
    good = {f"{key}.lora_A.weight": torch.randn(4, 32), f"{key}.lora_B.weight": torch.randn(32, 4)}
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4}
    _peft_folder(inp / "missing_b", {f"{key}.lora_A.weight": torch.randn(4, 32)}, config)
    _peft_folder(inp / "mismatch", {f"{key}.lora_A.weight": torch.randn(4, 32),
                                    f"{key}.lora_B.weight": torch.randn(32, 3)}, config)
    _peft_folder(inp / "badconfig", good, '{"peft_type": "LORA", "r": ')
    _peft_folder(inp / "nan_adapter", {**good, f"{key}.lora_B.weight": torch.full((32, 4), float("nan"))}, config)
    _peft_folder(inp / "int_adapter", {**good, f"{key}.lora_A.weight": torch.ones(4, 32, dtype=torch.int32)}, config)
    _peft_folder(inp / "zero_rank", {f"{key}.lora_A.weight": torch.zeros(0, 32),
                                     f"{key}.lora_B.weight": torch.zeros(32, 0)}, {**config, "r": 0})
    _peft_folder(inp / "other_base", {f"{key}.lora_A.weight": torch.randn(4, 64),
                                      f"{key}.lora_B.weight": torch.randn(64, 4)}, config)
    other = "base_model.model.model.layers.7.self_attn.k_proj"
    _peft_folder(inp / "other_names", {f"{other}.lora_A.weight": torch.randn(4, 32),
                                       f"{other}.lora_B.weight": torch.randn(32, 4)}, config)

    # a base large enough that writing it trips the file-size limit (apply: 1 MiB of output)
    save_file({"w.weight": torch.randn(512, 512, generator=g)}, str(inp / "big.safetensors"))
    big = LoraModule(B=torch.randn(512, 2, generator=g), A=torch.randn(2, 512, generator=g), alpha=2.0)
    save_adapter(Adapter(modules={"w": big}), inp / "big_adapter")


# ---------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One bad input. ``args``: ``{in}`` is the inputs folder; relative paths land in the case's own folder."""

    id: str
    args: tuple[str, ...]
    code: int
    names: str  # regex the one error line must match: the offending path / tensor / module / option and value
    what: str  # the bad input, in words (for the table)
    files: dict[str, str] = field(default_factory=dict)  # files created in the working folder first
    fsize: int | None = None  # RLIMIT_FSIZE of the child, bytes: a full disk


B, T, P, K = "{in}/base.safetensors", "{in}/tuned.safetensors", "{in}/peft", "{in}/kohya.safetensors"
Q = r"model\.layers\.0\.self_attn\.q_proj"


def _x(*args: str) -> tuple[str, ...]:
    return ("extract", *args)


CASES = [
    # -- extract: paths
    Case("extract-missing", _x("{in}/nope.safetensors", T, "-o", "out", "-q"), 1, r"nope\.safetensors.*does not exist",
         "missing path"),
    Case("extract-folder-as-file", _x(B, "{in}/folder.safetensors", "-o", "out", "-q"), 1, r"folder\.safetensors",
         "a folder where a file is expected (stands in for an unreadable file)"),
    Case("extract-fifo", _x(B, "{in}/fifo.safetensors", "-o", "out", "-q"), 1, r"fifo\.safetensors.*not a regular file",
         "a FIFO (reading would block; stands in for an unreadable file)"),
    Case("extract-empty", _x(B, "{in}/empty.safetensors", "-o", "out", "-q"), 1, r"empty\.safetensors.*empty",
         "empty file"),
    Case("extract-bad-header-length", _x(B, "{in}/badlen.safetensors", "-o", "out", "-q"), 1,
         r"badlen\.safetensors.*header length", "header length past the end of the file"),
    Case("extract-bad-json", _x(B, "{in}/badjson.safetensors", "-o", "out", "-q"), 1, r"badjson\.safetensors.*JSON",
         "header that is not JSON"),
    Case("extract-offsets-past-end", _x(B, "{in}/truncated.safetensors", "-o", "out", "-q"), 1,
         r"truncated\.safetensors.*past the end", "truncated file: data offsets past the end"),
    Case("extract-unknown-dtype", _x(B, "{in}/q4.safetensors", "-o", "out", "-q"), 1, Q + r".*Q4_K",
         "tensor of a dtype safetensors does not define (Q4_K)"),
    Case("extract-int8-quantized", _x(B, "{in}/int8.safetensors", "-o", "out", "-q"), 1, r"int8",
         "int8-quantized weights with scales"),
    Case("extract-fp8-block-scaled", _x(B, "{in}/fp8blk.safetensors", "-o", "out", "-q"), 1,
         r"fp8blk\.safetensors.*scale of shape \(2, 2\).*block-wise", "fp8 weights with block-wise scales"),
    Case("extract-nf4-packed", _x(B, "{in}/nf4.safetensors", "-o", "out", "-q"), 1, r"nf4\.safetensors.*uint8",
         "bitsandbytes 4-bit weights packed in U8"),
    Case("extract-pickle-object", _x(B, "{in}/evil.bin", "-o", "out", "-q"), 1, r"evil\.bin.*safetensors",
         "pickle holding a Python object (its __reduce__ would run a command)"),
    Case("extract-truncated-pt", _x(B, "{in}/truncated.pt", "-o", "out", "-q"), 1, r"truncated\.pt",
         "truncated torch zip file"),
    Case("extract-nan", _x(B, "{in}/nan.safetensors", "-o", "out", "-q"), 1, Q + r"\.weight.*NaN",
         "NaN in a tuned weight"),
    Case("extract-zero-size", _x("{in}/zero_base.safetensors", "{in}/zero_tuned.safetensors", "-o", "out", "-q"), 1,
         r"zero-size: a\.weight", "zero-size weights only"),
    # -- extract: options
    Case("extract-rank-0", _x(B, T, "-o", "out", "--rank", "0"), 2, r"--rank 0", "--rank 0"),
    Case("extract-energy", _x(B, T, "-o", "out", "--energy", "1.5"), 2, r"--energy 1\.5", "--energy 1.5"),
    Case("extract-sv-ratio", _x(B, T, "-o", "out", "--sv-ratio", "0.5"), 2, r"--sv-ratio 0\.5", "--sv-ratio 0.5"),
    Case("extract-threshold", _x(B, T, "-o", "out", "--threshold", "-1"), 2, r"--threshold -1", "--threshold -1"),
    Case("extract-budget", _x(B, T, "-o", "out", "--budget", "0"), 2, r"--budget 0", "--budget 0"),
    Case("extract-alpha", _x(B, T, "-o", "out", "--alpha", "nan"), 2, r"--alpha nan", "--alpha nan"),
    Case("extract-oversample", _x(B, T, "-o", "out", "--oversample", "-1"), 2, r"--oversample.*-1", "--oversample -1"),
    Case("extract-power-iters", _x(B, T, "-o", "out", "--power-iters", "x"), 2, r"--power-iters.*'x'",
         "--power-iters x"),
    Case("extract-seed", _x(B, T, "-o", "out", "--seed", str(2**70)), 2, r"--seed.*" + str(2**70),
         "--seed 2^70 (past 64 bits)"),
    Case("extract-conv-rank", _x(B, T, "-o", "out", "--conv-rank", "0"), 2, r"--conv-rank 0", "--conv-rank 0"),
    Case("extract-output-is-input", _x(B, T, "-o", T, "--force", "-q"), 1, r"tuned\.safetensors.*also an input",
         "-o equal to an input (with --force)"),
    Case("extract-output-exists", _x(B, T, "-o", "out", "-q"), 1, r"out exists.*--force",
         "-o exists, no --force", files={"out": "keep me\n"}),
    Case("extract-output-under-file", _x(B, T, "-o", "{in}/plain.txt/out", "-q"), 1, r"plain\.txt",
         "-o inside a regular file (a file where a folder is expected)"),
    Case("extract-full-disk", _x(B, T, "-o", "out", "-q"), 1, r"out.*disk full", "full disk while safetensors' own "
         "writer writes the PEFT folder (RLIMIT_FSIZE 4 KiB)", fsize=4096),
    # -- resize
    Case("resize-no-rule", ("resize", P, "-o", "out.safetensors"), 2, r"--rank", "no rank option"),
    Case("resize-missing-factor", ("resize", "{in}/missing_b", "-o", "out.safetensors", "-r", "2", "-q"), 1,
         Q + r".*lora_B", "adapter with lora_A but no lora_B"),
    Case("resize-mismatched-factors", ("resize", "{in}/mismatch", "-o", "out.safetensors", "-r", "2", "-q"), 1,
         Q + r".*\(32, 3\)", "lora_A (4, 32) with lora_B (32, 3)"),
    Case("resize-nan-adapter", ("resize", "{in}/nan_adapter", "-o", "out.safetensors", "-r", "2", "-q"), 1,
         Q + r".*NaN", "NaN factors"),
    Case("resize-zero-rank", ("resize", "{in}/zero_rank", "-o", "out.safetensors", "-r", "2", "-q"), 1,
         Q + r".*rank 0|zero_rank", "rank-0 module (zero-size factors)"),
    # -- merge
    Case("merge-weight-text", ("merge", f"{K}:x", "-o", "out.safetensors"), 2, r"kohya\.safetensors:x.*'x'",
         "merge weight a.safetensors:x"),
    Case("merge-shapes-differ", ("merge", P, "{in}/other_base", "-o", "out.safetensors", "-q"), 1,
         Q + r".*other_base", "adapters disagreeing on a module's shape"),
    Case("merge-bad-config", ("merge", P, "{in}/badconfig", "-o", "out.safetensors", "-q"), 1,
         r"badconfig.*adapter_config\.json.*JSON", "adapter_config.json that is not JSON"),
    # -- apply
    Case("apply-other-base", ("apply", B, "{in}/other_base", "-o", "model.safetensors", "-q"), 1,
         Q + r".*another model", "adapter made for another base (shapes)"),
    Case("apply-other-names", ("apply", B, "{in}/other_names", "-o", "model.safetensors", "-q"), 1,
         r"layers\.7\.self_attn\.k_proj.*not in base", "adapter made for another base (names)"),
    Case("apply-nan-adapter", ("apply", B, "{in}/nan_adapter", "-o", "model.safetensors", "-q"), 1, Q + r".*NaN",
         "NaN factors"),
    Case("apply-shard-size", ("apply", B, P, "-o", "model", "--shard-size", "5XB"), 2, r"5XB", "--shard-size 5XB"),
    Case("apply-full-disk", ("apply", "{in}/big.safetensors", "{in}/big_adapter", "-o", "model.safetensors", "-q"), 1,
         r"model\.safetensors.*(disk full|File too large)", "full disk (RLIMIT_FSIZE 256 KiB)", fsize=256 * 1024),
    # -- analyze
    Case("analyze-three-paths", ("analyze", B, T, P), 2, r"3 paths", "three paths"),
    Case("analyze-top", ("analyze", B, T, "--top", "0"), 2, r"--top.*0", "--top 0"),
    Case("analyze-nan", ("analyze", B, "{in}/nan.safetensors", "-q"), 1, Q + r".*NaN", "NaN in a tuned weight"),
    Case("analyze-json-exists", ("analyze", P, "--json", "a.json", "-q"), 1, r"a\.json exists",
         "--json exists, no --force", files={"a.json": "{}\n"}),
    Case("analyze-plot-is-file", ("analyze", P, "--plot", "{in}/plain.txt", "--force", "-q"), 1, r"plain\.txt",
         "--plot names a regular file"),
    # -- convert
    Case("convert-int-factors", ("convert", "{in}/int_adapter", "-o", "out.safetensors", "--format", "kohya"), 1,
         Q + r".*int32", "integer factors"),
    Case("convert-kohya-name", ("convert", P, "-o", "out", "--format", "kohya"), 2, r"out.*\.safetensors",
         "kohya output not named .safetensors"),
    # -- info
    Case("info-checkpoint", ("info", B), 1, r"base\.safetensors.*adapter layout", "a checkpoint, not an adapter"),
    Case("info-pickle-object", ("info", "{in}/evil.bin"), 1, r"evil\.bin.*safetensors", "pickle holding an object"),
    # -- demo
    Case("demo-seconds-nan", ("demo", "--seconds", "nan"), 2, r"--seconds.*nan", "--seconds nan"),
    Case("demo-output-exists", ("demo", "-o", "d", "--seconds", "1", "-q"), 1, r"d exists.*--force",
         "-o exists, no --force", files={"d": "keep\n"}),
    # -- the group
    Case("unknown-command", ("extrct", B, T), 2, r"extrct", "misspelled command"),
]


# ---------------------------------------------------------------------------------------------- running


def _snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256 | 'dir' | 'fifo' ...} of everything under ``folder`` (FIFOs are never opened)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        mode = path.lstat().st_mode
        if stat.S_ISREG(mode):
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[str(path.relative_to(folder))] = "dir" if stat.S_ISDIR(mode) else oct(stat.S_IFMT(mode))
    return out


def _limit(fsize: int | None):
    if fsize is None:
        return None

    def limit() -> None:  # in the child, before exec: writes past fsize fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return limit


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]
    inputs_before: dict[str, str]
    inputs_after: dict[str, str]
    seconds: float = 0.0


def run_case(case: Case, inp: Path, work: Path) -> Outcome:
    cwd = work / case.id
    cwd.mkdir()
    for name, text in case.files.items():
        (cwd / name).write_text(text)
    args = [a.replace("{in}", str(inp)) for a in case.args]
    before, inputs_before = _snapshot(cwd), _snapshot(inp)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "lowrank_tools", *args], cwd=cwd, capture_output=True,
                              text=True, timeout=TIMEOUT, env=env, preexec_fn=_limit(case.fsize))
    except subprocess.TimeoutExpired as exc:  # killed: reported as a failure of this case, not of the battery
        proc = subprocess.CompletedProcess(exc.cmd, -9, str(exc.stdout or ""), f"timed out after {TIMEOUT} s")
    took = time.perf_counter() - start
    return Outcome(proc.returncode, proc.stdout, proc.stderr, before, _snapshot(cwd), inputs_before, _snapshot(inp),
                   took)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("battery")
    inp, work = root / "in", root / "work"
    inp.mkdir()
    work.mkdir()
    build_inputs(inp)
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {case.id: pool.submit(run_case, case, inp, work) for case in CASES}
        results = {name: f.result() for name, f in futures.items()}
    assert not (root / "pwned").exists(), "a pickle ran code"
    if os.environ.get("LRT_BATTERY_TABLE"):
        write_table(results, str(inp))
    return results


def _error_lines(outcome: Outcome) -> list[str]:
    return [line for line in outcome.stderr.splitlines() if line.strip()]


def write_table(results: dict[str, Outcome], inp: str) -> None:
    rows = ["# Bad-input battery", "", "Generated by `LRT_BATTERY_TABLE=1 pytest tests/test_battery.py`: every case, "
            "the exit status and the one line it printed on stderr (`<in>` is the inputs folder).", "",
            "| case | bad input | command | exit | s | stderr |", "|---|---|---|---|---|---|"]
    for case in CASES:
        got = results[case.id]
        line = " / ".join(_error_lines(got)).replace(inp, "<in>").replace("|", "\\|")
        command = " ".join(case.args).replace("{in}", "<in>").replace("|", "\\|")
        rows.append(f"| {case.id} | {case.what} | `lowrank-tools {command}` | {got.code} | {got.seconds:.1f} | {line} |")
    TABLE.write_text("\n".join(rows) + "\n")


def test_case_ids_are_unique_and_many():
    assert len({c.id for c in CASES}) == len(CASES) >= 30
    commands = {c.args[0] for c in CASES}
    assert {"extract", "resize", "merge", "apply", "analyze", "convert", "info", "demo"} <= commands


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, outcomes):
    got = outcomes[case.id]
    shown = f"exit {got.code}\nstderr:\n{got.stderr}\nstdout:\n{got.stdout}"
    assert "Traceback" not in got.stderr + got.stdout, shown
    assert got.code == case.code, shown
    lines = _error_lines(got)
    assert len(lines) == 1, shown
    assert lines[0].startswith("Error: "), shown
    assert got.stdout.strip() == "", shown
    assert re.search(case.names, lines[0]), f"{case.names!r} not in {lines[0]!r}"
    assert got.after == got.before, f"the working folder changed: {shown}"
    assert got.inputs_after == got.inputs_before, "an input changed"


# ---------------------------------------------------------------------------------------------- unreadable, for real


def test_unreadable_file_names_it(tmp_path, monkeypatch):
    """A file the user may not read (chmod 000 as non-root; simulated under root, where chmod does not stop reads)."""
    from lowrank_tools.io.checkpoint import open_checkpoint
    from lowrank_tools.errors import NotACheckpoint

    path = tmp_path / "locked.safetensors"
    save_file({"a.weight": torch.ones(2, 2)}, str(path))
    path.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: make open() refuse as it would for anyone else
        real_open = open

        def refuse(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(NotACheckpoint, match=r"locked\.safetensors cannot be read \(Permission denied\)"):
        open_checkpoint(path)


def test_quantized_base_is_refused_too(tmp_path):
    """int8 in the base (tuned float) would give a meaningless delta: refused, naming the base file and tensor."""
    from lowrank_tools import RankRule, extract
    from lowrank_tools.errors import UnsupportedTensor

    base, tuned = make_pair(LLAMA_SHAPES, k=2)
    save_file({k: (v * 40).to(torch.int8) if v.ndim == 2 else v for k, v in base.items()},
              str(tmp_path / "int8-base.safetensors"))
    with pytest.raises(UnsupportedTensor, match=r"in .*int8-base\.safetensors is int8 \(\d+, \d+\): .*dequantize"):
        extract(tmp_path / "int8-base.safetensors", tuned, rule=RankRule(rank=2))
    done = extract(tmp_path / "int8-base.safetensors", tuned, rule=RankRule(rank=2), exclude=[r"\."])  # escape hatch
    assert done.adapter.modules == {}

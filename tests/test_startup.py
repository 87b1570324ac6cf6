"""Startup cost (issue 16): a command imports only what it needs. ``--help`` imports neither torch nor the library
below the command line; ``info`` reads an adapter without the SVD machinery or the other operations. Each case runs
in a fresh interpreter (``sys.modules`` of this one already holds everything) and lists what was imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowrank_tools.cli import COMMANDS

COMMAND_NAMES = [command.name for command in COMMANDS]  # every command, a new one included
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]

# Runs the command line in-process, then prints the imported modules' names as JSON on the last line of stderr.
CHILD = """
import json, sys
from lowrank_tools.cli import main
try:
    main(sys.argv[1:], prog_name="lowrank-tools")
except SystemExit as exc:
    code = exc.code
import os
print(json.dumps({"code": code, "modules": sorted(sys.modules), "policy": os.environ.get("OMP_WAIT_POLICY")}),
      file=sys.stderr)
"""

HEAVY = ("torch", "numpy", "safetensors", "lowrank_tools.adapter", "lowrank_tools.io", "lowrank_tools.linalg",
         "lowrank_tools.extract", "lowrank_tools.analyze", "lowrank_tools.evaluate")
MACHINERY = ("lowrank_tools.linalg.sketch", "lowrank_tools.linalg.svd", "lowrank_tools.extract",
             "lowrank_tools.analyze", "lowrank_tools.evaluate", "lowrank_tools.resize", "lowrank_tools.merge",
             "lowrank_tools.apply")


def _child(*args: str, **env: str) -> dict:
    """The child's exit code, imported modules and OMP_WAIT_POLICY after the command; ``env`` replaces the
    OpenMP variables of this process's environment."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env = {**base, **env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    return json.loads(proc.stderr.strip().splitlines()[-1])


def _imported(*args: str) -> tuple[int, set[str]]:
    record = _child(*args)
    return record["code"], set(record["modules"])


def _loaded(modules: set[str], prefix: str) -> bool:
    return prefix in modules or any(m.startswith(prefix + ".") for m in modules)


@pytest.mark.parametrize("args", [("--help",), *((name, "--help") for name in sorted(COMMAND_NAMES)), ("--version",)],
                         ids=lambda a: " ".join(a))
def test_help_imports_neither_torch_nor_the_library(args):
    code, modules = _imported(*args)
    assert code == 0
    assert not [name for name in HEAVY if _loaded(modules, name)]


def _small_adapter(path: Path) -> Path:
    tensors = {}
    for i in range(2):
        tensors[f"lora_unet_blk{i}_proj.lora_down.weight"] = torch.randn(4, 16)
        tensors[f"lora_unet_blk{i}_proj.lora_up.weight"] = torch.randn(16, 4)
        tensors[f"lora_unet_blk{i}_proj.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))
    return path


def test_info_reads_an_adapter_without_the_svd_machinery(tmp_path):
    code, modules = _imported("info", str(_small_adapter(tmp_path / "small.safetensors")), "--json")
    assert code in (0, None)
    assert "lowrank_tools.io.formats" in modules  # it did read the adapter (the check below is not vacuous)
    assert not [name for name in MACHINERY if _loaded(modules, name)]


def test_the_cli_choices_match_the_library_enums():
    """The command line spells its choices out (so --help needs no torch); they must stay those of the library."""
    from lowrank_tools.cli import options
    from lowrank_tools.io.formats import AdapterFormat
    from lowrank_tools.linalg.svd import Device, Method

    assert list(options.FORMATS.choices) == [f.value for f in AdapterFormat]
    assert list(options.DEVICES.choices) == [d.value for d in Device]
    assert list(options.METHODS.choices) == [m.value for m in Method]
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in options.DTYPES)
    assert options.out_dtype("bfloat16") is torch.bfloat16 and options.out_dtype("auto") is None


def test_lazy_exports_answer_what_they_name():
    """Every name in a lazy ``__all__`` resolves, and the package's functions are not shadowed by their modules."""
    import importlib

    import lowrank_tools
    from lowrank_tools.apply import apply
    from lowrank_tools.extract.streaming import extract
    from lowrank_tools.merge import merge
    from lowrank_tools.resize import resize

    for package in ("lowrank_tools", "lowrank_tools.io", "lowrank_tools.linalg"):
        module = importlib.import_module(package)
        assert all(getattr(module, name) is not None for name in module.__all__)
        assert set(module.__all__) <= set(dir(module))
        assert set(module._EXPORTS) <= set(module.__all__)  # nothing lazy that is not public
    assert (lowrank_tools.extract, lowrank_tools.apply, lowrank_tools.merge, lowrank_tools.resize) == (
        extract, apply, merge, resize)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        lowrank_tools.nothing  # noqa: B018


# --- the OpenMP wait policy (cli/threads.py) ----------------------------------------------------------------------


def test_the_wait_policy_is_set_before_torch_and_never_over_the_users():
    from lowrank_tools.cli.threads import WAIT_POLICY, set_wait_policy

    environ: dict[str, str] = {}
    assert set_wait_policy(environ, modules={}) == WAIT_POLICY and environ == WAIT_POLICY
    for knob in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):  # the user's own choice stands
        environ = {knob: "ACTIVE" if knob == "OMP_WAIT_POLICY" else "300000", "OMP_NUM_THREADS": "2"}
        assert set_wait_policy(environ, modules={}) == {} and "PASSIVE" not in environ.values()
    environ = {}
    assert set_wait_policy(environ, modules={"torch": object()}) == {} and environ == {}  # too late: nothing set
    environ = {"OMP_NUM_THREADS": "3"}
    set_wait_policy(environ, modules={})
    assert environ["OMP_NUM_THREADS"] == "3"


def test_a_command_runs_with_the_wait_policy_unless_the_user_set_one(tmp_path):
    adapter = str(_small_adapter(tmp_path / "small.safetensors"))
    run = _child("info", adapter)
    assert run["code"] in (0, None) and "torch" in run["modules"] and run["policy"] == "PASSIVE"
    assert _child("info", adapter, OMP_WAIT_POLICY="active")["policy"] == "active"


def test_a_command_raises_the_collectors_threshold():
    import gc

    from click.testing import CliRunner

    from lowrank_tools.cli import main
    from lowrank_tools.cli.threads import GC_FIRST_GENERATION

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, *before[1:])
        assert CliRunner().invoke(main, ["--help"]).exit_code == 0
        assert gc.get_threshold() == (GC_FIRST_GENERATION, *before[1:])
    finally:
        gc.set_threshold(*before)


def test_the_process_skips_the_final_collection_and_a_test_runner_does_not(tmp_path):
    """The command line's own process freezes every object at its end (the interpreter's last collection would walk
    torch's objects: 0.3 s); a call with explicit arguments (a test runner's) leaves the collector alone."""
    import gc

    from click.testing import CliRunner

    from lowrank_tools.cli import main

    adapter = str(_small_adapter(tmp_path / "small.safetensors"))
    probe = ("import atexit, gc, sys\n"
             "atexit.register(lambda: print('frozen', gc.get_freeze_count(), file=sys.stderr))\n"
             "sys.argv = ['lowrank-tools', 'info', sys.argv[1]]\n"
             "from lowrank_tools.cli import main\nmain()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", probe, adapter], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "small.safetensors" in proc.stdout
    assert int(proc.stderr.strip().splitlines()[-1].split()[-1]) > 10_000  # torch's objects, frozen at the end
    before = gc.get_freeze_count()
    assert CliRunner().invoke(main, ["info", adapter]).exit_code == 0
    assert gc.get_freeze_count() == before


def _llama_folder(folder: Path) -> Path:
    """A tied Llama-shaped HF folder (one block) and a fine-tune of it beside: ``folder/base``, ``folder/tuned``."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64,
           "tie_word_embeddings": True}
    shapes = {"model.embed_tokens.weight": (64, 16), "model.norm.weight": (16,),
              **{f"model.layers.0.self_attn.{p}_proj.weight": (16 if p in "qo" else 8, 16) for p in "qkvo"},
              **{f"model.layers.0.mlp.{p}_proj.weight": ((32, 16) if p != "down" else (16, 32))
                 for p in ("gate", "up", "down")}}
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for name, tensors in (("base", base), ("tuned", {k: v + 0.01 * torch.randn(v.shape, generator=g)
                                                     for k, v in base.items()})):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(cfg))
        save_file(tensors, str(folder / name / "model.safetensors"))
    return folder


def test_extract_of_a_plain_llm_never_imports_transformers(tmp_path):
    """Module names, tied heads, task type, grouped convs and hidden wrappers are known for plain model types
    (io/model_config.PLAIN_MODEL_TYPES) without building the class: importing transformers alone costs ~2.4 s, as
    long as the whole extract of a 135M model."""
    pair = _llama_folder(tmp_path)
    code, modules = _imported("extract", str(pair / "base"), str(pair / "tuned"), "-o", str(tmp_path / "out"),
                              "--rank", "2", "-q")
    assert code in (0, None)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()  # it did extract (the check is not vacuous)
    assert not _loaded(modules, "transformers") and not _loaded(modules, "peft")

"""One contract across commands (issue 12): help and defaults, -o decides the format, what kohya cannot hold,
--include/--exclude, info --modules, table names, adapter_config.json task_type and base path, demo rerun."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import LLAMA_SHAPES, make_pair
from lowrank_tools.adapter import Adapter, LoraModule, ModuleKind
from lowrank_tools.cli import main
from lowrank_tools.io.formats import describe_modules, load_adapter, output_format, save_adapter
from lowrank_tools.io.base_model import base_model_reference, task_type
from lowrank_tools.report import LayerRecord, Report, format_table, short_name, summarize

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = sorted(main.commands)
KEEP_PATHS = {"--include", "--exclude"}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _options(command: click.Command):
    return [p for p in command.params if isinstance(p, click.Option) and p.name not in ("help",)]


# ----------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_and_shows_its_default(name):
    command = main.commands[name]
    ctx = click.Context(command)
    for opt in _options(command):
        assert opt.help and opt.help.strip(), f"{name} {opt.opts}: no help text"
        default = opt.get_default(ctx, call=False)
        unset = default is None or repr(default) == "Sentinel.UNSET"  # click >= 8.3 marks "no default" so
        if not opt.is_flag and not opt.required and not opt.multiple and not unset:
            assert opt.show_default, f"{name} {opt.opts}: default {opt.default!r} not shown"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_ends_with_examples(name):
    result = run(name, "--help")
    assert result.exit_code == 0, result.output
    tail = result.output.rstrip().split("Examples:")
    assert len(tail) == 2, result.output
    examples = [line.strip() for line in tail[1].strip().splitlines()]
    assert 2 <= len(examples) <= 3 and all(line.startswith(f"lowrank-tools {name}") for line in examples), examples


def test_hidden_defaults_are_shown():
    shown = {"extract": ["[default: (16 without --budget)]", "[default: 10; x>=0]", "[default: 4; x>=0]",
                         "[default: auto]"],
             "convert": ["[default: (from -o)]", "[default: auto]"],
             "analyze": ["[default: (K); x>=0]", "[default: auto]"],
             "apply": ["[default: (5GB)]"]}
    for name, needles in shown.items():
        text = " ".join(run(name, "--help").output.split())
        for needle in needles:
            assert needle in text, f"{name}: {needle}"


def test_device_defaults_to_auto_everywhere():
    having = [name for name in COMMANDS if any(o.name == "device" for o in _options(main.commands[name]))]
    assert set(having) >= {"extract", "resize", "merge", "apply", "analyze"}
    for name in having:
        assert next(o for o in _options(main.commands[name]) if o.name == "device").default == "auto", name


def test_seed_only_where_it_acts():
    with_seed = {name for name in COMMANDS if any(o.name == "seed" for o in _options(main.commands[name]))}
    assert with_seed == {"extract", "analyze", "demo", "evaluate"}  # evaluate: the in-memory extraction of its curves
    for name in ("resize", "merge", "apply"):
        result = run(name, "x", "-o", "y", "--seed", "1")
        assert result.exit_code == 2 and "--seed" in result.output, result.output


def test_every_adapter_reader_takes_include_exclude():
    for name in ("convert", "info", "resize", "merge", "apply", "analyze"):
        assert KEEP_PATHS <= {o.opts[0] for o in _options(main.commands[name])}, name


def test_command_list_is_one_line_each_never_cut():
    result = CliRunner().invoke(main, ["--help"], terminal_width=80)
    listing = result.output.split("Commands:")[1].strip().splitlines()
    assert len(listing) == len(COMMANDS), listing  # no wrapped line
    for line in listing:
        assert not line.rstrip().endswith("..."), line


# ------------------------------------------------------------------------------------------ -o decides


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Base and tuned checkpoints with an embedding, and the PEFT adapter extracted from them (embedding kept)."""
    folder = tmp_path_factory.mktemp("contract")
    base, tuned = make_pair({**LLAMA_SHAPES, "model.embed_tokens.weight": (40, 32)}, k=3)
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    result = run("extract", folder / "base.safetensors", folder / "tuned.safetensors", "-o", folder / "adapter",
                 "-r", 3, "-q")
    assert result.exit_code == 0, result.output
    assert load_adapter(folder / "adapter").modules["model.embed_tokens"].kind is ModuleKind.EMBEDDING
    return folder


def _command(name: str, folder: Path, out: Path, *more) -> list:
    adapter = folder / "adapter"
    return {"extract": ["extract", folder / "base.safetensors", folder / "tuned.safetensors", "-o", out, "-r", 3],
            "convert": ["convert", adapter, "-o", out],
            "resize": ["resize", adapter, "-o", out, "-r", 2],
            "merge": ["merge", adapter, f"{adapter}:0.5", "-o", out]}[name] + list(more)


FORMAT_CASES = [("x.safetensors", (), "kohya"), ("x", (), "peft"), ("x.safetensors", ("--format", "kohya"), "kohya"),
                ("x", ("--format", "peft"), "peft"), ("x.safetensors", ("--format", "peft"), "a PEFT adapter is a folder"),
                ("x", ("--format", "kohya"), "a kohya adapter is one file")]


@pytest.mark.parametrize("name", ["extract", "convert", "resize", "merge"])
def test_output_name_decides_the_format_the_same_way(inputs, tmp_path, name):
    for i, (target, flags, expected) in enumerate(FORMAT_CASES):
        out = tmp_path / str(i) / target
        result = run(*_command(name, inputs, out, *flags, "-q"))
        if expected in ("kohya", "peft"):
            assert result.exit_code == 0, (target, flags, result.output)
            assert out.is_file() if expected == "kohya" else (out / "adapter_config.json").is_file(), (target, flags)
            assert load_adapter(out).source_format == ("kohya" if expected == "kohya" else "peft")
        else:
            assert result.exit_code == 2 and expected in result.output, (target, flags, result.output)
            assert not out.exists() and not out.parent.exists()
        if expected in ("kohya", "peft"):  # the library's rule is the same function
            assert output_format(out, flags[1] if flags else None).value == expected
        else:
            with pytest.raises(Exception, match=expected):
                output_format(out, flags[1])


def test_library_save_adapter_follows_the_same_rule(tmp_path):
    adapter = Adapter(modules={"q": LoraModule(B=torch.ones(4, 2), A=torch.ones(2, 4), alpha=2)})
    assert save_adapter(adapter, tmp_path / "k.safetensors").is_file()  # kohya, decided by the name
    assert (save_adapter(adapter, tmp_path / "p") / "adapter_config.json").is_file()
    with pytest.raises(Exception, match="a PEFT adapter is a folder"):
        save_adapter(adapter, tmp_path / "p.safetensors", format="peft")


# ------------------------------------------------------------------------------- what kohya cannot hold


WARNING = ("warning: left out 1 module(s) a kohya file cannot hold (embeddings, tensors saved whole): model.embed_tokens; "
           "keep them with --format peft and an -o folder name\n")


@pytest.mark.parametrize("name", ["extract", "convert", "resize", "merge"])
def test_embedding_left_out_of_kohya_alike_and_before_the_work(inputs, tmp_path, name, monkeypatch):
    """Same warning in all four, the output written without it, and the operation never sees the embedding."""
    import importlib

    extract_module, merge_module, resize_module = (importlib.import_module(f"lowrank_tools.{m}")
                                                   for m in ("extract.streaming", "merge", "resize"))

    seen = []
    for module, attr in [(resize_module, "resize"), (merge_module, "merge")]:
        real = getattr(module, attr)

        def spy(inp, *a, _real=real, **k):
            adapters = [inp] if isinstance(inp, Adapter) else [w.adapter for w in inp]
            seen.extend(n for a_ in adapters for n in a_.modules)
            return _real(inp, *a, **k)

        monkeypatch.setattr(module, attr, spy)
    real_plan = extract_module.plan_layers

    def plan_spy(*a, **k):
        plan = real_plan(*a, **k)
        seen.extend(plan.layers)
        return plan

    monkeypatch.setattr(extract_module, "plan_layers", plan_spy)
    out = tmp_path / "k.safetensors"
    result = run(*_command(name, inputs, out, *(["--report", tmp_path / "r.json"] if name != "convert" else [])))
    assert result.exit_code == 0, result.output
    assert WARNING in result.output
    first = result.output.index(WARNING)
    assert all(result.output.find(word) in (-1,) or result.output.find(word) > first
               for word in ("100%", "wrote"))  # the warning comes before the bar and the result
    assert not any("embed_tokens" in n for n in seen), seen
    with safe_open(str(out), "pt") as f:
        assert not any("embed" in k for k in f.keys()) and any("q_proj" in k for k in f.keys())
    if name != "convert":
        skipped = json.loads((tmp_path / "r.json").read_text())["skipped"]
        assert any("model.embed_tokens" in n for names in skipped.values() for n in names), skipped


def test_only_an_embedding_to_kohya_is_one_line_error_nothing_written(tmp_path):
    emb = LoraModule(B=torch.ones(6, 2), A=torch.ones(2, 20), alpha=2, kind=ModuleKind.EMBEDDING)
    save_adapter(Adapter(modules={"model.embed_tokens": emb}), tmp_path / "in")
    for command in (["convert"], ["resize", "-r", "1"], ["merge"]):
        result = run(command[0], tmp_path / "in", "-o", tmp_path / "k.safetensors", *command[1:])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert not (tmp_path / "k.safetensors").exists()


def test_convert_include_exclude(inputs, tmp_path):
    result = run("convert", inputs / "adapter", "-o", tmp_path / "out", "--include", r"self_attn",
                 "--exclude", "v_proj", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(load_adapter(tmp_path / "out").modules) == ["model.layers.0.self_attn.q_proj"]


# ------------------------------------------------------------------------------------------------ info


def test_info_modules_text_and_json(inputs):
    adapter = load_adapter(inputs / "adapter")
    result = run("info", inputs / "adapter", "--modules")
    assert result.exit_code == 0, result.output
    table = result.output.split("modules in file order")[1].strip().splitlines()
    assert table[0].split() == ["module", "kind", "rank", "alpha", "shape", "params"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert set(rows) == set(adapter.modules)
    assert rows["model.embed_tokens"][1:5] == ["embedding", "3", "3", "40x32"]
    assert rows["model.layers.0.mlp.up_proj"][1:5] == ["linear", "3", "3", "48x32"]
    data = json.loads(run("info", inputs / "adapter", "--modules", "--json").output)
    assert data["module_list"] == describe_modules(adapter) and data["modules"] == len(adapter.modules)
    assert {r["name"]: (r["kind"], r["rank"], r["shape"]) for r in data["module_list"]}["model.embed_tokens"] == \
        ("embedding", 3, [40, 32])
    plain = json.loads(run("info", inputs / "adapter", "--json").output)
    assert "module_list" not in plain
    only = json.loads(run("info", inputs / "adapter", "--json", "--modules", "--include", "mlp").output)
    assert sorted(r["name"] for r in only["module_list"]) == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"]
    quiet = run("info", inputs / "adapter", "-q")
    assert quiet.exit_code == 0 and "format: peft" in quiet.output


def test_info_notes_are_warnings_that_q_drops(tmp_path):
    m = LoraModule(B=torch.ones(8, 2), A=torch.ones(2, 8), alpha=2)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": m.A,
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": m.B}, str(tmp_path / "k.safetensors"))
    loud, quiet = run("info", tmp_path / "k.safetensors"), run("info", tmp_path / "k.safetensors", "-q")
    assert loud.exit_code == quiet.exit_code == 0
    notes = load_adapter(tmp_path / "k.safetensors").notes
    if notes:  # names guessed from the diffusers naming
        assert "warning:" in loud.output and "warning:" not in quiet.output


# ------------------------------------------------------------------------------------------------ tables


def test_short_name_keeps_block_index_and_leaf():
    name = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    assert short_name(name, 40) == "down_blocks.1.attentions.0...ff.net.2"
    short = short_name("base_model.model.model.layers.10.self_attn.q_proj", 40)
    assert short == "base_model...layers.10.self_attn.q_proj"
    assert short_name("model.layers.3.mlp.down_proj", 48) == "model.layers.3.mlp.down_proj"  # fits: unchanged


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"[a-z_]{1,14}", fullmatch=True),
       st.lists(st.one_of(st.from_regex(r"[a-z_]{1,14}", fullmatch=True), st.integers(0, 99).map(str)), max_size=12),
       st.integers(12, 60))
def test_short_name_property(first, rest, width):
    """Fits the width, starts and ends as the name does, and keeps the first block index whenever it can."""
    parts = [first, *rest]
    name = ".".join(parts)
    short = short_name(name, width)
    if len(name) <= width:
        assert short == name
        return
    assert len(short) <= width and not short.startswith("...")
    assert short[0] == name[0] and short[-1] == name[-1]
    index = next((i for i, p in enumerate(parts) if p.isdigit() and i > 0), None)
    kept = ".".join(parts[index - 1:index + 1]) if index is not None else None
    essential = len(parts[0]) + (len(kept) + 3 if kept else 0) + len(parts[-1]) + 3 + (len(parts[-2]) + 1 if len(parts) > 1 else 0)
    if kept and essential <= width:
        assert kept in short and short.endswith(parts[-1]), (name, short)


def test_report_table_states_its_order_and_shortens_in_the_middle():
    names = [f"unet.down_blocks.{i}.attentions.0.transformer_blocks.0.attn1.to_q" for i in range(3)]
    records = [LayerRecord(name=n, shape=(8, 8), rank=2, delta_norm=1.0 + i, singular_values=[], retained_energy=0.9,
                           rel_error=0.1) for i, n in enumerate(names)]
    text = format_table(Report(command="extract", layers=records, summary=summarize(records)))
    lines = text.splitlines()
    assert "sorted by" in lines[0] and "largest first" in lines[0]
    assert lines[2].startswith("unet.down_blocks.2.attentions.0...")  # worst first, block index kept
    assert all(f"down_blocks.{i}." in text for i in range(3))


def test_analyze_table_states_its_order(inputs):
    result = run("analyze", inputs / "base.safetensors", inputs / "tuned.safetensors", "-q")
    assert result.exit_code == 0 and result.output == ""  # -q: nothing
    loud = run("analyze", inputs / "base.safetensors", inputs / "tuned.safetensors")
    assert "layers sorted by r90" in loud.output and "by depth (blocks in index order" in loud.output


# ------------------------------------------------------------------------------------ adapter_config.json


@pytest.mark.parametrize("arch, enc_dec, expected", [
    ("LlamaForCausalLM", False, "CAUSAL_LM"), ("GPT2LMHeadModel", False, "CAUSAL_LM"),
    ("BertForSequenceClassification", False, "SEQ_CLS"), ("BertForTokenClassification", False, "TOKEN_CLS"),
    ("BertForQuestionAnswering", False, "QUESTION_ANS"), ("T5ForConditionalGeneration", True, "SEQ_2_SEQ_LM"),
    ("BartForConditionalGeneration", True, "SEQ_2_SEQ_LM"), ("MarianMTModel", True, "SEQ_2_SEQ_LM"),
    ("LlavaForConditionalGeneration", False, None), ("BertModel", False, "FEATURE_EXTRACTION"),
    ("BertForMaskedLM", False, None), ("FooForSeq2SeqLM", True, "SEQ_2_SEQ_LM"),
    ("WhisperForConditionalGeneration", True, None),  # reads input_features: a plain PeftModel passes it through
    ("Speech2TextForConditionalGeneration", True, None)])
def test_task_type_from_architectures(arch, enc_dec, expected):
    assert task_type({"architectures": [arch], "is_encoder_decoder": enc_dec}) == expected


def test_task_type_unknown_is_none():
    assert task_type(None) is None and task_type({}) is None
    assert task_type({"architectures": ["BertForMaskedLM", "BertForSequenceClassification"]}) is None


def test_base_model_reference(tmp_path, monkeypatch):
    base = tmp_path / "base"
    base.mkdir()
    monkeypatch.chdir(tmp_path)
    assert base_model_reference({"_name_or_path": "meta-llama/Llama-2-7b-hf"}, "base") == "meta-llama/Llama-2-7b-hf"
    for local in ("", "/data/models/llama", "./llama", "base", "llama", None):
        assert base_model_reference({"_name_or_path": local}, "base") == str(base), local
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()  # a relative folder that looks like a hub id is a local path
    assert base_model_reference({"_name_or_path": "org/name"}, "base") == str(base)
    assert base_model_reference(None, None) is None


@pytest.mark.slow
def test_auto_peft_model_loads_from_another_folder(tmp_path, monkeypatch):
    """A tiny Llama saved with save_pretrained, extracted with relative paths, loaded elsewhere by
    AutoPeftModelForCausalLM: the merged weights are the tuned ones (rank-2 deltas, rank 4 kept)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    model.save_pretrained(work / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "proj" in name:
                p += 0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g)
    model.save_pretrained(work / "tuned")
    tuned = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.chdir(work)
    result = run("extract", "base", "tuned", "-o", "adapter", "-r", 4, "--include", "proj", "-q")
    assert result.exit_code == 0, result.output
    adapter_config = json.loads((work / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM"
    assert adapter_config["base_model_name_or_path"] == str(work / "base")
    monkeypatch.chdir(elsewhere)
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(work / "adapter"))
    merged = loaded.merge_and_unload().state_dict()
    for name, weight in tuned.items():
        if weight.ndim == 2 and "proj" in name:
            assert torch.allclose(merged[name], weight, atol=1e-5), name


# ------------------------------------------------------------------------------------------------ demo


def test_demo_output_is_ignored_and_a_rerun_says_how(tmp_path, monkeypatch):
    assert "lowrank-demo/" in (ROOT / ".gitignore").read_text().splitlines()
    default = next(o for o in main.commands["demo"].params if o.name == "out_dir").default
    assert str(default) == "lowrank-demo"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lowrank-demo").mkdir()
    result = run("demo", "-q")
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert "rerun with --force" in line and "lowrank-demo exists" in line
    assert "choose another -o" not in line and "-o lowrank-demo" not in line


# ------------------------------------------------------------------------------------------- summaries


def test_every_summary_field_is_documented(inputs, tmp_path):
    """Each key of the summaries extract, resize, merge and analyze write is in the README's table of them."""
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", readme.split("### Report summary fields")[1], re.M))
    adapter = inputs / "adapter"
    runs = {"extract": ["extract", inputs / "base.safetensors", inputs / "tuned.safetensors", "-o", tmp_path / "e",
                        "--budget", 2000],
            "resize": ["resize", adapter, "-o", tmp_path / "r", "--budget", 500],
            "merge": ["merge", adapter, f"{adapter}:0.5", "-o", tmp_path / "m", "-r", 2]}
    keys = set()
    for name, args in runs.items():
        result = run(*args, "-q", "--report", tmp_path / f"{name}.json")
        assert result.exit_code == 0, result.output
        keys |= set(json.loads((tmp_path / f"{name}.json").read_text())["summary"])
    result = run("analyze", inputs / "base.safetensors", inputs / "tuned.safetensors", "-q", "--json",
                 tmp_path / "a.json")
    assert result.exit_code == 0, result.output
    keys |= set(json.loads((tmp_path / "a.json").read_text())["summary"])
    assert keys - documented == set(), f"undocumented summary fields: {sorted(keys - documented)}"

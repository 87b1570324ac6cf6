"""``extract`` records the base's diffusers class (its ``model_index.json`` or a lone component's ``config.json``
``_class_name``) in the adapter's safetensors metadata, and ``check --for diffusers`` without ``--base`` judges by it
as it would by the base (:mod:`lowrank_tools.io.base_class`).

Tiny Sana and LTX-Video transformers (tests/zoo_models.py), models outside the name tables: on main before this
record (b17ae74, checked by stashing lowrank_tools/), ``check --for diffusers`` without ``--base`` judged both
adapters by the names' fallback ``StableDiffusionPipeline`` ("from the adapter's names; --base PIPELINE judges by the
base's own pipeline"), where test_check_without_base_judges_by_the_recorded_pipeline wants the pipeline: the PEFT file's
17 modules were all "dropped" (outside unet., text_encoder.) where the pipeline loads them all, and the kohya file got
1 problem where the pipeline's own loader drops 18 of Sana's modules (17 of LTX's)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zoo_models import SPECS, plant, save_model
from lowrank_tools.adapter import BaseClass
from lowrank_tools.check import check_adapter
from lowrank_tools.cli import main
from lowrank_tools.io.base_class import BASE_CLASS_KEY, base_class_from_metadata, base_class_metadata
from lowrank_tools.io.formats import load_adapter
from lowrank_tools.merge import merge

pytest.importorskip("diffusers")

OUTPUTS = {"kohya": "adapter.safetensors", "peft": "adapter"}


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def pipeline_pair(root, name: str):
    """(base, tuned) pipeline folders of SPECS[name]: ``model_index.json`` + its one component, the tuned one moved
    by a planted rank-2 delta."""
    spec = SPECS[name]
    model = spec.build()
    folders = []
    for which in ("base", "tuned"):
        if which == "tuned":
            plant(model, spec.plant)
        save_model(model, root / which / spec.prefix)
        index = {"_class_name": spec.pipeline, spec.prefix: ["diffusers", type(model).__name__]}
        (root / which / "model_index.json").write_text(json.dumps(index))
        folders.append(root / which)
    return folders


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = pipeline_pair(tmp_path_factory.mktemp(name), name)
        return made[name]
    return get


def extracted(base, tuned, out, fmt: str):
    run("extract", base, tuned, "-o", out, "--rank", "2", "--method", "exact", "--format", fmt, "-q")
    return out


def judged(path, base=None):
    """(the judge note, the diffusers verdict lines) of ``check --for diffusers``."""
    result = check_adapter(path, "diffusers", base=base)
    note = next(p.message for p in result.notes if p.code == "judge")
    return note, sorted(p.line() for p in result.problems if p.code.startswith("diffusers-"))


@pytest.mark.parametrize("fmt", sorted(OUTPUTS))
@pytest.mark.parametrize("name", ["sana", "ltx_video"])
def test_check_without_base_judges_by_the_recorded_pipeline(pairs, tmp_path, name, fmt):
    base, tuned = pairs(name)
    out = extracted(base, tuned, tmp_path / OUTPUTS[fmt], fmt)
    note, verdict = judged(out)
    with_base, verdict_with_base = judged(out, base)
    pipeline = SPECS[name].pipeline
    assert f"{pipeline}.lora_state_dict" in note and "recorded in the adapter at extract" in note, note
    assert f"{pipeline}.lora_state_dict" in with_base and str(base) in with_base
    assert verdict == verdict_with_base  # the same verdict lines as with --base
    assert load_adapter(out).base_class == BaseClass(pipeline, "model_index.json")
    assert verdict == [] if fmt == "peft" else len(verdict) > 10  # SanaPipeline / LTXPipeline drop our kohya names
    assert f"base_class: {pipeline} (model_index.json)" in run("info", out).output
    cli = CliRunner().invoke(main, ["check", str(out), "--for", "diffusers"])
    assert "recorded in the adapter at extract" in cli.output and "StableDiffusionPipeline" not in cli.output


def test_a_lone_component_records_its_class_and_is_judged_by_its_own_loader(pairs, tmp_path):
    base, tuned = pairs("sana")
    out = extracted(base / "transformer", tuned / "transformer", tmp_path / "lone", "peft")
    assert load_adapter(out).base_class == BaseClass("SanaTransformer2DModel", "config.json")
    note, verdict = judged(out)
    assert "SanaTransformer2DModel.lora_state_dict" in note and "load_lora_adapter(prefix=None)" in note, note
    assert "config.json as recorded in the adapter at extract" in note
    assert (note.split(" (from ")[0], verdict) == (judged(out, base / "transformer")[0].split(" (from ")[0], [])
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:  # the PEFT file records it too
        assert base_class_from_metadata(f.metadata()) == BaseClass("SanaTransformer2DModel", "config.json")


def test_the_record_survives_resize_convert_and_merge_of_one_class(pairs, tmp_path):
    base, tuned = pairs("sana")
    first = extracted(base, tuned, tmp_path / "first", "peft")
    want = BaseClass("SanaPipeline", "model_index.json")
    run("resize", first, "-o", tmp_path / "small", "--rank", "1", "-q")
    run("convert", tmp_path / "small", "-o", tmp_path / "k.safetensors", "-q")
    run("convert", tmp_path / "k.safetensors", "-o", tmp_path / "back", "--format", "peft", "-q")
    run("merge", f"{first}:0.5", f"{tmp_path / 'back'}:0.5", "-o", tmp_path / "merged", "-q")
    for out in ("small", "k.safetensors", "back", "merged"):
        assert load_adapter(tmp_path / out).base_class == want, out
        assert "recorded in the adapter at extract" in judged(tmp_path / out)[0], out


def test_a_merge_of_adapters_for_different_classes_records_none(pairs, tmp_path):
    sana = load_adapter(extracted(*pairs("sana"), tmp_path / "sana", "peft"))
    ltx = load_adapter(extracted(*pairs("ltx_video"), tmp_path / "ltx", "peft"))
    assert sana.base_class != ltx.base_class and None not in (sana.base_class, ltx.base_class)
    assert merge([sana, ltx]).adapter.base_class is None
    assert merge([sana, replace(sana, base_class=None)]).adapter.base_class is None  # one unknown: not guessed
    assert merge([sana, sana]).adapter.base_class == sana.base_class


def test_a_base_that_is_no_diffusers_model_records_nothing(tmp_path):
    model = SPECS["llama"].build()
    base = save_model(model, tmp_path / "base")
    plant(model, ".")
    tuned = save_model(model, tmp_path / "tuned")
    out = extracted(base, tuned, tmp_path / "ad", "peft")
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert BASE_CLASS_KEY not in f.metadata()
    assert load_adapter(out).base_class is None
    plain = extracted(base / "model.safetensors", tuned / "model.safetensors", tmp_path / "plain.safetensors",
                      "kohya")  # lone files: no config beside them is read
    with safe_open(str(plain), "pt") as f:
        assert BASE_CLASS_KEY not in f.metadata()


def test_a_file_without_a_record_is_judged_by_its_names_as_before(pairs, tmp_path):
    base, tuned = pairs("sana")
    out = extracted(base, tuned, tmp_path / "ad", "peft") / "pytorch_lora_weights.safetensors"
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(out))
    for name, kept in (("bare", {}), ("junk", {BASE_CLASS_KEY: "{not json"}),
                       ("odd", {BASE_CLASS_KEY: json.dumps({"_class_name": "Sana Pipeline", "file": "x.json"})})):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / out.name), metadata={**{k: v for k, v in metadata.items()
                                                                          if k != BASE_CLASS_KEY}, **kept})
        note, _ = judged(tmp_path / name)
        assert "StableDiffusionPipeline" in note and "the adapter's names; --base" in note, (name, note)
        assert load_adapter(tmp_path / name).base_class is None


@pytest.mark.parametrize("recorded", [BaseClass("SanaPipeline", "model_index.json"),
                                      BaseClass("WanTransformer3DModel", "config.json")])
def test_the_metadata_reads_back_what_was_written(recorded):
    from lowrank_tools.adapter import Adapter

    metadata = base_class_metadata(Adapter(base_class=recorded))
    assert base_class_from_metadata(metadata) == recorded and recorded.component == (recorded.file == "config.json")
    assert base_class_metadata(Adapter()) == {} and base_class_from_metadata({}) is None
    extra = json.dumps({**json.loads(metadata[BASE_CLASS_KEY]), "more": 1})
    assert base_class_from_metadata({BASE_CLASS_KEY: extra}) is None  # not as written: not trusted

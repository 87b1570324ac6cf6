"""extract, convert, info and demo commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from .options import (FORMAT_HELP, FORMATS, METHODS, SEED, Progress, allow_tf32_option, check_kohya_options,
                      check_outputs, common_options, dtype_option, examples, filter_options, finite, force_option,
                      hub_paths, make_rule, module_table, nothing_left, out_dtype, quiet_option, rank_options,
                      revision_option, seed_option, show, warn_all, warner, write_report)



@click.command(short_help="Extract a LoRA adapter from a base and a fine-tuned model.",
              epilog=examples("lowrank-tools extract base/ tuned/ -o adapter -r 32",
                              "lowrank-tools extract sd15.safetensors tuned.safetensors -o lora.safetensors "
                              "--energy 0.9 -r 128",
                              "lowrank-tools extract base/ tuned/ -o adapter --budget 20000000 --report report.json"))
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("tuned", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Adapter to write: a name ending in .safetensors is a kohya file, anything else a PEFT folder.")
@rank_options(default_rank="16 without --budget")
@click.option("--alpha", type=float, show_default="r per layer, so scale = 1", help="LoRA alpha of every layer.")
@click.option("--format", "fmt", type=FORMATS, show_default="from -o", help=FORMAT_HELP)
@click.option("--prefix", default="lora_unet_", show_default=True, help="kohya key prefix for modules without a component.")
@click.option("--method", type=METHODS, default="auto", show_default=True,
              help="SVD: exact, randomized (range finder), or auto (randomized when r is small against the sides).")
@click.option("--oversample", type=click.IntRange(min=0), default=10, show_default=True,
              help="Extra columns of the randomized range finder beyond r (Halko et al. 2011, p).")
@click.option("--power-iters", type=click.IntRange(min=0), default=4, show_default=True,
              help="Most power iterations of the randomized range finder (fewer once one gains under 0.3% of "
                   "the error; more: closer to exact on flat spectra).")
@click.option("--strict", is_flag=True, help="Tensors on one side only, or of different shapes, are errors.")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write the per-layer report (.json or .csv; README: report summary fields). Strict JSON: "
                   "not_low_rank is null for a 1-D tensor whose base is all zero (no ratio).")
@click.option("--conv-rank", type=int, show_default="that of --rank", help="Rank (or cap) for conv kernels.")
@click.option("--full-modules", multiple=True, metavar="REGEX",
              help="Save these modules' tensors whole (PEFT modules_to_save), e.g. a grown vocabulary (repeatable).")
@click.option("--dora", is_flag=True, help="DoRA: magnitude m = ||W'||_row, factors = the truncated delta.")
@click.option("--keep-bias", is_flag=True, help="Carry the adapted modules' bias deltas (PEFT lora_B.bias, kohya diff_b).")
@click.option("--keep-norms", is_flag=True,
              help="Carry 1-D norm weights/biases that changed (kohya w_norm/b_norm; PEFT: saved whole).")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Input statistics of lowrank-tools calibrate: layers with statistics get activation-whitened "
                   "factors (lowest output error on those inputs); the others plain ones. --budget then allocates on "
                   "the per-token output error.")
@click.option("--damping", type=float, default=0.01, show_default=True, callback=finite,
              help="With --calibration: lambda = F * mean(diag X^T X) added to X^T X (larger: closer to plain SVD).")
@allow_tf32_option
@revision_option
@common_options
@seed_option
def extract(base, tuned, output, rank, energy, sv_ratio, threshold, budget, alpha, fmt, prefix, method, oversample,
            power_iters, strict, report_path, conv_rank, full_modules, dora, keep_bias, keep_norms, calibration, damping,
            allow_tf32, revision, device, dtype_name, include, exclude, seed, force, quiet):
    """Extract a LoRA adapter from BASE and fully fine-tuned TUNED checkpoints (default --rank 16).

    Embeddings, which a kohya file cannot hold, are left out of a kohya -o with a warning naming them (as convert,
    resize and merge do), before any work; a PEFT folder keeps them.

    --budget N spreads ranks over layers within N parameters (one pass: the top K singular values per layer,
    K = --rank if given, else min(smaller side, 256), then the allocation).

    Under torchrun (torchrun --nproc-per-node N -m lowrank_tools extract ...) the layers are split over the
    processes (gloo on the CPU, nccl with --device cuda); rank 0 writes the adapter, byte for byte the
    single-process one with the same seed and threads per process.

    BASE and TUNED may be hub ids (org/name, with --revision): read from the local cache, else downloaded."""
    from ..extract.distributed import torchrun_group
    from ..extract.options import ExtractOptions
    from ..io.formats import output_format

    rule = make_rule(rank, energy, sv_ratio, threshold, default_rank=None if budget is not None else 16)
    fmt = output_format(output, fmt).value
    base, tuned = hub_paths([base, tuned], revision)
    check_kohya_options(fmt, prefix, full_modules)
    options = ExtractOptions(rule=rule, budget=budget, method=method, alpha=alpha, dtype=out_dtype(dtype_name),
                             device=device, include=include, exclude=exclude, conv_rank=conv_rank,
                             full_modules=full_modules, embeddings=fmt != "kohya", strict=strict, seed=seed,
                             oversample=oversample, n_iter=power_iters, allow_tf32=allow_tf32,
                             calibration=calibration, damping=damping)
    with torchrun_group(options.device) as process_rank:
        _extract(base, tuned, output, options, fmt=fmt, prefix=prefix, report_path=report_path, force=force,
                 quiet=quiet, primary=process_rank == 0, extras=dict(dora=dora, biases=keep_bias, norms=keep_norms))


def _carry(result, base, tuned, fmt: str, *, dora: bool, biases: bool, norms: bool):
    """extract --dora / --keep-bias / --keep-norms (lowrank_tools.extract.extras); the report counts what they add."""
    from ..extract.extras import carry_tensors, count_carried, with_magnitudes

    adapter = result.adapter
    if biases or norms:
        adapter = carry_tensors(adapter, base, tuned, biases=biases, norms=norms, whole=fmt != "kohya")
    adapter = with_magnitudes(adapter, tuned) if dora else adapter
    carried = count_carried(result.adapter, adapter)
    result.report.summary.update(carried, params=result.report.summary["params"] + carried["carried_params"])
    return adapter


def _reserve_carried(options, base, tuned, extras):
    """--budget with --keep-bias / --keep-norms / --dora: the carried tensors' parameters come out of the factors'
    budget."""
    from dataclasses import replace

    from ..errors import InvalidOption
    from ..extract.extras import carried_budget

    if options.budget is None or not extras or not any(extras.values()):
        return options
    reserved = carried_budget(base, tuned, biases=extras["biases"], norms=extras["norms"], dora=extras["dora"],
                              include=options.include, exclude=options.exclude)
    if reserved >= options.budget:
        raise InvalidOption(f"--budget {options.budget} leaves nothing for the factors: the carried tensors (bias/"
                            f"norm deltas, DoRA magnitudes) take up to {reserved} parameters; raise --budget or drop "
                            f"--keep-bias/--keep-norms/--dora")
    return replace(options, budget=options.budget - reserved)


def _extract(base, tuned, output, options, *, fmt, prefix, report_path, force, quiet, primary, extras=None):
    """One process's part: rank 0 (or the only process) checks the output, extracts, writes and reports; the
    other ranks of a torchrun job factor their share, stay silent and write nothing (errors: exit 1, rank 0 says)."""
    from ..errors import LowRankError
    from ..extract.streaming import extract as run
    from ..io.formats import save_adapter
    from ..io.outputs import OutputTransaction

    if primary:
        check_outputs(output, report_path, force=force, inputs=[base, tuned]
                      + ([options.calibration] if options.calibration is not None else []))
    asked = options.budget
    paths = [base, tuned]
    try:
        if fmt == "kohya":  # fused layers factored as the file holds them (--calibration: by their parts' input)
            from ..extract.reading import fused_pair
            base, tuned = fused_pair(base, tuned)
        options = _reserve_carried(options, base, tuned, extras)
        result = run(base, tuned, options, progress=Progress(quiet or not primary, "extract"),
                     warn=warner(quiet or not primary))
    except LowRankError as exc:
        if primary:
            raise
        click.get_current_context().exit(exc.exit_code)
    if not result.primary:
        return
    if not result.adapter.modules and not result.adapter.full_tensors:
        why = "; ".join(f"{k}: {', '.join(v[:2])}{' ...' if len(v) > 2 else ''}"
                        for k, v in result.report.skipped.items())
        raise click.ClickException(f"no layer of {paths[1]} differs from {paths[0]} in a way a LoRA can hold "
                                   f"({why or 'no weights'}): nothing to extract, nothing written")
    adapter = _carry(result, base, tuned, fmt, **extras) if extras and any(extras.values()) else result.adapter
    if asked is not None:
        result.report.summary["budget"] = asked  # factors + carried tensors
    with OutputTransaction(force=force, inputs=paths) as outputs:  # the adapter and report, or neither
        save_adapter(adapter, output, format=fmt, prefix=prefix, transaction=outputs)
        write_report(result.report, report_path, transaction=outputs)
    show(result.report, quiet)
    if not quiet:
        click.echo(f"wrote {output} ({len(result.adapter.modules)} modules, {result.report.summary['params']:,} "
                   f"parameters)")


@click.command(short_help="Convert an adapter between PEFT and kohya formats.",
              epilog=examples("lowrank-tools convert adapter/ -o lora.safetensors",
                              "lowrank-tools convert lora.safetensors -o adapter --base sd15.safetensors",
                              "lowrank-tools convert lokr.safetensors -o lora.safetensors -r 32"))
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Adapter to write: a name ending in .safetensors is a kohya file, anything else a PEFT folder.")
@click.option("--format", "fmt", type=FORMATS, show_default="from -o", help=FORMAT_HELP)
@click.option("--prefix", default="lora_unet_", show_default=True, help="kohya key prefix for modules without a component.")
@dtype_option
@click.option("--base", type=click.Path(path_type=Path),
              help="Checkpoint the adapter was made for: kohya keys without recorded names are matched against it.")
@click.option("--dora", "dora_to", type=click.Choice(["keep", "lora", "dora"]), default="keep", show_default=True,
              help="lora: DoRA modules -> plain LoRA (lossy, errors reported); dora: LoRA -> DoRA (exact). "
                   "Both need --base.")
@click.option("--method", type=METHODS, default="auto", show_default=True,
              help="--dora lora's SVD of each module's delta: exact, randomized, or auto (randomized when the rank is "
                   "small against the sides, as extract).")
@rank_options(default_rank="none: every product unchanged")
@filter_options
@force_option
@quiet_option
def convert(adapter, output, fmt, prefix, dtype_name, base, dora_to, method, rank, energy, sv_ratio, threshold,
            budget, include, exclude, force, quiet):
    """Convert ADAPTER between PEFT and kohya formats; without a rank option every module's product is unchanged.

    LoHa, LoKr, Tucker and diff modules are written as plain LoRA at their smallest exact rank; with a rank option
    (--rank/--energy/--sv-ratio/--threshold/--budget, as resize) every module is the optimal truncation instead,
    from the exact algebra (a LoKr's full factor gives only its top triplets with --rank), nothing densified.
    DoRA stays DoRA unless --dora lora (which needs --base).

    Modules under unet. / text_encoder. / text_encoder_2. take their component's kohya prefix, others --prefix.
    A pipeline's adapter converted to peft is written as diffusers' pytorch_lora_weights.safetensors. What kohya
    cannot hold (embeddings, tensors saved whole) is left out with a warning naming it, before anything is written."""
    from ..io.checkpoint import check_output
    from ..io.formats import fit_format, in_output_naming, load_adapter, output_format, save_adapter, select_modules
    from ..resize import resize

    rule = make_rule(rank, energy, sv_ratio, threshold)  # None: no truncation
    fmt = output_format(output, fmt).value
    check_kohya_options(fmt, prefix, ())
    check_output(output, force=force, inputs=[adapter])
    if dora_to != "keep" and base is None:
        raise click.UsageError(f"--dora {dora_to} needs --base: DoRA's weight depends on the base weights")
    # --rank without --energy: only each module's top --rank components can be kept, so structured modules are read
    # truncated (the energy rule needs the whole spectrum; --dora lora truncates the whole DoRA delta, not B A)
    cap = rule.rank if rule is not None and rule.energy is None and dora_to != "lora" else None
    loaded = load_adapter(adapter, base=base, rank_cap=cap)
    warn_all(quiet, loaded.notes)
    loaded, done = _convert_dora(loaded, base, dora_to, rule, method, quiet) if dora_to != "keep" else (loaded, ())
    loaded, left_out = fit_format(select_modules(loaded, include, exclude), fmt, warn=warner(quiet))
    if fmt == "kohya" and (rule is not None or budget is not None):  # truncate the fused modules the file holds
        loaded = in_output_naming(loaded, fmt)
    if rule is not None or budget is not None:  # modules --dora lora made under the rule already follow it
        truncated = [f"^{re.escape(n)}$" for n in done] if rule is not None and dora_to == "lora" else ()
        loaded = resize(loaded, rule=rule, budget=budget, exclude=truncated, progress=Progress(quiet, "convert"),
                        warn=warner(quiet)).adapter
    if not loaded.modules and not loaded.full_tensors:
        raise click.ClickException(f"nothing of {adapter} left to write to {output}: {nothing_left(left_out, fmt)}")
    save_adapter(loaded, output, format=fmt, force=force, inputs=[adapter], dtype=out_dtype(dtype_name), prefix=prefix)
    if not quiet:
        click.echo(f"wrote {output} ({fmt}, {len(loaded.modules)} modules)")


def _convert_dora(loaded, base, dora_to: str, rule, method: str, quiet: bool):
    """convert --dora lora|dora: the converted adapter and the names of the modules converted (errors on stderr)."""
    from ..dora import dora_to_lora, lora_to_dora

    done = dora_to_lora(loaded, base, rule=rule, method=method) if dora_to == "lora" else lora_to_dora(loaded, base)
    worst = max(done.rel_errors.items(), key=lambda kv: kv[1], default=None)
    if worst and not quiet:
        click.echo(f"--dora {dora_to}: {len(done.rel_errors)} modules converted, largest rel error "
                   f"{worst[1]:.3g} ({worst[0]})", err=True)
    return done.adapter, list(done.rel_errors)


@click.command(short_help="Describe an adapter; --modules lists every module.",
              epilog=examples("lowrank-tools info adapter/", "lowrank-tools info lora.safetensors --modules",
                              "lowrank-tools info adapter/ --modules --include 'layers\\.0\\.' --json"))
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--modules", "list_modules", is_flag=True,
              help="List every module (file order) with its kind, rank, alpha and the shape of the weight it adapts.")
@click.option("--json", "as_json", is_flag=True,
              help="Print machine-readable (strict) JSON, null where not known (with --modules: module_list).")
@click.option("--base", type=click.Path(path_type=Path),
              help="Checkpoint the adapter was made for: kohya keys without recorded names are matched against it.")
@filter_options
@quiet_option
def info(adapter, list_modules, as_json, base, include, exclude, quiet):
    """Describe ADAPTER: format, modules, ranks, alphas, scale rule, parameters, dtype, base model (and the
    diffusers class extract read from it).

    Notes about the input (e.g. module names guessed for a kohya file) go to stderr as warnings; -q drops them."""
    from ..io.formats import describe_adapter, describe_modules, load_adapter, select_modules

    loaded = select_modules(load_adapter(adapter, base=base), include, exclude)
    facts = describe_adapter(loaded, adapter)
    warn_all(quiet or as_json, facts.pop("notes") if not as_json else ())
    if list_modules:
        facts["module_list"] = describe_modules(loaded)
    if as_json:
        click.echo(json.dumps(facts, indent=2, allow_nan=False))  # strict: no NaN/Infinity tokens
        return
    rows = facts.pop("module_list", None)
    for key, value in facts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = "; ".join(map(str, value)) or "-"
        click.echo(f"{key:>14}: {value if value is not None else '-'}")
    if rows is not None:
        click.echo("\n" + module_table(rows))


@click.command(short_help="The whole flow on a generated pair, in a few seconds.",
              epilog=examples("lowrank-tools demo", "lowrank-tools demo --force --seconds 20",
                              "lowrank-tools demo -o /tmp/demo --seed 3"))
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=Path("lowrank-demo"),
              show_default=True, help="Folder for the generated checkpoints and adapters.")
@click.option("--seconds", type=click.FloatRange(min=0.5, max=3600), default=5.0, show_default=True, callback=finite,
              help="Fine-tuning time.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the generated tasks and training.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@quiet_option
def demo(out_dir, seconds, seed, force, quiet):
    """The whole flow on a generated pair: fine-tune a small model for real, extract at two ranks, report."""
    from ..demo import run_demo

    run_demo(out_dir, seconds=seconds, seed=seed, force=force, echo=None if quiet else click.echo,
             progress=lambda desc: Progress(quiet, desc), warn=warner(quiet))

"""resize, merge and apply commands: adapters in, adapter or full weights out."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (FORMAT_HELP, FORMATS, Progress, check_kohya_options, check_outputs, common_options, examples,
                      hub_paths, make_rule, out_dtype, rank_options, revision_option, show, warn_all, warner,
                      write_report)



def _finish_adapter(result, output: Path, *, fmt: str, prefix: str, force: bool, inputs, report_path, quiet,
                    left_out: dict) -> None:
    from ..io.formats import save_adapter
    from ..io.outputs import OutputTransaction

    result.report.skipped.update(left_out)  # what the format cannot hold, left out before the work
    if not result.adapter.modules:
        raise click.ClickException(f"every module was left out or truncated to rank 0: nothing to write to {output}")
    with OutputTransaction(force=force, inputs=inputs) as outputs:  # the adapter and report, or neither
        save_adapter(result.adapter, output, format=fmt, prefix=prefix, transaction=outputs)
        write_report(result.report, report_path, transaction=outputs)
    show(result.report, quiet)
    if not quiet:
        click.echo(f"wrote {output} ({fmt}, {len(result.adapter.modules)} modules, {result.adapter.params:,} parameters)")


_OUT_FORMAT = click.option("--format", "fmt", type=FORMATS, show_default="from -o", help=FORMAT_HELP)
_PREFIX = click.option("--prefix", default="lora_unet_", show_default=True,
                       help="kohya key prefix for modules without a component.")
_ALPHA = click.option("--alpha", type=float, show_default="r per module, so scale = 1",
                      help="LoRA alpha of the modules written.")
_REPORT = click.option("--report", "report_path", type=click.Path(path_type=Path),
                       help="Write the per-module report (.json or .csv; README: report summary fields). Strict "
                            "JSON: null (an empty CSV field) is a value that does not exist.")


def _adapter_out_options(f):
    """What resize and merge share: -o, the rank options, alpha, format, prefix, report and the common options."""
    opts = [click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
                         help="Adapter to write: a name ending in .safetensors is a kohya file, anything else a PEFT "
                              "folder."),
            rank_options, _ALPHA, _OUT_FORMAT, _PREFIX, _REPORT, common_options]
    for option in reversed(opts):
        f = option(f)
    return f


@click.command(short_help="Shrink an adapter's ranks exactly (QR core, never B @ A).",
              epilog=examples("lowrank-tools resize adapter/ -o small -r 8",
                              "lowrank-tools resize lora.safetensors -o small.safetensors --energy 0.95",
                              "lowrank-tools resize adapter/ -o small --budget 5000000 --report resize.json"))
@click.argument("adapter", type=click.Path(path_type=Path))
@_adapter_out_options
def resize(adapter, output, rank, energy, sv_ratio, threshold, budget, alpha, fmt, prefix, report_path, device,
           dtype_name, include, exclude, force, quiet):
    """Shrink ADAPTER's ranks exactly through each module's QR core (never forms B @ A).

    --include / --exclude choose the modules resized; the others are written unchanged. What a kohya -o cannot
    hold (embeddings, tensors saved whole) is left out with a warning naming it, before any work."""
    from ..io.formats import fit_format, in_output_naming, load_adapter, output_format
    from ..linalg.rank_rules import require_rank_option
    from ..resize import resize as run

    rule = make_rule(rank, energy, sv_ratio, threshold)
    require_rank_option(rule, budget, "resize")  # before any reading
    fmt = output_format(output, fmt).value
    check_kohya_options(fmt, prefix, ())
    check_outputs(output, report_path, force=force, inputs=[adapter])
    loaded = load_adapter(adapter)
    warn_all(quiet, loaded.notes)
    loaded, left_out = fit_format(loaded, fmt, warn=warner(quiet))
    if fmt == "kohya":  # split parts fused first: the rule truncates the modules the file holds
        loaded = in_output_naming(loaded, fmt)
    result = run(loaded, rule=rule, budget=budget, alpha=alpha, dtype=out_dtype(dtype_name), device=device,
                 include=include, exclude=exclude, progress=Progress(quiet, "resize"), warn=warner(quiet))
    _finish_adapter(result, output, fmt=fmt, prefix=prefix, force=force, inputs=[adapter], report_path=report_path,
                    quiet=quiet, left_out=left_out)


@click.command(short_help="Merge weighted adapters into one (exact, or truncated).",
              epilog=examples("lowrank-tools merge style/ subject/:0.5 -o merged",
                              "lowrank-tools merge a.safetensors:0.7 b.safetensors:0.3 -o ab.safetensors -r 32",
                              "lowrank-tools merge a/ b/ -o ab --energy 0.99 --report merge.json"))
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@_adapter_out_options
def merge(adapters, output, rank, energy, sv_ratio, threshold, budget, alpha, fmt, prefix, report_path, device,
          dtype_name, include, exclude, force, quiet):
    """Merge weighted adapters: sum_i w_i scale_i B_i A_i. No rank option: exact concatenation.

    What a kohya -o cannot hold (embeddings, tensors saved whole) is left out with a warning naming it, before
    any work."""
    from dataclasses import replace

    from ..io.formats import fit_all, output_format
    from ..merge import merge as run
    from ..weighted import load_weighted, parse_adapter_spec

    specs = [parse_adapter_spec(a) for a in adapters]
    rule = make_rule(rank, energy, sv_ratio, threshold)
    fmt = output_format(output, fmt).value
    check_kohya_options(fmt, prefix, ())
    paths = [s.path for s in specs]
    check_outputs(output, report_path, force=force, inputs=paths)
    loaded = load_weighted(specs)
    warn_all(quiet, [n for item in loaded for n in item.adapter.notes])
    fitted, left_out = fit_all([item.adapter for item in loaded], fmt, warn=warner(quiet))
    loaded = [replace(item, adapter=adapter) for item, adapter in zip(loaded, fitted)]
    filtered = []
    if fmt == "kohya" and (rule is not None or budget is not None):  # truncate the fused modules the file holds
        loaded, filtered = _in_kohya_naming(loaded, include, exclude)
        include = exclude = ()  # applied, on each input's own names
    result = run(loaded, rule=rule, budget=budget, alpha=alpha, dtype=out_dtype(dtype_name), device=device,
                 include=include, exclude=exclude, progress=Progress(quiet, "merge"), warn=warner(quiet))
    if filtered:
        result.report.skipped["filtered out"] = filtered
    _finish_adapter(result, output, fmt=fmt, prefix=prefix, force=force, inputs=paths, report_path=report_path,
                    quiet=quiet, left_out=left_out)


def _in_kohya_naming(loaded, include, exclude):
    """merge -r/--budget to kohya: each input filtered on its own names, then in the names the file holds (split
    parts fused exactly), so that the rule truncates the fused modules; and the module names filtered out."""
    from dataclasses import replace

    from ..io.formats import in_output_naming
    from ..io.layers import compile_filters
    from ..merge import select_inputs

    include, exclude = compile_filters(include, "--include"), compile_filters(exclude, "--exclude")
    kept, filtered = select_inputs(loaded, include, exclude)
    return [replace(item, adapter=in_output_naming(item.adapter, "kohya")) for item in kept], filtered


@click.command(short_help="Bake adapters into a base model's full weights.",
              epilog=examples("lowrank-tools apply base/ adapter/ -o merged-model",
                              "lowrank-tools apply sd15.safetensors style.safetensors:0.8 -o sd15-style.safetensors",
                              "lowrank-tools apply base/ a/ b/:0.5 -o out --shard-size 2GB --dtype bfloat16"))
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="A .safetensors file, or an HF folder (shards, index and the base folder's config files).")
@click.option("--shard-size", default=None, show_default="5GB",
              help="Largest shard of a folder output: 5GB = 5*10^9 bytes, 500MiB = 500*2^20.")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write what changed per tensor: modules, adapters, max |dW|, ||dW|| / ||W0|| (.json or .csv).")
@revision_option
@common_options
def apply(base, adapters, output, shard_size, report_path, revision, device, dtype_name, include, exclude, force,
          quiet):
    """Bake weighted adapters into BASE: W = W0 + sum_i w_i scale_i B_i A_i, streamed tensor by tensor.

    BASE may be a hub id (org/name, with --revision); an fp8 BASE (plain or ComfyUI-scaled) is written as
    bfloat16 unless --dtype says otherwise."""
    from ..apply import apply as run
    from ..io.checkpoint import parse_size
    from ..io.outputs import OutputTransaction
    from ..weighted import load_weighted, parse_adapter_spec

    if shard_size is not None:
        parse_size(shard_size)  # a bad size fails before the adapters are read
    specs = [parse_adapter_spec(a) for a in adapters]
    (base,) = hub_paths([base], revision)
    inputs = [base, *(s.path for s in specs)]
    check_outputs(output, report_path, force=force, inputs=inputs)
    loaded = load_weighted(specs, base=base)
    warn_all(quiet, [n for item in loaded for n in item.adapter.notes])
    with OutputTransaction(force=force, inputs=inputs) as outputs:  # the model and report, or neither
        result = run(base, loaded, output, shard_size=shard_size, dtype=out_dtype(dtype_name), device=device,
                     include=include, exclude=exclude, force=force, inputs=inputs, progress=Progress(quiet, "apply"),
                     warn=warner(quiet), transaction=outputs, measure=report_path is not None)
        _write_apply_report(result, report_path, outputs)
    if not quiet:
        changed = sum(len(v) for v in result.modified.values())
        click.echo(f"wrote {output} ({len(result.files)} file(s), {result.tensors} tensors: {len(result.modified)} "
                   f"changed by {changed} adapter modules, {len(result.replaced)} replaced whole, the rest copied)")


def _write_apply_report(result, path: Path | None, outputs) -> None:
    if path is None:
        return
    from ..apply_report import apply_report_csv, apply_report_json

    text = apply_report_csv(result) if path.suffix.lower() == ".csv" else apply_report_json(result)
    outputs.stage(path).write_text(text)

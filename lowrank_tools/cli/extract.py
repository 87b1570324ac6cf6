"""extract, convert, info and demo commands."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..linalg.svd import Method
from .options import (DTYPES, FORMATS, SEED, Progress, allow_tf32_option, check_kohya_options, check_outputs,
                      common_options, finite, make_rule, out_dtype, rank_options, show, warn_all, warner, write_report)



@click.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("tuned", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Adapter to write.")
@rank_options
@click.option("--alpha", type=float, help="LoRA alpha (default: r per layer, so scale = 1).")
@click.option("--format", "fmt", type=FORMATS, default="peft", show_default=True)
@click.option("--prefix", default="lora_unet_", show_default=True, help="kohya key prefix for modules without a component.")
@click.option("--method", type=click.Choice([m.value for m in Method]), default="auto", show_default=True,
              help="SVD: exact, randomized (range finder), or auto (randomized when r is small against the sides).")
@click.option("--oversample", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--power-iters", type=click.IntRange(min=0), default=4, show_default=True)
@click.option("--strict", is_flag=True, help="Tensors on one side only, or of different shapes, are errors.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the per-layer report (.json or .csv).")
@click.option("--conv-rank", type=int, help="Rank (or cap) for conv kernels (default: that of --rank).")
@click.option("--full-modules", multiple=True, metavar="REGEX",
              help="Save these modules' tensors whole (PEFT modules_to_save), e.g. a grown vocabulary (repeatable).")
@allow_tf32_option
@common_options
def extract(base, tuned, output, rank, energy, sv_ratio, threshold, budget, alpha, fmt, prefix, method, oversample,
            power_iters, strict, report_path, conv_rank, full_modules, allow_tf32, device, dtype_name, include, exclude,
            seed, force, quiet):
    """Extract a LoRA adapter from BASE and fully fine-tuned TUNED checkpoints (default --rank 16).

    --budget N spreads ranks over layers within N parameters (one pass: the top K singular values per layer,
    K = --rank if given, else min(smaller side, 256), then the allocation).

    Under torchrun (torchrun --nproc-per-node N -m lowrank_tools extract ...) the layers are split over the
    processes (gloo on the CPU, nccl with --device cuda); rank 0 writes the adapter, byte for byte the
    single-process one with the same seed and threads per process."""
    from ..extract.distributed import torchrun_group

    rule = make_rule(rank, energy, sv_ratio, threshold, default_rank=None if budget is not None else 16)
    check_kohya_options(fmt, prefix, full_modules)
    with torchrun_group(device) as process_rank:
        _extract(base, tuned, output, dict(rule=rule, budget=budget, method=method, alpha=alpha,
                 dtype=out_dtype(dtype_name), device=device, include=include, exclude=exclude, conv_rank=conv_rank,
                 full_modules=full_modules, embeddings=fmt != "kohya", strict=strict, seed=seed, oversample=oversample,
                 n_iter=power_iters, allow_tf32=allow_tf32), fmt=fmt, prefix=prefix, report_path=report_path,
                 force=force, quiet=quiet, primary=process_rank == 0)


def _extract(base, tuned, output, options: dict, *, fmt, prefix, report_path, force, quiet, primary):
    """One process's part: rank 0 (or the only process) checks the output, extracts, writes and reports; the
    other ranks of a torchrun job factor their share, stay silent and write nothing (errors: exit 1, rank 0 says)."""
    from ..errors import LowRankError
    from ..extract.streaming import extract as run
    from ..io.formats import save_adapter

    if primary:
        check_outputs(output, report_path, force=force, inputs=[base, tuned])
    try:
        result = run(base, tuned, progress=Progress(quiet or not primary, "extract"), warn=warner(quiet or not primary),
                     **options)
    except LowRankError as exc:
        if primary:
            raise
        click.get_current_context().exit(exc.exit_code)
    if not result.primary:
        return
    if not result.adapter.modules and not result.adapter.full_tensors:
        why = "; ".join(f"{k}: {', '.join(v[:2])}{' ...' if len(v) > 2 else ''}"
                        for k, v in result.report.skipped.items())
        raise click.ClickException(f"no layer of {tuned} differs from {base} in a way a LoRA can hold "
                                   f"({why or 'no weights'}): nothing to extract, nothing written")
    save_adapter(result.adapter, output, format=fmt, force=force, inputs=[base, tuned], prefix=prefix)
    write_report(result.report, report_path, force=force, inputs=[base, tuned, output])
    show(result.report, quiet)
    if not quiet:
        click.echo(f"wrote {output} ({len(result.adapter.modules)} modules, {result.adapter.params:,} parameters)")


@click.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=FORMATS, required=True)
@click.option("--prefix", default="lora_unet_", show_default=True, help="kohya key prefix for modules without a component.")
@click.option("--dtype", "dtype_name", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True)
@click.option("--base", type=click.Path(path_type=Path),
              help="Checkpoint the adapter was made for: kohya keys without recorded names are matched against it.")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--quiet", "-q", is_flag=True)
def convert(adapter, output, fmt, prefix, dtype_name, base, force, quiet):
    """Convert ADAPTER between PEFT and kohya formats; every module's product is unchanged.

    Modules under unet. / text_encoder. / text_encoder_2. take their component's kohya prefix, others --prefix.
    A pipeline's adapter converted to peft is written as diffusers' pytorch_lora_weights.safetensors."""
    from ..io.checkpoint import check_output
    from ..io.formats import load_adapter, save_adapter

    check_kohya_options(fmt, prefix, ())
    check_output(output, force=force, inputs=[adapter])
    loaded = load_adapter(adapter, base=base)
    warn_all(quiet, loaded.notes)
    save_adapter(loaded, output, format=fmt, force=force, inputs=[adapter], dtype=out_dtype(dtype_name), prefix=prefix)
    if not quiet:
        click.echo(f"wrote {output} ({fmt}, {len(loaded.modules)} modules)")


@click.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--base", type=click.Path(path_type=Path),
              help="Checkpoint the adapter was made for: kohya keys without recorded names are matched against it.")
def info(adapter, as_json, base):
    """Describe ADAPTER: format, modules, ranks, alphas, scale rule, parameters, dtype, base model."""
    from ..io.formats import describe_adapter, load_adapter

    facts = describe_adapter(load_adapter(adapter, base=base), adapter)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = "; ".join(map(str, value)) or "-"
        click.echo(f"{key:>14}: {value if value is not None else '-'}")


@click.command()
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=Path("lowrank-demo"),
              show_default=True, help="Folder for the generated checkpoints and adapters.")
@click.option("--seconds", type=click.FloatRange(min=0.5, max=3600), default=5.0, show_default=True, callback=finite,
              help="Fine-tuning time.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Reuse the output folder if it exists.")
@click.option("--quiet", "-q", is_flag=True)
def demo(out_dir, seconds, seed, force, quiet):
    """The whole flow on a generated pair: fine-tune a small model for real, extract at two ranks, report."""
    from ..demo import run_demo

    run_demo(out_dir, seconds=seconds, seed=seed, force=force, echo=None if quiet else click.echo,
             progress=lambda desc: Progress(quiet, desc), warn=warner(quiet))

"""resize, merge and apply commands: adapters in, adapter or full weights out."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (FORMATS, Progress, check_outputs, common_options, make_rule, out_dtype, rank_options, show, warn_all, warner,
                      write_report)



def _output_format(fmt: str | None, output: Path) -> str:
    """--format, else what -o names: a ``.safetensors`` file is kohya, anything else a PEFT folder (so a kohya
    input resized or merged to a .safetensors name keeps its format, a PEFT folder to a folder keeps its)."""
    kohya_name = output.suffix == ".safetensors"
    if fmt == "kohya" and not kohya_name:
        raise click.UsageError(f"-o {output}: a kohya adapter is one file: give a name ending in .safetensors")
    return fmt or ("kohya" if kohya_name else "peft")


def _finish_adapter(result, output: Path, *, fmt: str, prefix: str, force: bool, inputs, report_path, quiet) -> None:
    from ..io.formats import save_adapter

    if not result.adapter.modules:
        raise click.ClickException(f"every module was left out or truncated to rank 0: nothing to write to {output}")
    save_adapter(result.adapter, output, format=fmt, force=force, inputs=inputs, prefix=prefix)
    write_report(result.report, report_path, force=force, inputs=[*inputs, output])
    show(result.report, quiet)
    if not quiet:
        click.echo(f"wrote {output} ({fmt}, {len(result.adapter.modules)} modules, {result.adapter.params:,} parameters)")


_OUT_FORMAT = click.option("--format", "fmt", type=FORMATS, default=None,
                           help="Output format (default: kohya when -o ends in .safetensors, else a PEFT folder).")
_PREFIX = click.option("--prefix", default="lora_unet_", show_default=True,
                       help="kohya key prefix for modules without a component.")
_ALPHA = click.option("--alpha", type=float, help="LoRA alpha of new modules (default: r per module, so scale = 1).")
_REPORT = click.option("--report", "report_path", type=click.Path(path_type=Path),
                       help="Write the per-module report (.json or .csv).")


def _adapter_out_options(f):
    """What resize and merge share: -o, the rank options, alpha, format, prefix, report and the common options."""
    opts = [click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Adapter to write."),
            rank_options, _ALPHA, _OUT_FORMAT, _PREFIX, _REPORT, common_options]
    for option in reversed(opts):
        f = option(f)
    return f


@click.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@_adapter_out_options
def resize(adapter, output, rank, energy, sv_ratio, threshold, budget, alpha, fmt, prefix, report_path, device,
           dtype_name, include, exclude, seed, force, quiet):
    """Shrink ADAPTER's ranks exactly through each module's QR core (never forms B @ A)."""
    from ..io.formats import load_adapter
    from ..resize import resize as run

    rule = make_rule(rank, energy, sv_ratio, threshold)
    if rule is None and budget is None:
        raise click.UsageError("resize needs a rank option: --rank, --energy, --sv-ratio, --threshold or --budget")
    fmt = _output_format(fmt, output)
    check_outputs(output, report_path, force=force, inputs=[adapter])
    loaded = load_adapter(adapter)
    warn_all(quiet, loaded.notes)
    result = run(loaded, rule=rule, budget=budget, alpha=alpha, dtype=out_dtype(dtype_name), device=device,
                 include=include, exclude=exclude, progress=Progress(quiet, "resize"), warn=warner(quiet))
    _finish_adapter(result, output, fmt=fmt, prefix=prefix, force=force, inputs=[adapter], report_path=report_path,
                    quiet=quiet)


@click.command()
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@_adapter_out_options
def merge(adapters, output, rank, energy, sv_ratio, threshold, budget, alpha, fmt, prefix, report_path, device,
          dtype_name, include, exclude, seed, force, quiet):
    """Merge weighted adapters: sum_i w_i scale_i B_i A_i. No rank option: exact concatenation."""
    from ..merge import merge as run
    from ..weighted import load_weighted, parse_adapter_spec

    specs = [parse_adapter_spec(a) for a in adapters]
    rule = make_rule(rank, energy, sv_ratio, threshold)
    fmt = _output_format(fmt, output)
    paths = [s.path for s in specs]
    check_outputs(output, report_path, force=force, inputs=paths)
    loaded = load_weighted(specs)
    warn_all(quiet, [n for item in loaded for n in item.adapter.notes])
    result = run(loaded, rule=rule, budget=budget, alpha=alpha, dtype=out_dtype(dtype_name), device=device,
                 include=include, exclude=exclude, progress=Progress(quiet, "merge"), warn=warner(quiet))
    _finish_adapter(result, output, fmt=fmt, prefix=prefix, force=force, inputs=paths, report_path=report_path,
                    quiet=quiet)


@click.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="A .safetensors file, or an HF folder (shards, index and the base folder's config files).")
@click.option("--shard-size", default=None,
              help="Largest shard of a folder output (default 5GB): 5GB = 5*10^9 bytes, 500MiB = 500*2^20.")
@common_options
def apply(base, adapters, output, shard_size, device, dtype_name, include, exclude, seed, force, quiet):
    """Bake weighted adapters into BASE: W = W0 + sum_i w_i scale_i B_i A_i, streamed tensor by tensor."""
    from ..apply import apply as run
    from ..io.checkpoint import check_output, parse_size
    from ..weighted import load_weighted, parse_adapter_spec

    if shard_size is not None:
        parse_size(shard_size)  # a bad size fails before the adapters are read
    specs = [parse_adapter_spec(a) for a in adapters]
    inputs = [base, *(s.path for s in specs)]
    check_output(output, force=force, inputs=inputs)
    loaded = load_weighted(specs, base=base)
    warn_all(quiet, [n for item in loaded for n in item.adapter.notes])
    result = run(base, loaded, output, shard_size=shard_size, dtype=out_dtype(dtype_name), device=device, include=include,
                 exclude=exclude, force=force, inputs=inputs, progress=Progress(quiet, "apply"), warn=warner(quiet))
    if not quiet:
        changed = sum(len(v) for v in result.modified.values())
        click.echo(f"wrote {output} ({len(result.files)} file(s), {result.tensors} tensors: {len(result.modified)} "
                   f"changed by {changed} adapter modules, {len(result.replaced)} replaced whole, the rest copied)")

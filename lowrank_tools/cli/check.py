"""The check command: will this adapter load in PEFT, diffusers, ComfyUI or A1111? One line per problem (CI)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .options import examples, filter_options, quiet_option

CONSUMERS = click.Choice(["peft", "diffusers", "comfyui", "a1111"])


@click.command(short_help="Will an adapter load in PEFT, diffusers, ComfyUI, A1111?",
              epilog=examples("lowrank-tools check lora.safetensors --for comfyui",
                              "lowrank-tools check adapter/ --for peft --base base/",
                              "lowrank-tools check lora.safetensors --for diffusers --json"))
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--for", "consumer", type=CONSUMERS, required=True,
              help="The consumer that will load the file (for diffusers, its own loader is the judge when installed).")
@click.option("--base", type=click.Path(path_type=Path),
              help="Checkpoint the adapter is for: every module must exist there with a shape that fits.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as strict JSON (problems and notes).")
@filter_options
@quiet_option
def check(adapter, consumer, base, as_json, include, exclude, quiet):
    """Check that ADAPTER loads in a consumer: key names, module shapes (--base), alphas, zero-padded ranks,
    non-finite factors, dtypes. One line per problem on stdout and exit 1 if any; else a one-line summary, exit 0.
    Notes (not problems) go to stderr; -q drops them and the summary."""
    from ..check import check_adapter

    result = check_adapter(adapter, consumer, base=base, include=include, exclude=exclude)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, allow_nan=False))
    else:
        for note in () if quiet else result.notes:
            click.echo(note.line(), err=True)
        for problem in result.problems:
            click.echo(problem.line())
        if not quiet or result.ok:
            click.echo(result.summary(), err=not result.ok)
    if not result.ok:
        click.get_current_context().exit(1)

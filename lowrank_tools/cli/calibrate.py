"""The calibrate command: input statistics X^T X of every Linear and conv layer, for extract --calibration."""

from __future__ import annotations

from pathlib import Path

import click

from .options import Progress, examples, force_option, quiet_option, text_options, warn_all, warner


@click.command(short_help="Input statistics of every layer (for extract --calibration).",
               epilog=examples("lowrank-tools calibrate base/ --data train.txt -o stats.safetensors",
                               "lowrank-tools calibrate tuned/ --data train.jsonl -o stats.safetensors --max-samples 128 "
                               "--max-length 256"))
@click.argument("model", type=click.Path(path_type=Path))
@text_options
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="The statistics file to write (.safetensors).")
@force_option
@quiet_option
def calibrate(model, data, output, max_samples, max_length, batch_size, device, text_field, force, quiet):
    """Run MODEL (a transformers folder) over the texts of --data and write, per distinct Linear input, X^T X
    summed in float64 over the real tokens (q/k/v, gate/up share one); for a Conv1d/Conv2d (groups 1), over its
    receptive-field patches (in * kh * kw wide, every position).

    Which MODEL: the base is the recommended one (on the test pairs it did better than the fine-tune at ranks 2
    and 4, the fine-tune at rank 8; benchmarks/eval_calibration.py); the fine-tune works the same way.

    Memory: one float64 in x in matrix per distinct input (8 * sum in^2 bytes) on the device, for the whole run.
    Then: lowrank-tools extract BASE TUNED -o OUT --rank 16 --calibration STATS."""
    from ..calibrate import calibrate as run
    from ..io.calibration import write_calibration
    from ..io.models import require_transformers
    from ..io.outputs import check_output
    from ..io.texts import read_texts

    check_output(output, force=force, inputs=[model, data])
    require_transformers()
    texts = read_texts(data, text_field=text_field, max_samples=max_samples)
    result = run(model, texts=texts, max_length=max_length, batch_size=batch_size, device=device,
                 progress=Progress(quiet, "calibrate"), warn=warner(quiet))
    if result.unmasked:
        warn_all(quiet, [f"{len(result.unmasked)} module(s) see inputs that are not (batch, seq, in) (e.g. "
                      f"{result.unmasked[0]}): all their rows were summed, padding included"])
    count = len(result.stats)
    write_calibration(output, result.stats, model=str(model), force=force, inputs=[model, data])
    if not quiet:
        click.echo(f"{count} distinct inputs from {result.samples} texts ({result.tokens} tokens) in "
                   f"{result.wall_time_s:.1f} s")
        click.echo(f"wrote {output}")

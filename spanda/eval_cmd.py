"""``spanda eval``: perplexity of an artifact on a data file, optionally KL / top-1 agreement against the
source checkpoint (built unquantized in float32 into a temporary artifact with the same recipe)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click


def _reference_engine(artifact, hf_dir: str, device: str | None, tmp: Path):
    from compiler.build import build
    from compiler.recipe import recipe_from_dict
    from runtime.config import EngineOptions
    from runtime.engine import LLMEngine

    recipe = recipe_from_dict(artifact.manifest.provenance.recipe, origin="artifact manifest")
    recipe = recipe.model_copy(update={
        "model": recipe.model.model_copy(update={"source": hf_dir, "dtype": "float32"}),
        "quantization": recipe.quantization.model_copy(update={"method": "none"}),
        "eval": recipe.eval.model_copy(update={"data": None}),
    })
    ref = build(recipe, tmp / "reference")
    return LLMEngine(ref.path, EngineOptions(device=device, verify=False))


@click.command(name="eval")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help='JSON lines of {"token_ids": [...]} or {"text": "..."}.')
@click.option("--reference", "reference", type=click.Path(exists=True, file_okay=False),
              help="Source Hugging Face checkpoint: also report mean KL divergence and top-1 agreement.")
@click.option("--max-sequences", type=int, default=None, help="Evaluate only the first N sequences.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the result as JSON here.")
def eval_command(artifact: str, data: str, reference: str | None, max_sequences: int | None, device: str | None,
                 json_out: str | None) -> None:
    """Perplexity of ARTIFACT on --data (and agreement with --reference)."""
    from artifacts.store import ArtifactError
    from runtime.config import EngineOptions
    from runtime.engine import LLMEngine
    from runtime.evaluate import evaluate, load_eval_data

    try:
        engine = LLMEngine(artifact, EngineOptions(device=device))
        seqs = load_eval_data(data, engine.tokenizer.encode, max_sequences)
        with tempfile.TemporaryDirectory() as tmp:
            ref = _reference_engine(engine.artifact, reference, device, Path(tmp)) if reference else None
            result = evaluate(engine, seqs, data, ref, reference)
    except (ValueError, ArtifactError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(result.to_dict(), indent=2))
    if json_out:
        Path(json_out).write_text(json.dumps(result.to_dict(), indent=2) + "\n")

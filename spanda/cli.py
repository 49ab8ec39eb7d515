"""The ``spanda`` command: build, inspect, generate (and more as issues land).

Build imports the compiler; every other command needs only ``runtime`` + ``artifacts``.
"""

from __future__ import annotations

import logging
import sys

import click


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Spanda: build optimized LLM engine artifacts ahead of time, then serve them."""
    _setup_logging(verbose)


@main.command()
@click.option("--recipe", "recipe_path", required=True, type=click.Path(dir_okay=False),
              help="Recipe YAML (see recipes/).")
@click.option("--model", "model_dir", type=click.Path(file_okay=False),
              help="Hugging Face checkpoint directory (overrides the recipe's model.source).")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Artifact directory to create.")
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact (atomically).")
def build(recipe_path: str, model_dir: str | None, out_dir: str, overwrite: bool) -> None:
    """Turn a Hugging Face checkpoint into an engine artifact."""
    from compiler.build import build as run_build
    from compiler.recipe import load_recipe

    try:
        recipe = load_recipe(recipe_path)
        if model_dir:
            recipe = recipe.with_model_source(model_dir)
        result = run_build(recipe, out_dir, overwrite=overwrite)
    except (ValueError, FileExistsError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"built {result.path} in {result.seconds:.1f} s")


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--no-verify", is_flag=True, help="Skip sha256 verification of the files.")
def inspect(artifact: str, no_verify: bool) -> None:
    """Print what an artifact holds."""
    from artifacts.store import ArtifactError, open_artifact

    try:
        art = open_artifact(artifact, verify=not no_verify)
    except ArtifactError as e:
        raise click.ClickException(str(e)) from e
    for line in art.manifest.summary_lines():
        click.echo(line)


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.argument("prompt")
@click.option("--max-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int, help="0 = off.")
@click.option("--min-p", default=0.0, show_default=True, type=float)
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--chat", is_flag=True, help="Apply the model's chat template to the prompt (as a user message).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA if available).")
@click.option("--allow-jit", is_flag=True,
              help="On a GPU the artifact's kernels were not compiled for, recompile them instead of refusing.")
def generate(artifact: str, prompt: str, max_tokens: int, temperature: float, top_p: float, top_k: int,
             min_p: float, repetition_penalty: float, seed: int | None, stop: tuple[str, ...], chat: bool,
             device: str | None, allow_jit: bool) -> None:
    """Generate a completion for PROMPT and print it."""
    from artifacts.store import ArtifactError
    from runtime import LLM, SamplingParams

    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            repetition_penalty=repetition_penalty, seed=seed, stop=list(stop) or None,
        )
        llm = LLM(artifact, device=device, allow_jit=allow_jit)
        if chat:
            out = llm.chat([{"role": "user", "content": prompt}], params)[0]
        else:
            out = llm.generate([prompt], params)[0]
    except (ValueError, ArtifactError) as e:
        raise click.ClickException(str(e)) from e
    completion = out.outputs[0]
    click.echo(prompt + completion.text if not chat else completion.text)
    logging.getLogger("spanda").info(
        "%d prompt tokens, %d generated, finish_reason=%s", len(out.prompt_token_ids),
        len(completion.token_ids), completion.finish_reason,
    )


@main.command("export-hf")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT_DIR (atomically).")
def export_hf_command(artifact: str, out_dir: str, overwrite: bool) -> None:
    """Write ARTIFACT's model as a Hugging Face checkpoint (compressed-tensors when quantized)."""
    from artifacts.store import ArtifactError
    from compiler.export_hf import export_hf

    try:
        path = export_hf(artifact, out_dir, overwrite=overwrite)
    except (ValueError, FileExistsError, OSError, ArtifactError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"exported {path}")


from spanda.eval_cmd import eval_command  # noqa: E402

main.add_command(eval_command)

from spanda.bench_cmd import bench  # noqa: E402

main.add_command(bench)

from spanda.serve_cmd import serve  # noqa: E402

main.add_command(serve)

if __name__ == "__main__":
    main()

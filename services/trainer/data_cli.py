"""`rlhf data stats` and `rlhf data prompts`: the labelled reviews behind training, and the prompts made of them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Datasets and prompt sets.", no_args_is_help=True)

DatasetOption = Annotated[str, typer.Option("--dataset", help="imdb (hub), tiny (the tiny kit's corpus), or a "
                                                              "CSV/JSONL/Parquet file or folder.")]


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2) from None


@app.command()
def stats(
    dataset: DatasetOption = "imdb",
    label_column: Annotated[str, typer.Option(help="Column with the labels.")] = "label",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Size and label split (positive/negative/...) of a labelled review dataset, per split."""
    from services.trainer.data import DataError, label_counts

    try:
        counts = label_counts(dataset, label_column)
    except DataError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps({split: {"total": sum(c.values()), "labels": c} for split, c in counts.items()}))
        return
    labels = sorted({label for c in counts.values() for label in c})
    typer.echo(f"{'split':<10}{'total':>8}" + "".join(f"{label:>10}" for label in labels))
    for split, c in counts.items():
        total = sum(c.values())
        cells = "".join(f"{c.get(label, 0):>5} {c.get(label, 0) / max(total, 1):>4.0%}" for label in labels)
        typer.echo(f"{split:<10}{total:>8}{cells}")


def parse_words(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", value.strip())
    if not match:
        raise typer.BadParameter("expected N or LOW-HIGH, e.g. 3-5")
    low, high = int(match.group(1)), int(match.group(2) or match.group(1))
    if not 1 <= low <= high:
        raise typer.BadParameter("expected 1 <= LOW <= HIGH")
    return low, high


@app.command()
def prompts(
    out: Annotated[Path, typer.Option(help="JSONL file to write, one {\"prompt\": ...} per line.")],
    dataset: DatasetOption = "imdb",
    words: Annotated[str, typer.Option(help="Prompt length in words: N or LOW-HIGH.")] = "3-5",
    n: Annotated[int | None, typer.Option("--n", help="At most this many prompts.")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the prompt lengths.")] = 0,
    split: Annotated[str, typer.Option(help="train or heldout.")] = "train",
    text_column: Annotated[str, typer.Option(help="Column with the text.")] = "text",
) -> None:
    """The prompt set used for training and evaluation: the first few words of each review."""
    from services.trainer.data import DataError, load_texts, make_prompts

    low_high = parse_words(words)
    if split not in ("train", "heldout"):
        raise typer.BadParameter("split must be train or heldout", param_hint="--split")
    try:
        train, held = load_texts(dataset, text_column)
    except DataError as exc:
        _fail(exc)
    made = make_prompts(train if split == "train" else held, low_high, seed, n)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in made))
    typer.echo(f"wrote {len(made)} prompts ({low_high[0]}-{low_high[1]} words) to {out}")

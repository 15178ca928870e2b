"""Prompts: the first few words of reviews, from IMDB, the tiny corpus, or local CSV/JSONL/Parquet files."""

from __future__ import annotations

import random
import re
from pathlib import Path

from shared.tiny.corpus import read_jsonl
from shared.tiny.kit import kit_dir

_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_HTML = re.compile(r"<[^>]+>")


class DataError(ValueError):
    pass


tiny_kit_dir = kit_dir  # where data source `tiny` reads its corpus: $RLHF_TINY_DIR, else .cache/tiny


Rows = list[dict]


def _load_files(files: list[Path]) -> Rows:
    import datasets

    kinds = {_SUFFIXES[f.suffix.lower()] for f in files}
    if len(kinds) != 1:
        raise DataError(f"mixed file types: {sorted(f.name for f in files)}")
    return datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train").to_list()


def _split_tail(rows: Rows) -> tuple[Rows, Rows]:
    """A file without splits: the last tenth is held out."""
    cut = max(1, len(rows) // 10)
    return rows[:-cut] or rows, rows[-cut:]


def load_splits(source: str, split: str = "train", eval_split: str = "test") -> tuple[Rows, Rows]:
    """(train rows, held-out rows) from `imdb`, `hf:<dataset id>`, `tiny`, a data file, or a folder of them; a
    row maps column names to values."""
    if source == "tiny":
        corpus = kit_dir() / "corpus"
        if not corpus.is_dir():
            raise DataError(f"the tiny corpus is missing at {corpus}: run `rlhf models build-tiny --out "
                            f"{kit_dir()}` (or set RLHF_TINY_DIR)")
        return ([vars(r) for r in read_jsonl(corpus / "train.jsonl")],
                [vars(r) for r in read_jsonl(corpus / "heldout.jsonl")])
    if source == "imdb" or source.startswith("hf:"):
        import datasets

        name = "imdb" if source == "imdb" else source[3:]
        try:
            ds = datasets.load_dataset(name)
        except Exception as exc:  # noqa: BLE001 - offline or hub error: say what to do instead
            raise DataError(f"cannot load {name!r} from the hub ({type(exc).__name__}); use data.source=tiny or a "
                            "local file") from None
        return ds[split].to_list(), ds[eval_split].to_list()
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() not in _SUFFIXES:
            raise DataError(f"{path}: unsupported file type (use .csv, .jsonl, .json or .parquet)")
        return _split_tail(_load_files([path]))
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in _SUFFIXES)
        if not files:
            raise DataError(f"{path}: no .csv, .jsonl or .parquet files")
        held = [f for f in files if re.search(r"heldout|test|eval|valid", f.stem)]
        train = [f for f in files if f not in held]
        if train and held:
            return _load_files(train), _load_files(held)
        return _split_tail(_load_files(files))
    raise DataError(f"data source {source!r} is not imdb, tiny, or an existing file or folder")


def column_values(rows: Rows, name: str, source: str) -> list:
    if rows and name not in rows[0]:
        raise DataError(f"no column {name!r} in {source} (columns: {', '.join(rows[0])})")
    return [row[name] for row in rows]


def load_texts(source: str, column: str = "text", split: str = "train", eval_split: str = "test") -> tuple[
        list[str], list[str]]:
    """(train texts, eval texts): the non-empty strings of `column`."""
    def texts(rows: Rows) -> list[str]:
        return [t for t in column_values(rows, column, source) if isinstance(t, str) and t.strip()]

    train, held = load_splits(source, split, eval_split)
    return texts(train), texts(held)


def label_name(value) -> str:
    """IMDB-style integer labels (0 negative, 1 positive) or label strings, as lower-case names."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, int):
        return {0: "negative", 1: "positive"}.get(value, str(value))
    return value.strip().lower()


def label_counts(source: str, label_column: str = "label", split: str = "train",
                 eval_split: str = "test") -> dict[str, dict[str, int]]:
    """Rows per label, for each split: {"train": {"positive": n, ...}, "heldout": {...}}."""
    from collections import Counter

    train, held = load_splits(source, split, eval_split)
    return {name: dict(sorted(Counter(label_name(v) for v in column_values(rows, label_column, source)).items()))
            for name, rows in (("train", train), ("heldout", held))}


def first_words(text: str, k: int) -> str:
    return " ".join(_HTML.sub(" ", text).split()[:k])


def make_prompts(texts: list[str], words: tuple[int, int], seed: int, limit: int | None = None) -> list[str]:
    """The first k words of each text, k drawn per text from `words` (inclusive), seeded."""
    rng = random.Random(seed)
    prompts = [first_words(t, rng.randint(*words)) for t in texts]
    prompts = [p for p in prompts if p]
    return prompts[:limit] if limit else prompts


class PromptSampler:
    """Endless, seeded shuffles of the prompts; its position is part of a checkpoint, so resuming continues the
    same sequence."""

    def __init__(self, prompts: list[str], seed: int):
        if not prompts:
            raise DataError("no prompts")
        self.prompts, self.seed = prompts, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.prompts[self._order[self.cursor]])
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._shuffle()  # the order belongs to the epoch
        self._order = self._shuffle()

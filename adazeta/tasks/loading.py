"""Reading a task's raw rows from local files in public formats, the hub, or the built-in sample.

One code path for every task: rows come back as lists of dicts, with the file they came from, so
that errors can name the file, the row and the field.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from adazeta.errors import DataError

BUILTIN_DIR = Path(__file__).parent / "data"
EXTENSIONS = (".tsv", ".jsonl", ".json", ".csv", ".parquet")
# File stems tried for each split, in order (GLUE: dev.tsv; SuperGLUE: val.jsonl).
SPLIT_STEMS = {"train": ("train",), "validation": ("dev", "val", "validation")}


@dataclass
class Rows:
    rows: list[dict]
    source: str  # a file path or a hub name, for error messages


def find_split_file(data_dir: Path, split: str) -> Path:
    if not data_dir.is_dir():
        raise DataError(f"task.data_dir={str(data_dir)!r} is not a folder")
    for stem in SPLIT_STEMS[split]:
        for ext in EXTENSIONS:
            path = data_dir / f"{stem}{ext}"
            if path.is_file():
                return path
    expected = [f"{stem}{ext}" for stem in SPLIT_STEMS[split] for ext in EXTENSIONS]
    found = sorted(p.name for p in data_dir.iterdir())
    raise DataError(
        f"no {split} file in {data_dir}: expected one of {expected[:6]} ... (found {found or 'nothing'})"
    )


def read_file(path: Path) -> Rows:
    """Rows of a tsv (with header), csv (with header), jsonl, json (list or {'data': [...]}) or parquet."""
    suffix = path.suffix
    if suffix == ".tsv":
        with path.open(newline="", encoding="utf-8") as f:
            # GLUE tsv files contain bare quotes inside sentences: no quote processing.
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}, line {i}: not valid JSON ({e.msg})") from e
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data["data"] if isinstance(data, dict) and "data" in data else data
    elif suffix == ".parquet":
        import pandas as pd

        rows = pd.read_parquet(path).to_dict("records")
    else:
        raise DataError(f"{path}: unsupported format {suffix!r}; use one of {list(EXTENSIONS)}")
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return Rows(rows=rows, source=str(path))


def read_local(data_dir: str | Path, split: str) -> Rows:
    return read_file(find_split_file(Path(data_dir), split))


def read_hub(hub_path: str, hub_name: str | None, split: str) -> Rows:
    """Load a split from the Hugging Face hub (needs network, or a populated datasets cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(hub_path, hub_name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "not reachable"
        raise DataError(
            f"cannot load {hub_path}/{hub_name} split {split!r} from the hub ({type(e).__name__}: {e}). "
            "Offline? Point task.data_dir at local files in the dataset's public format."
        ) from e
    return Rows(rows=list(ds), source=f"hub:{hub_path}/{hub_name}:{split}")


def column(rows: Rows, index: int, name: str):
    """rows.rows[index][name], or a DataError naming the file, the row and the column."""
    row = rows.rows[index]
    if name not in row or row[name] is None:
        raise DataError(
            f"{rows.source}, row {index + 1}: missing column {name!r} (row has {sorted(row)})"
        )
    return row[name]

"""Reading a task's raw rows from local files in public formats, the hub, or the built-in sample.

One code path for every task: rows come back as lists of dicts, with the file they came from and
each row's place in it, so that errors can name the file, the row and the field. Nested public
formats (SuperGLUE MultiRC/ReCoRD/WSC jsonl, SQuAD and DROP json) are flattened by the task
(`Task.flatten`), which keeps the places.

Local files of a split are found by name, in this order:
1. `<stem>.<ext>` for the task's own stems, then the common ones (train; dev, val, validation, test);
2. otherwise every file whose name contains the stem as a word, e.g. `train_fewglue32.jsonl` and
   `train_ptuning_dev32.jsonl` (read together, in name order), `drop_dataset_dev.json`,
   `train-v1.1.json`.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from adazeta.errors import DataError

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "data"
EXTENSIONS = (".tsv", ".jsonl", ".json", ".csv", ".parquet")
# File stems tried for each split, in order. GLUE: dev.tsv; SuperGLUE: val.jsonl; LM-BFF csv tasks
# (SST-5, MR, TREC) ship train.csv and test.csv, and their test set is what we evaluate on.
SPLIT_STEMS = {"train": ("train",), "validation": ("dev", "val", "validation", "test")}
# Longest csv/tsv field read. Python's csv stops at 128 KiB; a long passage is legitimate (the
# tokenizer truncates it), while a field this long is a quote left open in a csv.
FIELD_LIMIT = 16 * 2**20
# Text files are read as "utf-8-sig": UTF-8, with a leading byte-order mark (Excel's "CSV UTF-8"
# export writes one) dropped instead of becoming part of the first column's name.


@dataclass
class Rows:
    rows: list[dict]
    source: str  # a file path (or several joined by " + ") or a hub name, for error messages
    kind: str = ""  # "hub", or the file format: "tsv", "jsonl", "json", "csv", "parquet"
    places: list[str] | None = None  # per row: "<file>, row <n>" (None: source and index)

    def where(self, index: int) -> str:
        """Where row `index` came from, for error messages."""
        return self.places[index] if self.places else f"{self.source}, row {index + 1}"


def _word_match(path: Path, stem: str) -> bool:
    return path.suffix in EXTENSIONS and stem in re.split(r"[-_.]", path.name[: -len(path.suffix)])


def find_split_files(data_dir: Path, split: str, stems: tuple[str, ...] = ()) -> list[Path]:
    """The file(s) holding `split` in data_dir: an exact stem first, else files naming the stem."""
    if not data_dir.is_dir():
        raise DataError(f"task.data_dir={str(data_dir)!r} is not a folder")
    stems = tuple(dict.fromkeys(stems + SPLIT_STEMS[split]))
    for stem in stems:
        for ext in EXTENSIONS:
            path = data_dir / f"{stem}{ext}"
            if path.is_file():
                return [path]
    files = sorted(p for p in data_dir.iterdir() if p.is_file())
    for stem in stems:
        matched = [p for p in files if _word_match(p, stem)]
        if matched:
            if len(matched) > 1:
                log.info(
                    "reading the %s split from %d files: %s",
                    split,
                    len(matched),
                    ", ".join(p.name for p in matched),
                )
            return matched
    expected = [f"{stem}{ext}" for stem in stems for ext in EXTENSIONS]
    raise DataError(
        f"no {split} file in {data_dir}: expected one of {expected[:6]} ..., or a file whose name "
        f"contains {stems[0]!r} as a word like {stems[0]}_part1.jsonl "
        f"(found {[p.name for p in files] or 'nothing'})"
    )


def find_split_file(data_dir: Path, split: str) -> Path:
    """The first file of `split` (kept for callers that read one file)."""
    return find_split_files(Path(data_dir), split)[0]


def _read_delimited(
    path: Path, columns: tuple[str, ...] | None, label_names: tuple[str, ...]
) -> list[dict]:
    """A csv or tsv with a header, or without one when the task names its columns and the first
    row holds none of the label's names: the LM-BFF layout of SST-5, MR, TREC, ... is
    `label,sentence` in csv and `label<TAB>sentence` in tsv, with no header."""
    tsv = path.suffix == ".tsv"
    if csv.field_size_limit() < FIELD_LIMIT:
        csv.field_size_limit(FIELD_LIMIT)
    with path.open(newline="", encoding="utf-8-sig") as f:
        # GLUE tsv files contain bare quotes inside sentences: no quote processing in tsv.
        reader = csv.reader(
            f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
        )
        raw, start = [], 1  # start: the line the record being read begins on
        try:
            for cells in reader:
                if cells:  # blank lines skipped
                    raw.append((reader.line_num, cells))
                start = reader.line_num + 1
        except csv.Error as e:
            hint = " (a quote left open?)" if "field larger" in str(e) and not tsv else ""
            raise DataError(f"{path}, line {start}: {e}{hint}; fix that line") from None
    if not raw:
        return []
    first = [cell.strip().lower() for cell in raw[0][1]]
    has_header = columns is None or any(name.lower() in first for name in label_names)
    header, body = (first, raw[1:]) if has_header else (list(columns), raw)
    rows = []
    for line, cells in body:
        if len(cells) != len(header):
            raise DataError(
                f"{path}, line {line}: {len(cells)} fields, expected {len(header)} ({header})"
            )
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def read_file(
    path: Path,
    csv_columns: tuple[str, ...] | None = None,
    label_names: tuple[str, ...] = ("label",),
) -> Rows:
    """Rows of a tsv or csv (with a header, or headerless with `csv_columns`), jsonl, json (a
    list, {'data': [...]} as in SQuAD, or {id: {...}} as in DROP) or parquet file."""
    path = Path(path)
    try:
        rows = _read_rows(path, csv_columns, label_names)
    except UnicodeDecodeError as e:
        raise DataError(f"{not_utf8(path, e)}; save the file as UTF-8") from None
    except OSError as e:  # unreadable: permissions, a folder under a data file's name, I/O error
        raise DataError(f"{path}: cannot read it ({e.strerror or e}); check that it is a file you can read") from None
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return Rows(rows=rows, source=str(path), kind=path.suffix[1:])


def not_utf8(path: Path, e: UnicodeDecodeError) -> str:
    """Where the first byte that is not UTF-8 sits: the file, line and column, and the byte."""
    data = path.read_bytes()
    try:  # text files decode in chunks: the offset of `e` is within one; find it in the file
        data.decode("utf-8")
    except UnicodeDecodeError as whole:
        e = whole
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return f"{path}, line {line}, column {column}: byte 0x{e.object[e.start]:02x} is not UTF-8"


def _read_rows(path: Path, csv_columns: tuple[str, ...] | None, label_names: tuple[str, ...]) -> list[dict]:
    suffix = path.suffix
    if suffix in (".tsv", ".csv"):
        rows = _read_delimited(path, csv_columns, label_names)
    elif suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8-sig") as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}, line {i}: not valid JSON ({e.msg})") from e
                    if not isinstance(rows[-1], dict):
                        raise DataError(f"{path}, line {i}: expected a JSON object {{...}} per line, "
                                        f"got {type(rows[-1]).__name__}")
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from e
        if isinstance(data, dict) and "data" in data:
            rows = data["data"]
        elif isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
            rows = [{"_key": k, **v} for k, v in data.items()]  # DROP: {passage_id: {...}}
        else:
            rows = data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(
                f"{path}: expected a list of objects, {{'data': [...]}} or {{id: {{...}}}}"
            )
    elif suffix == ".parquet":
        import pandas as pd

        try:
            rows = pd.read_parquet(path).to_dict("records")
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - pyarrow raises its own types for a damaged file
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    else:
        raise DataError(f"{path}: unsupported format {suffix!r}; use one of {list(EXTENSIONS)}")
    return rows


def read_local(
    data_dir: str | Path,
    split: str,
    stems: tuple[str, ...] = (),
    csv_columns: tuple[str, ...] | None = None,
    label_names: tuple[str, ...] = ("label",),
) -> Rows:
    """The rows of one split; several files (e.g. two few-shot train samples) are read in turn."""
    parts = [
        read_file(p, csv_columns, label_names)
        for p in find_split_files(Path(data_dir), split, stems)
    ]
    if len(parts) == 1:
        return parts[0]
    if len({p.kind for p in parts}) > 1:
        raise DataError(
            f"the {split} files {[p.source for p in parts]} mix formats; keep one format"
        )
    return Rows(
        rows=[r for p in parts for r in p.rows],
        source=" + ".join(p.source for p in parts),
        kind=parts[0].kind,
        places=[p.where(i) for p in parts for i in range(len(p.rows))],
    )


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
    return Rows(rows=list(ds), source=f"hub:{hub_path}/{hub_name}:{split}", kind="hub")


def column(rows: Rows, index: int, name: str, aliases: tuple[str, ...] = ()):
    """rows.rows[index][name] (or the first alias present), else a DataError naming the file, the
    row and the column."""
    row = rows.rows[index]
    for key in (name, *aliases):
        if key in row and row[key] is not None:
            return row[key]
    wanted = repr(name) + (f" (or {', '.join(map(repr, aliases))})" if aliases else "")
    present = sorted(k for k in row if k is not None and not str(k).startswith("_"))
    raise DataError(f"{rows.where(index)}: missing column {wanted} (row has {present})")

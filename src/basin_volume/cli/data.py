"""Text data for the command line: a hub data set or a local text, JSON, CSV or TSV file."""

from __future__ import annotations

import json
from pathlib import Path

from ._types import DATA_SUFFIXES, UsageError, _first_line, _looks_like_path


def _read_records(path: Path, text_field: str) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [{text_field: line} for line in lines if line.strip()]
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, start=1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise UsageError(
                                "--data", f"{path} line {lineno} is not JSON ({err.msg})"
                            ) from None
            return rows
        if suffix == ".json":
            with open(path, encoding="utf-8") as fh:
                try:
                    data = json.load(fh)
                except json.JSONDecodeError as err:
                    raise UsageError("--data", f"{path} is not valid JSON ({err})") from None
            if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
                keys = list(data)
                n = len(data[keys[0]]) if keys else 0
                return [{k: data[k][i] for k in keys} for i in range(n)]
            if isinstance(data, list):
                return data
            raise UsageError(
                "--data",
                f'{path} must hold a list of records or an object of columns ({{"text": [...]}})',
            )
        import csv

        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    except UnicodeDecodeError as err:
        raise UsageError("--data", f"{path} is not UTF-8 text ({err.reason})") from None


def load_text_data(
    spec: str,
    *,
    split: str = "train",
    text_field: str = "text",
    config: str | None = None,
):
    """A text data set from a local file, a saved ``datasets`` folder, or the hub.

    Parameters
    ----------
    spec : str
        A ``.txt`` file (one text per non-empty line), ``.json`` (a list of records, or an
        object of equal-length columns), ``.jsonl`` (one record per line), ``.csv``/``.tsv``,
        a folder written by ``Dataset.save_to_disk``, or a hub data set name.
    split : str
        The split of a hub data set or of a saved ``DatasetDict``.
    text_field : str
        The field holding the texts (for ``.txt`` files, the name given to the lines).
    config : str, optional
        The configuration (subset) of a hub data set.

    Returns
    -------
    datasets.Dataset

    Raises
    ------
    UsageError
        Naming ``--data``, ``--split`` or ``--text-field``: a missing file, an empty data set,
        a text field that is not in it.
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise UsageError(
                "--data",
                f"{spec} has an unknown extension; give a {', '.join(DATA_SUFFIXES)} file",
            )
        rows = _read_records(path, text_field)
        if not rows or not all(isinstance(r, dict) for r in rows):
            raise UsageError("--data", f"{spec} holds no records; give a file with texts in it")
        fields = list(dict.fromkeys(k for r in rows for k in r))
        if text_field not in fields:
            raise UsageError(
                "--text-field",
                f"{text_field!r} is not a field of {spec} (its fields: {', '.join(fields)}); "
                "pass --text-field <one of them>",
            )
        bad = [i for i, r in enumerate(rows) if not isinstance(r.get(text_field), str)]
        if bad:
            raise UsageError(
                "--text-field",
                f"record {bad[0]} of {spec} has no text in {text_field!r} "
                f"(found {rows[bad[0]].get(text_field)!r}); every record needs a string there",
            )
        dataset = Dataset.from_list(rows)
    elif path.is_dir():
        try:
            dataset = load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - any failure means "not a saved data set"
            raise UsageError(
                "--data",
                f"{spec} is a folder but not a data set saved with save_to_disk "
                f"({_first_line(err)})",
            ) from None
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise UsageError(
                    "--split", f"{spec} has no split {split!r} (it has {', '.join(dataset)})"
                )
            dataset = dataset[split]
    elif _looks_like_path(spec):
        raise UsageError(
            "--data",
            f"no such file {spec!r}; give a {'/'.join(DATA_SUFFIXES)} file, a saved data set "
            "folder or a hub data set name",
        )
    else:
        try:
            dataset = load_dataset(spec, config, split=split)
        except ValueError as err:
            if "split" in str(err).lower():
                raise UsageError("--split", f"{spec}: {_first_line(err)}") from None
            raise UsageError("--data", f"cannot load {spec!r}: {_first_line(err)}") from None
        except Exception as err:  # noqa: BLE001 - network, missing data set, offline mode
            raise UsageError(
                "--data",
                f"cannot load the hub data set {spec!r} ({_first_line(err)}); check the name "
                "and your connection, or give a local file",
            ) from None
    if text_field not in dataset.column_names:
        raise UsageError(
            "--text-field",
            f"{text_field!r} is not a field of {spec} (its fields: "
            f"{', '.join(dataset.column_names)}); pass --text-field <one of them>",
        )
    if len(dataset) == 0:
        raise UsageError("--data", f"{spec} (split {split!r}) is empty; give a data set with texts")
    return dataset

"""Atomic file writing: a final name never holds a half-written file."""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    The temporary name ends with the final name, so writers that choose a format from the file
    ending (SimpleITK) still do. On error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex[:8]}-{path.name}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, with an error that names the file and the line of the syntax problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file (expected JSON)") from None


def read_model_file(path: str | os.PathLike, problem, lost: str) -> dict | None:
    """An optional JSON file of a model folder (``calibration.json``, ``orientation.json``): None when
    it is missing; None with a warning naming the file, what is wrong and what is ``lost`` (e.g. "no
    confidences") when it is unreadable, not a JSON object, or ``problem(doc)`` returns a reason."""
    import logging

    path = Path(path)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        doc, why = None, f"unreadable ({exc})"
    else:
        why = problem(doc) if isinstance(doc, dict) else "not a JSON object"
    if why is None:
        return doc
    logging.getLogger(__name__).warning("%s: %s; %s until 'spinelm calibrate %s' rewrites it", path, why, lost,
                                        path.parent)
    return None


def read_versioned_json(path: str | os.PathLike, fmt: str, max_version: int) -> dict:
    """Read a spinelm JSON document, checking its ``format`` tag and that its version is supported."""
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} file (missing \"format\": \"{fmt}\")")
    if doc.get("version", 0) > max_version:
        raise ValueError(f"{path}: {fmt} version {doc['version']} is newer than this spinelm supports "
                         f"({max_version}); upgrade spinelm")
    return doc

"""Real English text available offline, split by document into calibration and evaluation.

Calibration (router training, schedule search, threshold calibration) is the
docstrings of a fixed list of standard-library modules: one document per module
(its docstring, then those of the classes, functions and methods it defines).
Evaluation is CPython's language reference as shipped in `pydoc_data.topics`
(one document per topic), the text the measurements in the method notes used,
so held-out numbers stay comparable with them.  The two are different documents
written for different purposes (API reference vs language reference), so
nothing measured on evaluation text was seen while fitting a router.

Both depend only on the running Python's standard library: deterministic for a
given Python version, which the checkpoint records.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
import sys
import warnings

import torch

CALIBRATION_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq",
    "hmac", "html.parser", "http.client", "http.cookiejar", "imaplib", "inspect", "ipaddress",
    "itertools", "json", "locale", "logging", "mailbox", "math", "mimetypes", "multiprocessing.pool",
    "optparse", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets",
    "shelve", "shlex", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
    "types", "typing", "unittest.case", "urllib.parse", "urllib.request", "uuid", "warnings",
    "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
)
SPLITS = ("calibration", "evaluation")


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def _module_document(name: str) -> str:
    module = importlib.import_module(name)
    docs = [inspect.getdoc(module) or ""]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj):
            docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            docs += [inspect.getdoc(m) or "" for a, m in sorted(vars(obj).items())
                     if not a.startswith("_") and inspect.isroutine(m) and m.__doc__]
    return "\n\n".join(d for d in docs if d.strip())


def documents(split: str) -> list[str]:
    """The split's documents, in a fixed order."""
    return list(_documents(split))


@functools.lru_cache(maxsize=None)
def _documents(split: str) -> tuple[str, ...]:
    if split == "calibration":
        with warnings.catch_warnings():  # some modules' attributes are deprecated aliases
            warnings.simplefilter("ignore", DeprecationWarning)
            docs = [_module_document(name) for name in CALIBRATION_MODULES]
    elif split == "evaluation":
        from pydoc_data.topics import topics

        docs = [topics[k] for k in sorted(topics)]
    else:
        raise ValueError(f"unknown text split {split!r}; expected one of {SPLITS}")
    return tuple(d for d in docs if d.strip())


def file_documents(path) -> list[str]:
    """A user's text file as documents: its paragraphs (blocks separated by blank lines)."""
    from pathlib import Path

    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def token_chunks(tokenizer, split: str, length: int = 256, limit: int | None = None, seed: int = 0) -> torch.Tensor:
    """[N, length] token ids of a split (see `document_chunks`)."""
    return document_chunks(tokenizer, documents(split), length, limit, seed, name=f"{split} text")


def document_chunks(tokenizer, docs, length: int = 256, limit: int | None = None, seed: int = 0,
                    name: str = "text") -> torch.Tensor:
    """[N, length] token ids: consecutive windows of each document (a short tail is dropped, so
    a chunk never spans two documents), documents in a seeded shuffle so the first chunks
    come from many documents, stopping after `limit` chunks."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    per_doc = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        per_doc.append([ids[i:i + length] for i in range(0, len(ids) - length + 1, length)])
        if limit is not None and sum(map(len, per_doc)) >= limit * 4:
            break
    # Round-robin over documents: chunk i comes from document i mod D while they last.
    chunks = [w for round_ in _zip_longest(per_doc) for w in round_]
    if limit is not None:
        if len(chunks) < limit:
            raise ValueError(f"{name} has {len(chunks)} chunks of {length} tokens, fewer than {limit}")
        chunks = chunks[:limit]
    return torch.tensor(chunks, dtype=torch.long).reshape(-1, length)


def _zip_longest(lists):
    for i in range(max(map(len, lists), default=0)):
        yield [l[i] for l in lists if i < len(l)]

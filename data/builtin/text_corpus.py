"""The text-only stream: prose that installed packages ship, split into documents (paragraphs).

Sources, in a fixed order: scikit-learn's dataset descriptions (`sklearn/datasets/descr/*.rst`), the
Zen of Python (`this.s`, rot13-decoded) and the module docstrings of a fixed list of stdlib modules.
"""
import codecs
import contextlib
import importlib
import io
import pathlib
import re

import numpy as np
import sklearn

STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "colorsys",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum",
    "fractions", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "inspect", "io", "ipaddress", "itertools", "json", "keyword", "logging", "math",
    "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pprint", "queue",
    "random", "re", "sched", "secrets", "shlex", "shutil", "statistics", "string", "struct",
    "subprocess", "tempfile", "textwrap", "threading", "timeit", "tokenize", "typing", "unittest",
    "uuid", "warnings", "weakref", "zipfile")
MIN_DOCUMENT_BYTES = 16     # shorter paragraphs (headings, rules) are dropped
SPLIT_SEED = 1729           # fixed: held-out documents are the same for every run seed


def _sources() -> list[str]:
  descr = pathlib.Path(sklearn.__file__).parent / "datasets" / "descr"
  texts = [p.read_text(encoding="utf-8") for p in sorted(descr.glob("*.rst"))]
  with contextlib.redirect_stdout(io.StringIO()):   # `import this` prints the Zen
    this = importlib.import_module("this")
  texts.append(codecs.decode(this.s, "rot13"))
  for name in STDLIB_MODULES:
    texts.append(importlib.import_module(name).__doc__ or "")
  return texts


def documents() -> list[bytes]:
  """Every paragraph of every source, whitespace-trimmed, UTF-8, in a fixed order."""
  docs = []
  for text in _sources():
    for paragraph in re.split(r"\n\s*\n", text):
      paragraph = paragraph.strip()
      if len(paragraph.encode("utf-8")) >= MIN_DOCUMENT_BYTES:
        docs.append(paragraph.encode("utf-8"))
  return docs


def split_documents(docs: list[bytes], heldout_fraction: float) -> tuple[list[int], list[int]]:
  """(train, heldout) document indices; disjoint, sorted, fixed by SPLIT_SEED."""
  order = np.random.default_rng(SPLIT_SEED).permutation(len(docs))
  num_heldout = max(1, int(round(heldout_fraction * len(docs))))
  return sorted(order[num_heldout:].tolist()), sorted(order[:num_heldout].tolist())

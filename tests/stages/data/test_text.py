"""``data DOCS --format text``: documents from a folder, glob or text column, chunked into token windows that respect
document boundaries, split by document (no eval text in train, even in part), unreadable files skipped with a
reason, and bad sources as one line with nothing stored."""

from __future__ import annotations

import json
import re

import pytest

from llmops_jupyter.core.errors import ConfigError, DataError
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.stages.data.format import load_dataset
from llmops_jupyter.testing import tiny_document


def doc_text(seed: int, sentences: int) -> str:
    return tiny_document(seed, sentences)


def tiny_pdf(text: str) -> bytes:
    """A one-page PDF with a text layer (Helvetica, one line), written by hand: no PDF writer needed in tests."""
    content = f"BT /F1 10 Tf 20 700 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)


def ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z]+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@pytest.fixture()
def corpus(tmp_path):
    """A folder of documents in every readable form, plus files that cannot be read."""
    folder = tmp_path / "docs"
    (folder / "guide").mkdir(parents=True)
    texts = {}
    for k in range(10):
        name = f"guide/page{k}.md" if k % 2 else f"note{k}.txt"
        texts[name] = doc_text(k, 6 + k)
        (folder / name).write_text(texts[name])
    texts["short.txt"] = "Cedar basil delta."
    (folder / "short.txt").write_text(texts["short.txt"])
    html_body = doc_text(50, 5)
    (folder / "page.html").write_text(f"<html><head><title>T</title><script>var secret = 1;</script></head>"
                                      f"<body><h1>Intro</h1><p>{html_body}</p></body></html>")
    texts["page.html"] = "Intro\n\n" + html_body
    pdf_text = doc_text(60, 1)[:80]
    (folder / "manual.pdf").write_bytes(tiny_pdf(pdf_text))
    texts["manual.pdf"] = pdf_text
    (folder / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf body")
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n")
    return folder, texts


def run_text(registry, source, tokenizer, **kw):
    return Runner(registry).run("data", {"source": str(source), "format": "text", "tokenizer": str(tokenizer),
                                         "chunk_tokens": 24, "eval_fraction": 0.3, **kw})


def test_folder_is_chunked_by_document_and_no_eval_document_reaches_train(registry, tiny_model, corpus):
    from transformers import AutoTokenizer

    folder, texts = corpus
    res = run_text(registry, folder, tiny_model)
    ds = load_dataset(res.run_id, registry)
    m = ds.manifest
    assert m["layout"] == "text" and m["chunk_tokens"] == 24 and m["stride"] == 24
    # unreadable files are skipped, each with its reason; nothing else is lost
    skipped = {s["file"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {"image.txt", "latin1.txt", "broken.pdf", "logo.png"}
    assert "binary" in skipped["image.txt"] and "not valid UTF-8" in skipped["latin1.txt"]
    assert "not a readable PDF" in skipped["broken.pdf"] and "not a text document type '.png'" in skipped["logo.png"]
    docs = {d["doc"]: d for d in m["documents"]}
    assert set(docs) == set(texts)
    # every chunk of a document is in the document's split; the split is by document
    by_doc: dict[str, list[dict]] = {}
    for split, rows in (("train", ds.train), ("eval", ds.eval)):
        for r in rows:
            assert docs[r["doc"]]["split"] == split
            by_doc.setdefault(r["doc"], []).append(r)
    eval_docs = {d for d, v in docs.items() if v["split"] == "eval"}
    assert eval_docs and len(eval_docs) < len(docs) and m["counts"]["eval_documents"] == len(eval_docs)
    assert {r["doc_id"] for r in ds.eval}.isdisjoint({r["doc_id"] for r in ds.train})
    # ... and no eval document's text reaches the train split, even in part (no shared 8-word run)
    train_grams = set().union(*(ngrams(r["text"]) for r in ds.train))
    for d in eval_docs:
        assert not ngrams(texts[d]) & train_grams, d
    # windows never cross documents: a document's chunks, in order, are exactly its text
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    assert m["eos_token"] == tok.eos_token
    for d, chunks in by_doc.items():
        chunks.sort(key=lambda r: r["chunk"])
        # the document's end is marked once, on its last chunk; a text of whole windows ends in a 1-token window
        # that repeats the last text token (as context for the end-of-text token)
        assert [c["eos"] for c in chunks] == [False] * (len(chunks) - 1) + [True], d
        repeat = 1 if docs[d]["tokens"] % 24 == 0 else 0
        text = "".join(c["text"] for c in (chunks[:-1] if repeat else chunks))
        assert re.sub(r"\s", "", text) == re.sub(r"\s", "", texts[d]), d
        assert len(chunks) == docs[d]["chunks"] and all(c["n_tokens"] <= 24 for c in chunks)
        assert sum(c["n_tokens"] for c in chunks) == docs[d]["tokens"] + 1 + repeat  # + the end-of-text token
        assert docs[d]["tokens"] == len(tok(texts[d], add_special_tokens=False)["input_ids"])
    assert len(by_doc["short.txt"]) == 1 and by_doc["short.txt"][0]["text"] == texts["short.txt"]  # kept whole
    assert docs["note8.txt"]["chunks"] > 3
    assert "secret" not in " ".join(c["text"] for c in by_doc["page.html"])  # script text is not document text
    # the report: per-document counts and the skipped files with reasons
    report = str(res.outputs["report"])
    assert "documents train/eval" in report and "skipped: latin1.txt" in report and "Documents (13)" in report
    assert re.search(r"note8\.txt\s+(train|eval)\s+\d+\s+\d+\s+\d+", report)
    assert "<td>skipped: broken.pdf</td>" in res.outputs["report"]._repr_html_()


def test_overlapping_windows_and_a_glob(registry, tiny_model, corpus):
    folder, texts = corpus
    res = run_text(registry, f"{folder}/**/*.md", tiny_model, stride=12, eval_fraction=0.0)
    ds = load_dataset(res.run_id, registry)
    assert {r["doc"] for r in ds.train} == {str(folder / n) for n in texts if n.endswith(".md")}
    assert ds.manifest["skipped"] == [] and ds.eval == []
    one = sorted((r for r in ds.train if r["doc"].endswith("page9.md")), key=lambda r: r["chunk"])
    assert len(one) > 2
    for a, b in zip(one, one[1:]):  # the second half of each window is the start of the next one
        assert a["n_tokens"] == 24 and b["text"][:12] in a["text"] and b["text"] not in a["text"]
    assert [c["eos"] for c in one] == [False] * (len(one) - 1) + [True]  # overlapping windows: still one end
    doc = next(d for d in ds.manifest["documents"] if d["doc"].endswith("page9.md"))
    assert doc["chunks"] == len(one) and doc["tokens"] == 12 * (len(one) - 1) + one[-1]["n_tokens"] - 1


def test_end_of_text_only_at_each_document_end_once_and_no_target_twice(registry, tiny_model, tmp_path):
    """Each document's last chunk is trained with the tokenizer's EOS after its text; no other chunk is, a special
    token's text inside a document stays text, and a text of whole windows gets a window for the EOS that repeats
    only its last text token (as context: no token is a training target twice)."""
    from transformers import AutoTokenizer

    from llmops_jupyter.stages.finetune.sft import tokenize

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    eos = tok.eos_token_id

    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    words = doc_text(7, 12).split(" ")
    whole = next(t for t in (" ".join(words[:k]) for k in range(4, len(words))) if n_tokens(t) % 8 == 0)
    folder = tmp_path / "docs"
    folder.mkdir()
    texts = {"whole.txt": whole, "short.txt": "Fig.", "long.txt": doc_text(8, 6),
             "quotes.txt": f"{doc_text(9, 2)} The chat template closes a turn with {tok.eos_token} and goes on. "
                           f"{doc_text(10, 2)}"}
    for name, text in texts.items():
        (folder / name).write_text(text)
    res = Runner(registry).run("data", {"source": str(folder), "format": "text", "tokenizer": str(tiny_model),
                                        "chunk_tokens": 8, "eval_fraction": 0.0})
    ds = load_dataset(res.run_id, registry)
    assert ds.manifest["eos_token"] == tok.eos_token and ds.manifest["counts"]["documents"] == 4
    feats = tokenize(ds.train, tok, 8, completion_only=False)
    assert len(feats) == len(ds.train)  # every window, the EOS-only tail included, has a target
    by_doc: dict[str, list[tuple[dict, dict]]] = {}
    for row, f in zip(ds.train, feats):
        by_doc.setdefault(row["doc"], []).append((row, f))
    assert set(by_doc) == set(texts)
    for name, pairs in by_doc.items():
        pairs.sort(key=lambda p: p[0]["chunk"])
        assert [r["eos"] for r, _ in pairs] == [False] * (len(pairs) - 1) + [True], name
        ids = [f["input_ids"] for _, f in pairs]
        assert all(len(i) == r["n_tokens"] <= 8 for i, (r, _) in zip(ids, pairs))
        assert [i.count(eos) for i in ids] == [0] * (len(ids) - 1) + [1] and ids[-1][-1] == eos, name  # once, last
        # the chunks tile the document + EOS; each token is a target (not a chunk's first) at most once
        full = tok(texts[name], add_special_tokens=False, split_special_tokens=True)["input_ids"] + [eos]
        pos, targets = 0, []
        for i in ids:
            start = pos if full[pos:pos + len(i)] == i else pos - 1
            assert full[start:start + len(i)] == i, name
            targets += range(start + 1, start + len(i))
            pos = start + len(i)
        assert pos == len(full) and len(targets) == len(set(targets)) and targets[-1] == len(full) - 1, name
    assert n_tokens("Fig.") < 7 and len(by_doc["short.txt"]) == 1 and by_doc["short.txt"][0][1]["input_ids"][-1] == eos
    last, before = by_doc["whole.txt"][-1], by_doc["whole.txt"][-2]
    assert last[0]["n_tokens"] == 2 and last[1]["input_ids"] == [before[1]["input_ids"][-1], eos]  # repeat 1 token
    assert tok.eos_token in "".join(r["text"] for r, _ in by_doc["quotes.txt"])  # quoted as text, not as the token


def test_text_column_with_exact_and_near_duplicates_and_pii(registry, tiny_model, tmp_path):
    rows = [{"body": doc_text(k, 5) + (" Write to ann@example.com." if k == 1 else "")} for k in range(8)]
    rows.append({"body": rows[2]["body"]})  # exact duplicate
    rows.append({"body": rows[3]["body"].replace(".", "!", 1)})  # near duplicate
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = run_text(registry, src, tiny_model, columns={"text": "body"}, eval_fraction=0.25)
    ds = load_dataset(plain.run_id, registry)
    assert ds.manifest["dropped"] == {"exact duplicate": 1, "eval near-copy of train": 1}
    assert ds.manifest["pii"] == {"EMAIL": 1}
    # the near duplicate pair (lines 4 and 10) fell on both sides of the split: the eval copy is removed
    (copy,) = [d for d in ds.dropped if d["reason"] == "eval near-copy of train"]
    assert {copy["where"], copy["matched"]["where"]} == {"docs.jsonl line 4", "docs.jsonl line 10"}
    assert "ann@example.com" not in json.dumps(ds.train + ds.eval)
    assert ds.manifest["counts"]["documents"] == 8 and ds.manifest["documents"][0]["doc"] == "docs.jsonl line 1"
    near = load_dataset(run_text(registry, src, tiny_model, columns={"text": "body"}, near_dup=0.8).run_id, registry)
    assert near.manifest["dropped"] == {"exact duplicate": 1, "near duplicate": 1}
    dropped = {d["reason"]: d for d in near.dropped}
    assert dropped["near duplicate"]["matched"]["where"] == "docs.jsonl line 4"


def nothing_stored(registry):
    assert list(registry.tmp_dir.iterdir()) == []
    assert [a for a in registry.list_artifacts() if a.kind == "dataset"] == []


def test_bad_sources_are_one_line_and_store_nothing(registry, tiny_model, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(b"\x00\x01\x02binary")
    (bad / "b.pdf").write_bytes(b"not a pdf")
    with pytest.raises(DataError, match=r"bad' has no readable document \(2 file\(s\): a\.txt: binary") as info:
        run_text(registry, bad, tiny_model)
    assert "\n" not in str(info.value)
    nothing_stored(registry)
    with pytest.raises(DataError, match=r"b\.pdf: cannot be read as a text document: not a readable PDF"):
        run_text(registry, bad / "b.pdf", tiny_model)
    nothing_stored(registry)
    with pytest.raises(DataError, match=r"Glob .* matches no file"):
        run_text(registry, tmp_path / "*.nothing", tiny_model)
    with pytest.raises(DataError, match=r"No text column in the data; found columns: q\."):
        (tmp_path / "t.jsonl").write_text('{"q": "x"}\n')
        run_text(registry, tmp_path / "t.jsonl", tiny_model)
    nothing_stored(registry)
    with pytest.raises(ConfigError, match="--tokenizer is required with --format text"):
        Runner(registry).run("data", {"source": str(bad), "format": "text"})
    with pytest.raises(ConfigError, match="stride.*larger than --chunk-tokens"):
        run_text(registry, bad, tiny_model, stride=48)

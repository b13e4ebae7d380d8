from pathlib import Path

import pytest

import llmops_jupyter
from llmops_jupyter.stages.adapt.rag import augment, chunk_text, load_index

pytest.importorskip("faiss")
pytest.importorskip("sentence_transformers")
CORPUS = Path(llmops_jupyter.__file__).parent / "data" / "rag_corpus"


def test_chunking_overlaps_and_cuts_at_whitespace():
    text = " ".join(f"word{i}" for i in range(300))
    chunks = chunk_text(text, size=100, overlap=20)
    assert all(len(c) <= 100 for _, c in chunks)
    assert all(not c.startswith(" ") and "word" in c.split()[0] for _, c in chunks)
    for (s1, c1), (s2, _) in zip(chunks, chunks[1:]):
        assert s2 < s1 + len(c1)  # consecutive chunks overlap
    assert " ".join(c for _, c in chunks).count("word299") >= 1


def test_index_retrieves_the_right_document(shell, registry):
    res = shell.run_line_magic("llmops", f"index {CORPUS} --chunk-size 200 --overlap 40 --questions "
                                         f"{CORPUS / 'questions.jsonl'} --k 1")
    assert res.metrics["documents"] == 4 and res.metrics["recall_at_1"] >= 0.75
    idx = load_index(res.run_id, registry)
    hits = idx.search(["How long does charging take?"], k=2)[0]
    assert hits[0]["doc"] == "zephyr-battery.md" and hits[0]["score"] > hits[1]["score"]
    prompt = augment("How long does charging take?", hits)
    assert "[1]" in prompt and "2 hours" in prompt
    assert [a.kind for a in registry.lineage_chain(res.artifact)] == ["documents", "index"]

"""Sanity checks for the speculative-decoding prompt suite (tests/spec_prompts.py).

The suite is data; these tests check the properties issue 3 and the benchmarks rely on: enough
prompts per category, unique ids, well-formed chats, grounded prompts that really quote their
references, and every rendered prompt within PROMPT_TOKEN_LIMIT tokens of SmolLM2's tokenizer.
"""

from __future__ import annotations

import ast
from collections import Counter

import pytest

import spec_prompts as sp


def _norm(text: str) -> str:
    return " ".join(text.split())


def _prompt_text(p: dict) -> str:
    return "\n".join(m["content"] for m in p["messages"])


def test_ids_unique_and_prefixed():
    ids = sp.ids()
    assert len(ids) == len(set(ids)) == len(sp.PROMPTS)
    prefix = {"code_edit": "code-", "summary": "summary-", "doc_qa": "docqa-", "multi_turn": "chat-", "story": "story-"}
    for p in sp.PROMPTS:
        assert p["id"].startswith(prefix[p["category"]]), p["id"]
        assert sp.get(p["id"]) is p


def test_category_counts():
    counts = Counter(p["category"] for p in sp.PROMPTS)
    assert set(counts) == set(sp.CATEGORIES)
    assert len(sp.PROMPTS) >= 65
    assert all(counts[c] >= 13 for c in sp.CATEGORIES), counts
    assert sum(len(sp.by_category(c)) for c in sp.CATEGORIES) == len(sp.PROMPTS)
    assert [p["id"] for p in sp.grounded()] == [p["id"] for p in sp.PROMPTS if p["category"] != "story"]
    with pytest.raises(ValueError, match="unknown category"):
        sp.by_category("poems")


def test_messages_well_formed():
    for p in sp.PROMPTS:
        msgs = p["messages"]
        assert msgs and msgs[-1]["role"] == "user", p["id"]
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in msgs), p["id"]
        roles = [m["role"] for m in msgs if m["role"] != "system"]
        assert roles[0] == "user" and all(a != b for a, b in zip(roles, roles[1:])), p["id"]
        assert all(m["role"] == "system" for m in msgs if m["role"] not in ("user", "assistant")), p["id"]


def test_references_quoted_in_prompt():
    for p in sp.PROMPTS:
        if p["category"] == "story":
            assert p["references"] == [], p["id"]
            continue
        assert p["references"], p["id"]
        text = _prompt_text(p)
        for ref in p["references"]:
            assert ref.strip() and ref in text, p["id"]


def test_category_shapes():
    for p in sp.by_category("code_edit"):
        code = p["references"][0]
        assert 15 <= len(code.splitlines()) <= 60, p["id"]
        ast.parse(code)  # real Python, not pseudo-code
    for p in sp.by_category("summary"):
        assert 150 <= len(p["references"][0].split()) <= sp.SUMMARY_MAX_WORDS, p["id"]
    for p in sp.by_category("doc_qa"):
        assert _norm(p["answer"]) in _norm(p["references"][0]), p["id"]
    for p in sp.by_category("multi_turn"):
        prior = p["messages"][:-1]
        assert 3 <= len(prior) <= 5, p["id"]
        assert any(m["role"] == "assistant" for m in prior), p["id"]


def test_prompts_fit_token_limit(smollm2_path):
    from edge_rt.api import open_model
    from edge_rt.loading.chat_template import CHATML_TEMPLATE, render_chat
    from edge_rt.loading.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(open_model(smollm2_path).metadata)
    # Rendered as LLM.apply_chat_template renders it.
    bos = tok.token_text(tok.bos_id) if tok.bos_id is not None else ""
    eos = tok.token_text(tok.eos_id) if tok.eos_id is not None else ""
    for p in sp.PROMPTS:
        text = render_chat(tok.chat_template or CHATML_TEMPLATE, p["messages"], add_generation_prompt=True,
                           bos_token=bos, eos_token=eos)
        n = len(tok.encode(text, parse_special=True))
        assert 20 < n <= sp.PROMPT_TOKEN_LIMIT, (p["id"], n)
        for ref in p["references"]:
            assert len(tok.encode(ref)) >= 10, p["id"]  # long enough for a copy drafter to matter

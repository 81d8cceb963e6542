"""Speculative decoding on the real model: the prompt suite (tests/spec_prompts.py) decodes to
exactly the tokens of plain decoding, on the torch backend and on the llama.cpp backend.

Reference: plain decoding of the same backend and weights in the same process.
"""

from __future__ import annotations

import pytest
from spec_prompts import PROMPTS, grounded

import edge_rt

GEN = 40  # tokens per prompt: enough for several verify steps, affordable for 70 prompts in CI


def fresh(llm, ids, **opts):
    """Generate from an empty cache: prefix reuse re-forwards the prompt's last token alone, which
    can move a near-tie compared with the chunked prefill of a fresh run (as in llama.cpp), so both
    sides of a comparison start from the same state."""
    llm.reset()
    return llm.generate(ids, **opts)


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return edge_rt.load(smollm2_path, device="cpu", n_ctx=2048)


def test_suite_covers_the_issue_categories():
    cats = {p["category"] for p in PROMPTS}
    assert cats == {"code_edit", "summary", "doc_qa", "multi_turn", "story"}
    assert len(PROMPTS) >= 50


@pytest.mark.slow
def test_greedy_speculation_reproduces_plain_decoding_on_the_prompt_suite(llm):
    accepted = drafted = 0
    for p in PROMPTS:
        ids = llm.chat_ids(p["messages"])
        plain = fresh(llm, ids, max_tokens=GEN)
        fast = fresh(llm, ids, max_tokens=GEN, speculative="auto", references=p.get("references") or None)
        assert fast.token_ids == plain.token_ids, p["id"]
        assert fast.finish_reason == plain.finish_reason, p["id"]
        sp = fast.stats.speculative
        accepted, drafted = accepted + sp.accepted, drafted + sp.drafted
    assert accepted > 0.3 * drafted  # the drafts were real work, not a no-op


@pytest.mark.slow
def test_seeded_sampling_with_speculation_reproduces_plain_sampling(llm):
    for p in grounded()[::6]:
        ids = llm.chat_ids(p["messages"])
        opts = dict(max_tokens=GEN, temperature=0.7, top_p=0.95, repetition_penalty=1.1, seed=1234)
        plain = fresh(llm, ids, **opts)
        fast = fresh(llm, ids, speculative="ngram", **opts)
        assert fast.token_ids == plain.token_ids, p["id"]


@pytest.mark.llamacpp
@pytest.mark.slow
def test_speculation_on_the_llamacpp_backend_reproduces_its_plain_decoding(smollm2_path, llama_cpp_module):
    llm = edge_rt.load(smollm2_path, backend="llamacpp", n_ctx=2048, threads=2)
    assert llm.backend.exact_verify
    for p in PROMPTS[::5]:
        ids = llm.chat_ids(p["messages"])
        plain = fresh(llm, ids, max_tokens=GEN)
        fast = fresh(llm, ids, max_tokens=GEN, speculative="auto", references=p.get("references") or None)
        assert fast.token_ids == plain.token_ids, p["id"]

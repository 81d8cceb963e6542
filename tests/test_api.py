"""The Python API's contracts on a tiny random GGUF: state stays consistent under misuse."""

import pytest

import edge_rt
from edge_rt.errors import ContextOverflowError, InvalidOptionError
from gguf_fixtures import write_tiny_gguf


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("api") / "tiny.gguf")
    return edge_rt.load(path, device="cpu", n_ctx=128)


def test_same_thread_cannot_interleave_a_second_request_into_an_open_stream(llm):
    expected = llm.generate("hello there", max_tokens=8, ignore_eos=True).token_ids
    pieces = llm.stream_pieces("hello there", max_tokens=8, ignore_eos=True)
    first = next(pieces)
    with pytest.raises(InvalidOptionError, match="busy"):
        llm.generate("something else entirely", max_tokens=4)
    with pytest.raises(InvalidOptionError, match="busy"):
        llm.reset()
    rest = [p.token_id for p in pieces if p.token_id is not None]
    assert [first.token_id] + rest == expected  # the open stream was not disturbed
    assert llm.generate("abc", max_tokens=2, ignore_eos=True).token_ids  # usable again


def test_closed_stream_releases_the_model(llm):
    s = llm.stream("hello", max_tokens=8, ignore_eos=True)
    next(s)
    s.close()
    assert len(llm.generate("hello", max_tokens=3, ignore_eos=True).token_ids) == 3


def test_chat_session_history_survives_bad_input(llm):
    chat = llm.session(system="sys")
    chat.send("hi", max_tokens=3)
    before = list(chat.messages)
    with pytest.raises(InvalidOptionError):
        chat.send("again", temperature=-1)
    assert chat.messages == before
    with pytest.raises(ContextOverflowError):
        chat.send("word " * 400, max_tokens=4)
    assert chat.messages == before
    chat.send("short", max_tokens=3)
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_chat_session_drops_oldest_turns_to_leave_room_for_the_reply(llm):
    chat = llm.session(system="sys")
    for i in range(12):
        chat.send(f"turn {i} " + "x " * 8, max_tokens=4)
    assert chat.messages[0]["role"] == "system"
    assert "turn 11" in chat.messages[-2]["content"]
    assert all("turn 0 " not in m["content"] for m in chat.messages)  # oldest dropped


@pytest.mark.parametrize("call", [
    lambda m: m.perplexity([1, 2, 3, 4], window=1),
    lambda m: m.perplexity([1, 2, 99999]),
    lambda m: m.generate([1, 2.5, 3]),
    lambda m: m.generate([1, 2, 3], chat=True),
    lambda m: m.generate([1, -1]),
])
def test_bad_ids_and_windows_are_invalid_options(llm, call):
    with pytest.raises(InvalidOptionError):
        call(llm)


def test_info_reports_loaded_memory(llm):
    info = llm.info()
    assert info["memory"]["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 128 * 4  # layers, k+v, kv heads, hd, n_ctx, fp32
    assert info["load_s"] > 0 and info["device"]["kind"] == "cpu"


def test_load_reports_progress(tmp_path):
    path = write_tiny_gguf(tmp_path / "p.gguf")
    seen = []
    edge_rt.load(path, device="cpu", n_ctx=32, progress=lambda done, total: seen.append((done, total)))
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] > 0
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)

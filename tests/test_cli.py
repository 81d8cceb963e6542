"""The CLI as a user drives it: `edge-rt run --json`, `edge-rt chat` over stdin."""

import json
import os
import subprocess
import sys

import pytest

import edge_rt


def cli(*args, stdin=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "edge_rt", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_run_json_reports_tokens_and_timings(smollm2_path):
    r = cli("run", "The capital of France is", "--model", smollm2_path, "--max-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["generated_tokens"] == len(out["token_ids"]) == 8
    assert out["prompt_tokens"] == 5
    assert out["prefill_s"] > 0 and out["decode_s"] > 0 and out["decode_tokens_per_s"] > 0
    assert 50e6 < out["peak_rss_bytes"] < 4e9
    # same greedy tokens as the Python API
    llm = edge_rt.load(smollm2_path, device="cpu")
    assert llm.generate("The capital of France is", max_tokens=8).token_ids == out["token_ids"]
    assert out["text"] == llm.decode(out["token_ids"])


def test_run_chat_flag_uses_template(smollm2_path):
    r = cli("run", "What is 2+2?", "--model", smollm2_path, "--max-tokens", "12", "--chat", "--json")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["prompt_tokens"] > 20  # system prompt + ChatML markup around the question


def test_chat_session_over_stdin(smollm2_path):
    script = "Hello! What is your name?\n/stats\n/reset\nWhat is 1+1?\n/bogus\n/exit\n"
    r = cli("chat", "--model", smollm2_path, "--max-tokens", "16", stdin=script)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("tok/s") == 2  # one timing line per reply
    assert "history cleared" in r.stderr and "unknown command /bogus" in r.stderr
    stats, _ = json.JSONDecoder().raw_decode(r.stderr[r.stderr.index("{") :])  # may nest (speculative stats)
    assert stats["kv_cache_bytes"] > 0
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["run", "hi", "--device", "gpu"], ["run", "hi", "--top-p", "2"],
                                  ["inspect", "/nonexistent/model.gguf"]])
def test_cli_errors_are_one_line_exit_2(args, smollm2_path):
    r = cli(*args)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr

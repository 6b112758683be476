"""infer/sample.py: the published stories260k greedy text, resume after a kill, sharding, bad input."""
import json

import pytest

from selfreward.infer import sample as cli


pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_stories260k_greedy_from_bos(stories260k, tmp_path):
    inp = _write(tmp_path / "in.jsonl", [{"id": "bos", "prompt": ""}])
    out = tmp_path / "out.jsonl"
    rc = cli.main(["--model", str(stories260k), "--input", str(inp), "--output", str(out),
                   "--temperature", "0", "--max-tokens", "256", "--ignore-eos", "--raw-prompt"])
    assert rc == 0
    (rec,) = _read(out)
    assert len(rec["token_ids"]) == 256 and rec["finish_reason"] == "length" and rec["sample"] == 0
    # llama2.c, which published the text, ends its output with one newline after the last token
    assert rec["text"] + "\n" == (stories260k / "greedy_from_bos.txt").read_text()


REQUESTS = [{"id": "a", "prompt": "Once upon a time"},
            {"id": "b", "prompt": "The cat", "max_tokens": 5},
            {"id": 3, "messages": [{"role": "user", "content": "Tell me a story."}]},
            {"id": "d", "prompt": "Lily had a ball", "temperature": 0.0}]
ARGS = ["--n", "2", "--temperature", "0.8", "--top-p", "0.9", "--max-tokens", "10", "--seed", "1", "--logprobs"]


def _run(stories, inp, out, *extra):
    return cli.main(["--model", str(stories), "--input", str(inp), "--output", str(out), *ARGS, *extra])


def test_resume_after_kill_and_sharding(stories260k, tmp_path, monkeypatch, capsys):
    inp = _write(tmp_path / "in.jsonl", REQUESTS)
    full = tmp_path / "full.jsonl"
    assert _run(stories260k, inp, full) == 0
    ref = _read(full)
    assert [(r["id"], r["sample"]) for r in ref] == [(q["id"], j) for q in REQUESTS for j in range(2)]
    assert all(len(r["token_ids"]) == len(r["logprobs"]) <= 10 for r in ref)
    assert len(ref[2]["token_ids"]) <= 5 and ref[6]["token_ids"] == ref[7]["token_ids"]   # overrides
    err = capsys.readouterr().err
    assert "4/4 prompts" in err and "tok/s" in err and "ETA" in err

    # a killed run: "b" finished (planted text proves it is not regenerated), "a" half written, a cut line
    out = tmp_path / "out.jsonl"
    planted = [dict(r, text="PLANTED") for r in ref[2:4]]
    part = tmp_path / "out.jsonl.partial"
    part.write_text("".join(json.dumps(r) + "\n" for r in [ref[0]] + planted) + json.dumps(ref[4])[:25])
    assert _run(stories260k, inp, out) == 0
    got = _read(out)
    assert [r["text"] for r in got] == [r["text"] for r in ref[:2]] + ["PLANTED"] * 2 + [r["text"] for r in ref[4:]]
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in ref]
    assert [p.name for p in tmp_path.glob("out.jsonl.*")] == ["out.jsonl.meta.json"]   # what made it (issue 19)
    assert "4 already done" not in capsys.readouterr().err
    assert _run(stories260k, inp, out) == 0            # complete: nothing to do, nothing changes
    assert _read(out) == got and "0 prompts to do (4 already done)" in capsys.readouterr().err

    # two ranks (process group stubbed; the sharding and merge logic are what is tested)
    import torch.distributed as dist
    for name in ("init_process_group", "barrier", "destroy_process_group"):
        monkeypatch.setattr(dist, name, lambda *a, **k: None)
    sharded = tmp_path / "sharded.jsonl"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        assert _run(stories260k, inp, sharded) == 0
        if rank == 1:
            assert not sharded.exists()
            assert {r["id"] for r in _read(tmp_path / "sharded.jsonl.rank1")} == {"b", "d"}
    got = _read(sharded)    # same seeds per id whatever the shard; log-probs differ only by batch rounding
    assert [{k: v for k, v in r.items() if k != "logprobs"} for r in got] == \
        [{k: v for k, v in r.items() if k != "logprobs"} for r in ref]
    for a, b in zip(got, ref):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)


@pytest.mark.parametrize("line,field", [
    ('{"id": 1, "prompt": 5}', "field 'prompt'"),
    ('{"prompt": "x"}', "field 'id'"),
    ('{"id": 1, "prompt": "x", "max_tokens": "9"}', "field 'max_tokens'"),
    ('{"id": "a", "prompt": "x"}', "field 'id': duplicate"),
    ('{"id": 2, "messages": [{"role": "bot", "content": "x"}]}', "field 'messages[0]'"),
    ('{"id": 2, "prompt": "x"', "not valid JSON"),
])
def test_bad_line_reported_with_file_line_field(tmp_path, capsys, line, field):
    inp = tmp_path / "bad.jsonl"
    inp.write_text('{"id": "a", "prompt": "fine"}\n' + line + "\n")
    rc = cli.main(["--model", str(tmp_path), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"bad.jsonl:2: {field}" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_torchrun_two_ranks_gloo(stories260k, tmp_path):
    """A real 2-process torchrun (gloo, CPU) writes the same file as one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    inp = _write(tmp_path / "in.jsonl", REQUESTS)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    args = ["--num-samples", "2", "--temperature", "0.8", "--top-p", "0.9", "--max-tokens", "10", "--seed", "1"]
    assert cli.main(["--model", str(stories260k), "--input", str(inp), "--output", str(one), *args]) == 0
    script = Path(cli.__file__).resolve()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), "--model", str(stories260k), "--input", str(inp), "--output", str(two), *args],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank 1/2" in r.stderr and [p.name for p in tmp_path.glob("two.jsonl.*")] == ["two.jsonl.meta.json"]
    strip = lambda rs: [(x["id"], x["sample"], x["text"], x["token_ids"], x["finish_reason"]) for x in rs]  # noqa: E731
    assert strip(_read(two)) == strip(_read(one))

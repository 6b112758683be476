"""Several nodes (nodes.py): the loop on two "nodes" on localhost (two drivers, --nnodes 2, one rank each, gloo)
makes the same files and, within float tolerance, the same DPO weights as one process; the start-up check of
the shared folder, a stale session, node 0's end and error and lost heartbeat, as a follower sees them."""
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from selfreward import cli, nodes
from selfreward.records import DataError, read_jsonl, write_json
from selfreward.recipes.pipeline import folder
from selfreward.recipes.self_reward import main as loop_main
from recipes_tiny import SEEDS, tiny_chat_model, write_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loop_on_two_nodes_equals_one_process(tmp_path):
    m1 = tiny_chat_model(tmp_path / "m1")
    prompts = write_prompts(tmp_path / "p.jsonl", SEEDS[:4])
    flags = ["--init-model", str(m1), "--prompt-source", str(prompts), "--n-prompts", "4", "--iterations", "1",
             "--candidates-n", "2", "--candidates-max-tokens", "8", "--judge-k", "2", "--judge-max-tokens", "8",
             "--judge-template", "short", "--score-from", "expected", "--chunk", "1", "--engine-device", "cpu",
             "--dpo-device", "cpu", "--dpo-max-steps", "2", "--dpo-batch-size", "2", "--dpo-max-length", "128",
             "--dpo-lr", "1e-3", "--dpo-warmup-steps", "0", "--dpo-dropout", "0"]
    port, env = free_port(), dict(os.environ, OMP_NUM_THREADS="1")
    two = [subprocess.Popen([sys.executable, "-m", "selfreward.recipes.self_reward", "--run-dir", str(tmp_path / "two"),
                             *flags, "--nnodes", "2", "--node-rank", str(r), "--rdzv-endpoint", f"127.0.0.1:{port}",
                             "--rdzv-timeout", "120"], env=env, cwd=tmp_path, stdout=open(tmp_path / f"node{r}.log", "w"),
                            stderr=subprocess.STDOUT) for r in (1, 0)]   # the follower first: it waits for node 0
    try:
        one = loop_main(["--run-dir", str(tmp_path / "one"), *flags])     # 1 process, meanwhile
        for p, r in zip(two, (1, 0)):
            assert p.wait(timeout=240) == 0, (tmp_path / f"node{r}.log").read_text()[-3000:]
    finally:
        for p in two:
            if p.poll() is None:
                p.kill()
    a, b = folder(SimpleNamespace(run_dir=tmp_path / "one"), 1), folder(SimpleNamespace(run_dir=tmp_path / "two"), 1)
    for name in ("candidates.jsonl", "judgments.jsonl", "pairs.jsonl"):
        assert read_jsonl(a / name) == read_jsonl(b / name), name
    assert one[-1]["counts"]["pairs"] >= 2 and not list(b.glob("*.rank*"))
    w1, w2 = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    w0 = load_file(m1 / "model.safetensors")
    assert w1.keys() == w2.keys() and any((w1[k] != w0[k]).any() for k in w1)     # DPO moved the weights
    for k in w1:   # 2 ranks sum their halves of the batch where 1 process sums it whole: float32 rounding only
        assert (w1[k] - w2[k]).abs().max() <= 1e-5, k
    l1, l2 = ([r["loss"] for r in read_jsonl(d / "dpo" / "metrics.jsonl") if "loss" in r] for d in (a, b))
    assert len(l1) == len(l2) == 2 and all(abs(x - y) <= 1e-5 for x, y in zip(l1, l2))
    assert not (tmp_path / "two" / ".nodes").exists()                              # the session folder is gone
    log = (tmp_path / "node1.log").read_text()
    assert "[self-reward]" not in log and "[self-reward] iter 1" in (tmp_path / "node0.log").read_text()


def node(run, rank: int, timeout: float = 20, nnodes: int = 2) -> SimpleNamespace:
    return SimpleNamespace(run_dir=str(run), nnodes=nnodes, node_rank=rank, rdzv_endpoint="127.0.0.1:1",
                           rdzv_timeout=timeout)


def following(cfg) -> dict:
    """nodes.follow(cfg) in a thread -> {"error": what it raised (None: it returned)} once joined."""
    out: dict = {}

    def go():
        try:
            nodes.follow(cfg)
            out["error"] = None
        except Exception as e:
            out["error"] = e
    out["thread"] = t = threading.Thread(target=go, daemon=True)
    t.start()
    return out


def test_stale_session_end_error_heartbeat_and_nnodes(tmp_path, monkeypatch):
    run = tmp_path / "run"
    # what a killed run left: a session whose node 0 ended, naming another node 1
    write_json(run / ".nodes" / "leader.json", {"session": "old", "nnodes": 2})
    write_json(run / ".nodes" / "old" / "ready.json", {"nodes": {"1": "someone-else"}})
    write_json(run / ".nodes" / "old" / "end.json", {"error": "stale"})
    f = following(node(run, 1))
    time.sleep(1.5)
    assert f["thread"].is_alive()                     # the stale end is not this node's
    with nodes.lead(node(run, 0)):
        assert nodes.leading()
    f["thread"].join(10)
    assert f["error"] is None and not (run / ".nodes").exists() and not nodes.leading()

    f = following(node(run, 1))
    with pytest.raises(ValueError, match="boom"):
        with nodes.lead(node(run, 0)):
            raise ValueError("boom")
    f["thread"].join(10)
    assert isinstance(f["error"], cli.Stopped) and str(f["error"]) == "node 0 stopped: boom"

    monkeypatch.setattr(nodes, "_beat", lambda *a: None)   # node 0 as if killed right after the start
    f = following(node(run, 1, timeout=3))
    with nodes.lead(node(run, 0)):
        f["thread"].join(10)
    assert isinstance(f["error"], cli.Stopped) and "no heartbeat from node 0" in str(f["error"])

    f = following(node(run, 1, timeout=4, nnodes=3))   # a node started with another --nnodes
    with pytest.raises(DataError, match="node.s. 1 run with another --nnodes than this node's 2"):
        with nodes.lead(node(run, 0)):
            pass
    f["thread"].join(10)
    assert isinstance(f["error"], DataError) and "did not take this node" in str(f["error"])
    assert not (run / ".nodes").exists()


def test_nodes_that_do_not_share_the_folder_stop_at_the_start(tmp_path, capsys):
    """Node 0 and node 1 given folders that are not the same one (as on two machines without a shared
    filesystem): each stops with an error after --rdzv-timeout, before any stage; bad node flags at the door."""
    common = ["--init-model", "m1", "--seed-prompts", "s.jsonl", "--nnodes", "2", "--rdzv-timeout", "1",
              "--rdzv-endpoint", "127.0.0.1:29500"]
    for rank, run, needle in ((0, "a", "node(s) 1 did not check in within --rdzv-timeout 1 s"),
                              (1, "b", "node 0 did not take this node (--node-rank 1) in within")):
        with pytest.raises(SystemExit) as e:
            cli.run_main(loop_main, ["--run-dir", str(tmp_path / run), "--node-rank", str(rank), *common])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and needle in err and "shared filesystem" in err
    assert not (tmp_path / "a" / "config.json").exists()       # nothing ran
    for bad, needle in ((["--node-rank", "2"], "--node-rank 2: must be below --nnodes 2"),
                        (["--rdzv-endpoint", "node001"], "needs HOST:PORT")):
        with pytest.raises(DataError, match=needle):
            loop_main(["--run-dir", str(tmp_path / "c"), *common, *bad])

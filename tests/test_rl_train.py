"""train/rl.py end to end on a tiny model and a tiny reward model: the engine samples from the new weights
after every step (its greedy replies equal a fresh engine built from that step's export), in one process
and on 2 ranks (torchrun, gloo, FSDP2); 2 ranks equal 1 rank; SIGKILL + resume equals an uninterrupted run;
a NaN reward stops the run keeping the last good checkpoint; bad input names file:line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recipes_tiny import SEEDS, tiny_chat_model, write_prompts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from selfreward.model.reward_model import load_reward_model, save_reward_model
    from selfreward.model.tokenizer import Tokenizer
    d = tmp_path_factory.mktemp("rl")
    m0 = tiny_chat_model(d / "m0")
    rm = load_reward_model(m0, seed=3)
    save_reward_model(rm, rm.cfg, d / "rm", Tokenizer.load(m0).pad_id, tokenizer_dir=m0)
    # probes longer than one KV block (block size 4): a stale prefix cache would serve old-weight KV
    probes = write_prompts(d / "probes.jsonl", SEEDS[:3])
    data = write_prompts(d / "prompts.jsonl", SEEDS)
    args = ["--model", str(m0), "--data", str(data), "--reward", "rm", "--reward-model", str(d / "rm"),
            "--max-steps", "3", "--batch-size", "4", "--num-samples", "2", "--max-new-tokens", "6", "--lr", "1e-2",
            "--final-lr", "1e-3", "--warmup-steps", "0", "--probe-data", str(probes), "--probe-every", "1",
            "--engine-block-size", "4", "--engine-max-num-seqs", "16", "--threads", "1"]
    return d, m0, args


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def fresh_greedy(model_dir: Path, probes: list[str]) -> tuple[list[list[int]], list[float]]:
    """Greedy ids and their log-probs from a fresh engine on `model_dir` (default block size: 16)."""
    from selfreward.infer.config import EngineConfig, load_engine
    from selfreward.infer.sequence import SamplingParams
    eng = load_engine(model_dir, EngineConfig(device="cpu", max_num_seqs=16))
    outs = eng.generate([eng.tokenizer.user_ids(p) for p in probes],
                        SamplingParams(temperature=0.0, max_tokens=6, logprobs=True))
    return [o[0].token_ids for o in outs], [x for o in outs for x in o[0].logprobs]


def check_handoff(run: Path, m0: Path) -> None:
    """probes.jsonl at step k (the trainer's engine after its k-th sync) == a fresh engine on exports/step_k:
    the same greedy ids and the same log-probs of them (1e-5: the weights, not only the argmax)."""
    probes = rows(run / "probes.jsonl")
    assert [p["step"] for p in probes] == [0, 1, 2, 3]
    flat = lambda p: [x for lp in p["logprobs"] for x in lp]  # noqa: E731
    for p in probes:
        ids, lps = fresh_greedy(m0 if p["step"] == 0 else run / "exports" / f"step_{p['step']}", SEEDS[:3])
        assert p["ids"] == ids, p["step"]
        assert max(abs(a - b) for a, b in zip(flat(p), lps, strict=True)) <= 1e-5, p["step"]
    # the updates changed what the engine computes (else the equalities above would prove nothing)
    assert max(abs(a - b) for a, b in zip(flat(probes[0]), flat(probes[1]))) > 1e-3


def test_engine_samples_the_new_weights_one_process(setup):
    from selfreward.model.checkpoint import load_model
    from selfreward.train import rl
    d, m0, args = setup
    last = rl.main(args + ["--output", str(d / "one"), "--export-every", "1", "--micro-batch-size", "2"])
    check_handoff(d / "one", m0)
    m = rows(d / "one" / "metrics.jsonl")
    assert [r["step"] for r in m] == [1, 2, 3] and abs(m[0]["kl"]) < 1e-6    # step 1: policy == reference
    for k in ("reward_mean", "reward_std", "kl", "value_loss", "entropy", "response_len", "sample_tokens_per_s",
              "train_tokens_per_s", "sync_s", "sync_share"):
        assert k in last and last[k] == last[k], k
    assert 0 < last["sync_share"] < 1
    sd = load_model(d / "one" / "model").state_dict()          # HF export: the policy, no value head
    ex = load_model(d / "one" / "exports" / "step_3").state_dict()
    assert all(torch.equal(sd[k], ex[k]) for k in sd)


def test_two_ranks_equal_one_rank_and_handoff_under_fsdp(setup):
    from selfreward.model.checkpoint import load_model
    d, m0, args = setup
    common = args + ["--export-every", "1"]
    log = d / "two.log"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "train" / "rl.py"), *common, "--output", str(d / "two"),
                          "--micro-batch-size", "1"],
                         cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=open(log, "w"),
                         stderr=subprocess.STDOUT)
    try:
        from selfreward.train import rl
        rl.main(common + ["--output", str(d / "ref1")])         # 1 process, no accumulation
        assert p.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
    check_handoff(d / "two", m0)
    one, two = rows(d / "ref1" / "metrics.jsonl"), rows(d / "two" / "metrics.jsonl")
    for a, b in zip(one, two, strict=True):
        for k in ("loss", "reward_mean", "kl", "value_loss", "entropy", "response_len"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a["step"], k)
    x, y = load_model(d / "ref1" / "model").state_dict(), load_model(d / "two" / "model").state_dict()
    assert all((x[k] - y[k]).abs().max().item() <= 1e-5 for k in x)


def test_sigkill_then_resume_equals_uninterrupted(setup):
    from selfreward.model.checkpoint import load_model
    from selfreward.train import rl
    d, m0, args = setup
    a = [x if x != "3" else "6" for x in args] + ["--estimator", "rloo", "--save-every", "2"]   # 6 steps
    run = d / "killed"
    p = subprocess.Popen([sys.executable, str(ROOT / "train" / "rl.py"), *a, "--output", str(run),
                          "--sleep-per-step", "0.4"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    latest = run / "checkpoints" / "latest"
    try:
        deadline = time.time() + 120
        while not (latest.exists() and latest.read_text().strip() >= "step_00000002"):
            assert p.poll() is None and time.time() < deadline, "run ended before it could be killed"
            time.sleep(0.05)
        time.sleep(0.6)                                  # inside step 4
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL and not (run / "model").exists()
    rl.main(a + ["--output", str(run), "--resume"])
    rl.main(a + ["--output", str(d / "straight")])
    x, y = load_model(run / "model").state_dict(), load_model(d / "straight" / "model").state_dict()
    assert all((x[k] - y[k]).abs().max().item() <= 1e-6 for k in x)
    mk, ms = rows(run / "metrics.jsonl"), rows(d / "straight" / "metrics.jsonl")
    assert [r["step"] for r in mk] == list(range(1, 7))      # no step logged twice
    assert all(abs(u["loss"] - v["loss"]) <= 1e-6 * max(1.0, abs(v["loss"])) for u, v in zip(mk, ms))
    assert [r["step"] for r in rows(run / "probes.jsonl")] == list(range(7))
    # the value head (trained, not exported) was restored too: the last value losses agree
    assert abs(mk[-1]["value_loss"] - ms[-1]["value_loss"]) <= 1e-6


def test_nan_reward_stops_keeping_last_good_checkpoint(setup):
    """A NaN reward at step 3 stops before the update; no export; `latest` is the last good checkpoint."""
    from selfreward.cli import parse_config
    from selfreward.train import rl
    from selfreward.train.checkpointing import TrainingStopped
    d, m0, args = setup
    calls = []

    def reward(prompts, responses):
        calls.append(1)
        return [float("nan") if len(calls) == 3 else 0.5] * len(prompts)
    cfg = parse_config(rl.RLConfig, args + ["--output", str(d / "nan"), "--save-every", "1"])
    # as the other trainers: the weights after step 2 gave the NaN, so step_2 is dropped, step_1 kept
    with pytest.raises(TrainingStopped, match=r"non-finite loss .* at step 3.*step_00000001"):
        rl.train(cfg, reward=reward)
    assert (d / "nan" / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (d / "nan" / "checkpoints" / "step_00000002").exists()
    assert not (d / "nan" / "model").exists()


def test_reward_weight_one_minus_beta_is_the_papers_objective(setup):
    """--reward-weight 1-beta trains on (1 - beta) r - beta KL: at beta 0.5 the very run of r / 2 - beta KL,
    and not the run of r - beta KL."""
    from selfreward.cli import parse_config
    from selfreward.model.checkpoint import load_model
    from selfreward.train import rl
    d, m0, args = setup
    base = args + ["--probe-every", "0", "--max-steps", "2", "--beta", "0.5"]
    r = lambda scale: lambda ps, rs: [scale * (len(x) % 5) / 4 for x in rs]  # noqa: E731
    runs = {}
    for name, weight, scale in (("paper", "1-beta", 1.0), ("halved", "1", 0.5), ("plain", "1", 1.0)):
        cfg = parse_config(rl.RLConfig, base + ["--output", str(d / f"w_{name}"), "--reward-weight", weight])
        last = rl.train(cfg, reward=r(scale))
        runs[name] = (last, load_model(d / f"w_{name}" / "model").state_dict())
    (pl, p), (hl, h), (_, q) = runs["paper"], runs["halved"], runs["plain"]
    assert all(torch.equal(p[k], h[k]) for k in p)
    assert pl["reward_mean"] == pytest.approx(2 * hl["reward_mean"])     # the metrics log the reward itself
    assert any(not torch.equal(p[k], q[k]) for k in p)


def checkpoint_weights(run: Path) -> dict:
    """The model's tensors in a run's latest DCP checkpoint (the value head or critic included)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    dcp_to_torch_save(ckpt, run / "ckpt.pt")
    return torch.load(run / "ckpt.pt", weights_only=False)["model"]


def test_value_model_is_a_critic_of_its_own_and_learns(setup):
    """--value-model M0: a critic initialised from that checkpoint, trained by the value loss. With a reward of 1
    for every reply and beta 0 every return G_t is 1 and the baseline starts at 0, so the first value loss is
    0.5 (per token, 0.5 (V - G)^2), by hand; it falls as the critic learns, its transformer moves away from M0,
    and the policy's first update is the default run's (both baselines 0; the value loss reaches no policy
    weight), the export holding the policy alone."""
    from selfreward.cli import parse_config
    from selfreward.model.checkpoint import load_model
    from selfreward.train import rl
    d, m0, args = setup
    base = args + ["--probe-every", "0", "--beta", "0", "--grad-clip", "0", "--value-lr", "1e-2"]
    one = lambda ps, rs: [1.0] * len(ps)  # noqa: E731
    runs = {}
    for name, extra in (("critic", ["--value-model", str(m0)]), ("head", [])):
        for steps in (1, 6):
            out = d / f"v_{name}_{steps}"
            rl.train(parse_config(rl.RLConfig, base + extra + ["--output", str(out), "--max-steps", str(steps)]),
                     reward=one)
            runs[name, steps] = out
    losses = [r["value_loss"] for r in rows(runs["critic", 6] / "metrics.jsonl")]
    assert losses[0] == pytest.approx(0.5, abs=1e-9)
    assert losses[-1] < 0.1 * losses[0], losses
    assert all(b < a for a, b in zip(losses[1:], losses[2:])), losses

    w, start = checkpoint_weights(runs["critic", 6]), load_model(m0).state_dict()
    body = {k[len("value_head.body."):]: v for k, v in w.items() if k.startswith("value_head.body.")}
    assert body.keys() == start.keys()
    assert max((body[k] - start[k]).abs().max().item() for k in start) > 1e-3       # the critic itself learned
    assert {k for k in checkpoint_weights(runs["head", 6]) if k.startswith("value_head")} == \
        {"value_head.weight", "value_head.bias"}                                     # the default: the linear head

    a, b = (load_model(runs[name, 1] / "model").state_dict() for name in ("critic", "head"))
    assert a.keys() == start.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3               # the step did move it


def test_value_model_two_ranks_equal_one_rank(setup):
    """The critic under FSDP2 (2 ranks, gloo, micro-batch 1): the losses and value losses of 1 process, 1e-5."""
    from selfreward.train import rl
    d, m0, args = setup
    common = args + ["--probe-every", "0", "--value-model", str(m0), "--value-lr", "1e-2"]
    log = d / "vm_two.log"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "train" / "rl.py"), *common, "--output", str(d / "vm_two"), "--micro-batch-size",
                        "1"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=open(log, "w"),
                       stderr=subprocess.STDOUT, timeout=240)
    assert r.returncode == 0, log.read_text()[-3000:]
    rl.main(common + ["--output", str(d / "vm_one")])
    one, two = rows(d / "vm_one" / "metrics.jsonl"), rows(d / "vm_two" / "metrics.jsonl")
    assert len(one) == 3
    for a, b in zip(one, two, strict=True):
        for k in ("loss", "value_loss", "reward_mean", "kl"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a["step"], k)


def test_value_model_refuses_another_vocabulary(setup, tmp_path):
    from hf_tiny import make_hf_checkpoint
    d, m0, args = setup
    other = make_hf_checkpoint(tmp_path / "other", "llama_tied", vocab=77, hidden=32, layers=1, heads=2,
                               kv_heads=1, intermediate=64)
    r = subprocess.run([sys.executable, str(ROOT / "train" / "rl.py"), *args, "--output", str(tmp_path / "o"),
                        "--value-model", str(other)],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "error: --value-model" in r.stderr and "77 tokens" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_bad_prompt_record_names_file_and_line(setup, tmp_path):
    d, m0, args = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    a = [x if x != str(d / "prompts.jsonl") else str(bad) for x in args]
    r = subprocess.run([sys.executable, str(ROOT / "train" / "rl.py"), *a, "--output", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and f"error: {bad}:2: missing field 'prompt'" in r.stderr, r.stderr


def test_handoff_refuses_a_partial_sync(setup):
    """A sync that would leave an engine parameter unwritten, or write one the engine lacks, is an error."""
    from selfreward.infer.config import EngineConfig, load_engine
    from selfreward.model.checkpoint import load_model
    from selfreward.train.rollout import sync_weights
    d, m0, _ = setup
    eng = load_engine(m0, EngineConfig(device="cpu", max_num_seqs=4))
    model = load_model(m0)
    model.value_head = torch.nn.Linear(model.cfg.hidden_size, 1)
    sync_weights(eng, model)                                       # the value head is skipped by name
    model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(KeyError, match="no parameter 'extra.weight'"):
        sync_weights(eng, model)
    del model.extra
    model.norm = None                                              # a policy without its final norm
    with pytest.raises(KeyError, match="not written: \\['norm'\\]"):
        sync_weights(eng, model)


@pytest.mark.parametrize("extra, msg", [(["--beta", "-1"], "--beta -1: must be >= 0"),
                                        (["--max-steps", "0", "--epochs", "0"],
                                         "--epochs 0 / --max-steps 0: 0 optimizer steps to take")])
def test_refuses_what_the_other_trainers_refuse(setup, tmp_path, extra, msg):
    """Issue 33 cases 6 and 7: a negative KL weight, or a run of 0 steps (the SFT policy exported as the RL
    model), is refused by the trainers' shared checks (TrainConfig.check) before any
    model loads: nothing trained, nothing exported."""
    from selfreward.cli import ConfigError
    from selfreward.train import rl
    d, m0, args = setup
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=msg):
        rl.main(args + ["--output", str(out), *extra])
    assert not (out / "model").exists() and not (out / "metrics.jsonl").exists()

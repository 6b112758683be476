"""The trainers' device comes from their config and reaches the model: `--device auto` (the default) is
cuda:LOCAL_RANK wherever CUDA exists, an unsharded model is moved there by parallelize(), and the loop's
`--dpo-device` reaches the DPO run it launches. Checked on the CPU (CUDA itself is not here)."""

import pytest
import torch

from selfreward import cli
from selfreward.recipes import self_reward
from selfreward.recipes.pipeline import folder
from selfreward.recipes.self_reward import LoopConfig, stage_dpo
from selfreward.train.parallel import Dist, init_distributed, parallelize, train_device
from cli_harness import run_cli
from guarantee_fixtures import build, dpo_args, one_thread, sft_args


def test_device_choice():
    assert train_device("auto", 3, cuda=True) == torch.device("cuda", 3)
    assert train_device("auto", 0, cuda=False) == torch.device("cpu")
    assert train_device("cpu", 1, cuda=True) == torch.device("cpu")
    assert train_device("cuda", 2, cuda=True) == torch.device("cuda", 2)
    with pytest.raises(ValueError, match="CUDA is not available"):
        train_device("cuda", 0, cuda=False)
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        train_device("gpu", 0, cuda=True)


def test_one_process_on_a_gpu_node_trains_on_cuda(monkeypatch):
    """The gap this closes: a single-process run (no torchrun) used to stay on the CPU on a GPU node."""
    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_to.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    d = init_distributed("auto")
    assert d.device == torch.device("cuda", 0) and not d.sharded and set_to == [torch.device("cuda", 0)]
    assert init_distributed("cpu").device == torch.device("cpu")


def test_parallelize_moves_an_unsharded_model_to_the_device():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.layers = []                                     # parallelize() walks .layers for checkpointing
    parallelize(model, Dist(device=torch.device("meta")))
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_device_flag_reaches_the_trainer(tmp_path, name):
    w = build(tmp_path)
    args = (sft_args if name == "sft" else dpo_args)(w, tmp_path / "run", "--device", "cuda")
    with one_thread():
        code, err = run_cli(name, args)
    assert code == 2 and "error: --device cuda: CUDA is not available" in err and "Traceback" not in err


def test_loop_dpo_device_reaches_the_dpo_run(tmp_path, monkeypatch):
    cfg = cli.build(LoopConfig, cli.parser(LoopConfig).parse_args(
        ["--run-dir", str(tmp_path / "run"), "--init-model", str(tmp_path / "m1"), "--dpo-device", "cuda"]))
    it = folder(cfg, 1)
    it.mkdir(parents=True)
    (it / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    seen = []
    monkeypatch.setattr(self_reward.cli, "launch", lambda fn, dcfg, *a, **k: seen.append(dcfg))
    stage_dpo(cfg, 1)
    assert [c.device for c in seen] == ["cuda"]


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_cpu_bf16_trains_under_autocast_close_to_fp32(tmp_path, name):
    """--cpu-bf16: the forward's matmuls in bf16 (the loss moves from the fp32 run's by bf16 rounding, not more:
    SFT's first step, DPO's second, since its first is ln 2 in both), the weights stay fp32 (the export's dtype as
    the fp32 run's)."""
    import json
    from safetensors.torch import load_file
    w = build(tmp_path)
    make = sft_args if name == "sft" else dpo_args
    runs = {}
    for tag, extra in (("fp32", ()), ("bf16", ("--cpu-bf16",))):
        with one_thread():
            code, err = run_cli(name, make(w, tmp_path / tag, "--max-steps", "2", "--dropout", "0", *extra))
        assert code == 0, err
        rows = [json.loads(x) for x in (tmp_path / tag / "metrics.jsonl").read_text().splitlines()]
        runs[tag] = ([r["loss"] for r in rows if "loss" in r],
                     {t.dtype for t in load_file(str(tmp_path / tag / "model" / "model.safetensors")).values()})
    (l32, d32), (l16, d16) = runs["fp32"], runs["bf16"]
    assert d16 == d32 == {torch.float32}
    i = 0 if name == "sft" else 1
    assert l16[i] != l32[i] and abs(l16[i] - l32[i]) <= 0.02 * abs(l32[i]), (l16, l32)


def test_cpu_bf16_dpo_reference_in_the_policys_precision(tmp_path):
    """--cpu-bf16 with the cached reference: the reference pass runs under the policy's autocast, so at the first
    step (policy = reference, dropout 0) the implicit rewards beta * (log pi - log ref) are 0 up to bf16's
    run-to-run rounding, and the loss is ln 2, as in fp32 (a reference cached in fp32 would carry each sequence's
    bf16 rounding into the log-ratios)."""
    import json
    import math
    w = build(tmp_path)
    with one_thread():
        code, err = run_cli("dpo", dpo_args(w, tmp_path / "o", "--max-steps", "1", "--dropout", "0", "--cpu-bf16",
                                            "--beta", "1.0"))
    assert code == 0, err
    first = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])
    # a reference cached in fp32 gave -8.8e-4 / -5.4e-4 and a loss 1.7e-4 above ln 2 here
    assert abs(first["reward_chosen"]) < 1e-4 and abs(first["reward_rejected"]) < 1e-4, first
    assert abs(first["loss"] - math.log(2)) < 1e-5, first
    assert any("cpubf16" in p.name for p in (tmp_path / "o" / "ref_cache").iterdir())

"""recipes/real_demo.py (issue 29): `--smoke` end to end on a tiny random model with SmolLM2-135M-Instruct's shape
(GQA 9 / 3 heads, tied embeddings, ChatML with a default system turn, a tokenizer.json), the OASST fixture of every
clone; the summary's rows and figures exist and lie in range; a rerun skips every finished stage."""

import json

import pytest

pytest.importorskip("if_verifiable")

from conftest import OASST_20   # noqa: E402
from safetensors.torch import load_file, save_file   # noqa: E402
from hf_tiny import make_hf_checkpoint   # noqa: E402

# SmolLM2-Instruct's chat template: a default system turn when the chat has none
SMOL_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

COMMA = 8.0


def smol_like(out):
    """A byte-level BPE tokenizer.json (SmolLM2's specials: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2) and a
    random tied llama with 9 query / 3 KV heads of width 8."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [json.loads(line)["prompt"]["text"] for line in OASST_20.read_text().splitlines()]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = SMOL_CHATML
    fast.save_pretrained(out)
    make_hf_checkpoint(out, "llama_tied", vocab=tok.get_vocab_size(), hidden=72, heads=9, kv_heads=3,
                       intermediate=96, layers=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    # the comma's row x COMMA: a comma in some replies and none in others, so the checker (punctuation:no_comma)
    # tells some candidates apart and the oracle has pairs
    weights = load_file(out / "model.safetensors")
    weights["model.embed_tokens.weight"][tok.token_to_id(",")] *= COMMA
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_smoke_end_to_end_and_rerun_skips(tmp_path, one_thread, capsys):
    from selfreward.recipes import real_demo
    m0 = smol_like(tmp_path / "m0")
    argv = ["--model", str(m0), "--oasst", str(OASST_20), "--run-dir", str(tmp_path / "run"), "--smoke",
            "--max-length", "4096", "--temperature", "1.0"]
    s = real_demo.main(argv)
    assert "steps of 2 (micro 1 x accum 2 x world 1)" in capsys.readouterr().out    # --rl-micro-batch reached rl.py
    rows = {r["model"]: r for r in s["rows"]}
    loops = ["self-rewarding", "self-rewarding (instructions rubric)"]
    assert list(rows) == ["M0", "RL-checker", "DPO-oracle", *loops]
    for r in rows.values():
        assert {"accuracy", "se", "n"} <= set(r)
        if r["model"] not in loops or r["accuracy"] is not None:   # the loop's rows need pairs
            assert 0 <= r["accuracy"] <= 1 and 0 <= r["se"] <= 0.5 and r["n"] == 6
    assert rows["DPO-oracle"]["pairs"] >= 1
    # each row against M0 on the same items: the difference and its paired SE, by hand from the replies
    import math
    base = {r["id"]: r["strict_ok"] for r in map(json.loads, (tmp_path / "run" / "replies" / "m0.jsonl").read_text().splitlines())}
    oracle = {r["id"]: r["strict_ok"] for r in map(json.loads, (tmp_path / "run" / "replies" / "oracle.jsonl").read_text().splitlines())}
    d = [int(oracle[k]) - int(base[k]) for k in base]
    mu = sum(d) / 6
    assert rows["DPO-oracle"]["vs_M0"] == pytest.approx(rows["DPO-oracle"]["accuracy"] - rows["M0"]["accuracy"])
    assert rows["DPO-oracle"]["paired_se"] == pytest.approx(math.sqrt(sum((x - mu) ** 2 for x in d) / 5 / 6))
    # IFEval's instruction-level accuracy of M0: the library's per-instruction verdicts, counted here
    from if_verifiable.common import evaluate_instructions
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    held = {r["id"]: r for r in map(json.loads, (tmp_path / "run" / "sets" / "heldout.jsonl").read_text().splitlines())}
    verdicts = []
    for rep in map(json.loads, (tmp_path / "run" / "replies" / "m0.jsonl").read_text().splitlines()):
        rec = held[rep["id"]]
        res = evaluate_instructions(rep["response"], rec["instruction_id_list"], rec["kwargs"], rec["prompt"],
                                    INSTRUCTION_DICT)[0]
        verdicts += [x.strict_pass for x in res] or [False] * len(rec["instruction_id_list"])   # empty reply: none
    assert rows["M0"]["instruction_accuracy"] == pytest.approx(sum(verdicts) / len(verdicts))
    for name, template in zip(loops, ("default", "instructions")):
        loop = rows[name]
        assert loop["judge_template"] == template
        assert loop["judgments"] >= 1 and 0 <= loop["judge_parse_rate"] <= 1
        assert loop["judge_pairs"] == loop["pairs"]
        if loop["judge_pairs"]:
            assert loop["judge_agree"] + loop["judge_disagree"] + loop["judge_tie"] == pytest.approx(1)
    # the second loop judged the same candidates under the instruction rubric
    for folder, template in (("loop", "default"), ("loop2", "instructions")):
        settings = json.loads((tmp_path / "run" / folder / "iter_1" / "manifest.json").read_text())["settings"]
        assert settings["judge"]["template"] == template
    assert (tmp_path / "run" / "loop2" / "iter_1" / "candidates.jsonl").read_bytes() == \
        (tmp_path / "run" / "oracle" / "iter_1" / "candidates.jsonl").read_bytes()
    lab = s["rlaif_labels"]
    assert 1 <= lab["pairs"] <= 4
    for k in ("agreement_one_order", "agreement_both_orders"):
        assert 0 <= lab[k] <= 1
    assert 0 <= lab["position_bias"]["one_order"] <= 1
    assert s["sets"]["heldout"] == 6 and 1 <= s["sets"]["train"] <= 16 + 4
    # the self-instruct step: M0's new requests, each with verifiable instructions, in training only
    train = [json.loads(x) for x in (tmp_path / "run" / "sets" / "train.jsonl").read_text().splitlines()]
    made = [json.loads(x) for x in (tmp_path / "run" / "instruct" / "iter_1" / "prompts.jsonl").read_text().splitlines()]
    ok = {f"si-{r['id']}": r["prompt"] for r in made if r["verdict"] == "ok" and r["source"] == "generated"}
    si = [r for r in train if r["id"].startswith("si-")]
    assert len(si) == s["sets"]["self_instruct"] and {r["id"] for r in si} <= set(ok)
    for r in si:
        assert r["prompt"].startswith(ok[r["id"]] + "\n\n") and 1 <= len(r["instruction_id_list"]) <= 2
    # Table 4 on the held-out trees' ranked groups: recipes.oasst's split with the sets' seed and fraction
    from selfreward.recipes.oasst import load_messages, split_groups
    held = {r.id for r in split_groups(load_messages(OASST_20), 0.25, 0, lambda r: r.id)[1]}
    groups = [json.loads(x) for x in (tmp_path / "run" / "sets" / "oasst" / "groups_eval.jsonl").read_text().splitlines()]
    assert groups and {g["id"] for g in groups} <= held
    for name in ("M0", "self-rewarding"):
        t4 = s["table4"][name]
        assert t4["groups"] == min(3, len(groups)) and t4["replies"] == sum(len(g["replies"]) for g in groups[:3])
        assert set(t4["sampled"]) == set(t4["expected"]) >= {"pairwise_accuracy", "spearman"}
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["rows"] == s["rows"]
    assert len((run / "replies" / "m0.jsonl").read_text().splitlines()) == 6

    capsys.readouterr()
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*.jsonl")}
    again = real_demo.main(argv)
    out = capsys.readouterr().out
    for key in ("sets", "M0", "RL-checker", "DPO-oracle", *loops, "rlaif_labels", "table4"):
        assert f"[real] {key}: done earlier, skipped" in out
    assert again["rows"] == s["rows"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps     # nothing rewritten


def test_door(tmp_path):
    from selfreward import cli
    from selfreward.recipes import real_demo
    from selfreward.records import DataError
    with pytest.raises(cli.ConfigError, match="--rl-micro-batch 3: must be a divisor of --rl-batch"):
        real_demo.main(["--model", str(tmp_path), "--rl-micro-batch", "3"])
    with pytest.raises(cli.ConfigError, match="--n-candidates 1"):
        real_demo.main(["--model", str(tmp_path), "--n-candidates", "1"])
    with pytest.raises(DataError, match="not a checkpoint folder"):
        real_demo.main(["--model", str(tmp_path / "none"), "--run-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    with pytest.raises(cli.ConfigError, match="--judge-k 1: must be >= 2 with --meta-judge"):
        real_demo.main(["--model", str(tmp_path), "--meta-judge"])


def test_meta_judge_reaches_the_self_rewarding_rows_only(tmp_path):
    """--meta-judge / --length-control go to the self-rewarding rows' loop config; the DPO-oracle's pairs come
    from the checker (score_from sampled), where there are no judgments to meta-judge."""
    from selfreward import cli
    from selfreward.recipes import real_demo, real_rows
    argv = ["--model", str(tmp_path), "--meta-judge", "--judge-k", "2", "--length-control", "0.2"]
    cfg = cli.build(real_demo.RealConfig, cli.parser(real_demo.RealConfig, "").parse_args(argv))
    loop = real_rows.loop_config(cfg, tmp_path / "loop")
    oracle = real_rows.loop_config(cfg, tmp_path / "oracle", score_from="sampled")
    assert (loop.meta_judge, loop.length_control, loop.judge.k) == (True, 0.2, 2)
    assert (oracle.meta_judge, oracle.length_control) == (False, 0.2)

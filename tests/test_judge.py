"""The judge's score parser (a table of nasty cases + hypothesis fuzzing), template filling, K-means."""
import pytest
from hypothesis import given, settings, strategies as st

from selfreward.recipes.judge import DEFAULT_TEMPLATE, SLOTS, JudgeConfig, TemplateError, judge_prompt, load_rubric, \
    mean_score, parse_score
from selfreward.recipes.prompts import check_slots

NASTY = [
    ("Score: 4", 4.0),
    ("The reply is fine.\nScore: 3", 3.0),
    ("score:4", 4.0),                                  # no space, lower case
    ("SCORE:   2", 2.0),
    ("Score: **4**", 4.0),                             # markdown emphasis
    ("Score: 4.5", 4.5),
    ("Score: 5.0", 5.0),
    ("Score: 5/5", 5.0),
    ("Score: 3.", 3.0),                                # sentence full stop
    ("Score: 0", 0.0),
    ("Score: 1 then later Score: 4", 4.0),            # the last label wins
    ("Score: 4\nScore: 2\n", 2.0),
    ("Score:\n3", 3.0),
    ("Score：2", 2.0),                                 # full-width colon
    ("", None),
    ("no score here", None),
    ("Score:", None),
    ("Score: ", None),
    ("Score: five", None),
    ("Score: -1", None),
    ("Score: 6", None),                                # out of range
    ("Score: 45", None),                               # not 4
    ("Score: 5.5", None),
    ("Score: 4.5.3", None),
    ("Score: 1e3", None),
    ("Score: .5", None),
    ("Score: ٣", None),                                # Arabic-Indic digit: \d would take it
    ("Score: 3 ... on reflection, Score: N/A", None),  # last label has no number: unparsable, not 3
    ("Underscore: 4", None),                           # 'score' inside a word
    ("Scores: 4", None),
    ("Score 4", None),                                 # no colon
    ("I give 5 points. Final answer 5", None),
]


@pytest.mark.parametrize("text,want", NASTY)
def test_parse_score_table(text, want):
    assert parse_score(text) == want


_no_label = st.text(alphabet=st.characters(blacklist_characters="sScCoOrReE:："), max_size=60)


@settings(max_examples=300, deadline=None, database=None)
@given(prefix=st.text(max_size=80), n=st.integers(0, 5), dec=st.one_of(st.none(), st.integers(0, 9)),
       tail=_no_label)
def test_parse_score_fuzz_last_label_wins(prefix, n, dec, tail):
    """Whatever comes before, a final valid label followed by text without another label gives its number."""
    num = f"{n}" if dec is None or n == 5 else f"{n}.{dec}"
    assert parse_score(f"{prefix}\nScore: {num} {tail}") == float(num)


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=200))
def test_parse_score_fuzz_never_out_of_range(text):
    s = parse_score(text)
    assert s is None or 0.0 <= s <= 5.0


def test_template_fill_and_checks(tmp_path):
    p = judge_prompt(DEFAULT_TEMPLATE, "Say {response} please", "Fine {instruction}")
    assert "Say {response} please" in p and "Fine {instruction}" in p  # one-pass, no re-substitution
    custom = "Q={instruction} A={response} {other} {{x}}"
    assert judge_prompt(custom, "i", "r") == "Q=i A=r {other} {{x}}"
    f = tmp_path / "t.txt"
    f.write_text("only {instruction}")
    with pytest.raises(TemplateError, match=r"t\.txt.*\{response\}"):
        load_rubric(f)
    f.write_text(custom)
    assert load_rubric(f) == custom
    assert load_rubric(None) == DEFAULT_TEMPLATE
    check_slots(DEFAULT_TEMPLATE, SLOTS, "default")
    with pytest.raises(TemplateError):
        JudgeConfig(template="no slots")


def test_mean_score_excludes_unparsable():
    assert mean_score([4, None, 2]) == 3
    assert mean_score([None, None]) is None
    assert mean_score([1.5]) == 1.5


def test_fit_prompt_to_budget():
    from conftest import TOKENIZER_DIR
    from selfreward.model.tokenizer import Tokenizer
    from selfreward.recipes.judge import SHORT_TEMPLATE
    from selfreward.recipes.prompts import fit_prompt
    tok = Tokenizer.load(TOKENIZER_DIR)
    ins, resp = "Why is the sky blue?", "Because of Rayleigh scattering. " * 40
    full = tok.user_ids(judge_prompt(SHORT_TEMPLATE, ins, resp))
    vals = {"instruction": ins, "response": resp}
    assert fit_prompt(tok, SHORT_TEMPLATE, vals, len(full)) == (full, False)
    for budget in (len(full) - 1, 400, 260):
        ids, cut = fit_prompt(tok, SHORT_TEMPLATE, vals, budget)
        text = tok.decode(ids)
        assert cut and len(ids) <= budget and len(ids) > budget - 40   # cut about the excess, not much more
        assert "Request: Why is the sky blue?" in text and "[...]" in text and "Reply: Because of" in text
    with pytest.raises(ValueError, match="template alone"):
        fit_prompt(tok, SHORT_TEMPLATE, vals, 100)

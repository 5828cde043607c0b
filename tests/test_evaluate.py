"""Tests for evaluate.py: the hard strings of answer extraction, ARC lenient vs strict, majority vote, the CLI."""

import json
import os
import subprocess
import sys

import pytest

import evaluate

# -----------------------------------------------------------------------------
# GSM8K / LaTRO numbers


@pytest.mark.parametrize("text,expected", [
    ("The answer is 18.", "18"),                                   # trailing period is not a decimal point
    ("The answer is 18.0", "18"),                                  # canonical form: numeric equality by string
    ("So she pays $1,000. The answer is $1,000.", "1000"),         # $ and thousands commas dropped
    ("The answer is -3.5 degrees.", "-3.5"),                       # negative decimal
    ("It drops by 7 so the answer is -7", "-7"),                   # case-insensitive prefix
    ("The answer is 3. Wait, no. The answer is 4 apples, not 5.", "4"),  # last prefix, first number after it
    ("She has 12 and buys 5 more, 17 in total.", "17"),            # no prefix: the last number
    ("First 3-4 pieces", "4"),                                     # a hyphen between numbers is not a minus sign
    ("The answer is 1,234,567.", "1234567"),
    ("The answer is .5", "0.5"),
    ("The answer is 0.50", "0.5"),
    ("I computed 12. The answer is unknown.", None),               # prefix without a number: no answer
    ("no number at all", None),
    ("", None),
    ("The answer is 100", "100"),                                  # not 1E+2
])
def test_extract_number(text, expected):
    assert evaluate.extract_number(text) == expected


@pytest.mark.parametrize("output,gold,correct", [
    ("The answer is 15.", "5", False),             # the gold inside another number is wrong
    ("The answer is 5.", "15", False),
    ("The answer is 18.00", "18", True),           # numeric equality
    ("... so $1,000. The answer is 1000", "1,000", True),
    ("The answer is -2", "2", False),
    ("The answer is 2", "-2", False),
    ("The total is 42", "42", True),               # no prefix: the last number
    ("The answer is 42. I computed 41 before.", "42", True),
    ("nothing", "42", False),
])
def test_latro_gsm8k_correct(output, gold, correct):
    assert evaluate.latro_correct("gsm8k", output, {"answer": gold}) is correct


def test_latro_text_answers():
    ex = {"answer": "Tom is a lempus."}
    assert evaluate.latro_correct("prosqa", "Tom is a terpus. The answer is Tom is a lempus.", ex)
    assert evaluate.latro_correct("prosqa", "The answer is Tom is a lempus", ex)
    assert not evaluate.latro_correct("prosqa", "The answer is Tom is a scrompus.", ex)
    assert not evaluate.latro_correct("prosqa", "Tom is a lempus.", ex)  # no answer template: no answer
    assert evaluate.latro_correct("prontoqa", "The answer is True.", {"answer": "True"})
    assert not evaluate.latro_correct("prontoqa", "The answer is True.", {"answer": "False"})
    # multiplication answers are digit strings, compared as text (not as the single number "1")
    assert evaluate.latro_correct("multiplication", "The answer is 1 3 9 4.", {"answer": "1 3 9 4"})
    assert not evaluate.latro_correct("multiplication", "The answer is 1 3 9.", {"answer": "1 3 9 4"})

# -----------------------------------------------------------------------------
# Coconut


@pytest.mark.parametrize("output,gold,correct", [
    ("Q\nstep\n### 18", "18", True),
    ("### 1,000", "1000", True),                    # commas removed on both sides
    ("### 1000", "1,000", True),
    ("### 18.0", "18", False),                      # exact match, as released
    ("### 15", "5", False),
    ("### 5 ", "5", True),
    ("## 3 # 4 ### 5", "5", True),                  # the text after the LAST '#'
    ("no hashes 5", "5", False),
    ("### Tom is a lempus.", "Tom is a lempus.", True),
    ("### Tom is a lempus", "Tom is a lempus.", False),
])
def test_coconut_correct(output, gold, correct):
    assert evaluate.coconut_correct(output, gold) is correct
    assert evaluate.check_answer("gsm8k", output, {"answer": gold}) is correct

# -----------------------------------------------------------------------------
# ARC

OPTIONS = [("A", "heat"), ("B", "heat and light"), ("C", "sound"), ("D", "wind")]


def arc(gold_label):
    return {"answer": dict(OPTIONS)[gold_label], "options": OPTIONS}


@pytest.mark.parametrize("output,gold,lenient,strict", [
    ("The answer is heat and light.", "B", True, True),
    ("the answer is HEAT AND LIGHT", "B", True, True),     # case-insensitive
    ("The answer is heat and light.", "A", True, False),   # released: "heat" is a substring -> lenient accepts
    ("The answer is heat.", "A", True, True),
    ("The answer is (C).", "C", False, True),              # a letter: strict only (released matches texts)
    ("The answer is C", "C", False, True),
    ("The answer is sound or wind.", "C", True, False),    # two options named: strict refuses
    ("Sound is made by wind. I think sound.", "C", False, False),  # no "the answer is": no answer
    ("The answer is wind. No wait, the answer is sound.", "C", True, True),  # the last one counts
    ("The answer is wind. No wait, the answer is sound.", "D", False, False),
])
def test_arc_lenient_and_strict(output, gold, lenient, strict):
    assert evaluate.latro_correct("arc", output, arc(gold)) is lenient
    assert evaluate.latro_correct("arc", output, arc(gold), strict=True) is strict


def test_arc_extract_and_coconut_check():
    assert evaluate.arc_extract("The answer is wind and heat", OPTIONS) == "wind"   # first named, for votes
    assert evaluate.arc_extract("The answer is (B)", OPTIONS, strict=True) == "heat and light"
    assert evaluate.arc_extract("The answer is (B) or (C)", OPTIONS, strict=True) is None
    assert evaluate.check_answer("arc", "Q\n### heat and light", arc("B"))
    assert not evaluate.check_answer("arc", "Q\n### sound", arc("B"))

# -----------------------------------------------------------------------------
# maj@k


@pytest.mark.parametrize("answers,winner", [
    (["3", "4", "4"], "4"),
    (["2", "3", "3", "2"], "2"),          # tie: the first seen wins (deterministic)
    ([None, None, "3"], "3"),             # None never wins over a real answer
    ([None, "5", None, "6", None], "5"),
    ([None, None], None),
    ([], None),
])
def test_majority_vote(answers, winner):
    assert evaluate.majority_vote(answers) == winner


def test_majority_at_k_votes_on_canonical_numbers():
    outputs = ["The answer is 18.0", "The answer is 17", "The answer is 18", "no idea", "The answer is 17."]
    # 18.0 and 18 are one answer: 18 (2 votes, seen first) beats 17 (2 votes, seen later)
    assert evaluate.majority_correct("gsm8k", outputs, {"answer": "18"})
    assert not evaluate.majority_correct("gsm8k", outputs, {"answer": "17"})
    assert not evaluate.majority_correct("gsm8k", ["x", "y"], {"answer": "1"})
    assert evaluate.majority_correct("arc", ["The answer is wind", "The answer is sound", "the answer is wind."],
                                     arc("D"))

# -----------------------------------------------------------------------------
# accuracy over a generate function, and the CLI


def test_accuracy_counts_each_example_once():
    examples = [{"answer": str(i)} for i in range(10)]
    calls = []

    def generate(batch):  # right on even gold answers
        calls.append(len(batch))
        return [f"The answer is {ex['answer'] if int(ex['answer']) % 2 == 0 else 99}." for ex in batch]

    acc, outputs = evaluate.accuracy(generate, "gsm8k", examples, batch_size=4)
    assert calls == [4, 4, 2] and len(outputs) == 10 and acc == 0.5
    assert evaluate.score("gsm8k", examples[:2], ["### 0", "### 2"], style="coconut") == [True, False]


def test_cli_scores_a_predictions_file(tmp_path):
    preds = tmp_path / "preds.jsonl"
    rows = [{"answer": "7", "output": "The answer is 7."}, {"answer": "8", "output": "The answer is 9."},
            {"answer": "9", "outputs": ["The answer is 9", "The answer is 8", "The answer is 9"]}]
    preds.write_text("\n".join(json.dumps(r) for r in rows))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "evaluate.py"), "--task", "gsm8k",
                             "--preds", str(preds)], capture_output=True, text=True, check=True)
    assert "gsm8k: 2/3 correct = 0.6667" in result.stdout

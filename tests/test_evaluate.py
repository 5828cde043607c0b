"""Tests for evaluate.py: the hard strings of answer extraction, ARC lenient vs strict, majority
vote, the CLI."""

import json
import re
import os
import subprocess
import sys

import pytest

import evaluate

# -----------------------------------------------------------------------------
# GSM8K / LaTRO numbers


@pytest.mark.parametrize("text,expected", [
    ("The answer is 18.", "18"),                      # trailing period is not a decimal point
    ("The answer is 18.0", "18"),                     # canonical form: numeric equality by string
    ("So she pays $1,000. The answer is $1,000.", "1000"),  # $ and thousands commas dropped
    ("The answer is -3.5 degrees.", "-3.5"),          # negative decimal
    ("It drops by 7 so the answer is -7", "-7"),      # case-insensitive prefix
    # last prefix, first number after it
    ("The answer is 3. Wait, no. The answer is 4 apples, not 5.", "4"),
    ("She has 12 and buys 5 more, 17 in total.", "17"),  # no prefix: the last number
    ("First 3-4 pieces", "4"),                        # a hyphen between numbers is not a minus sign
    ("The answer is 1,234,567.", "1234567"),
    ("The answer is .5", "0.5"),
    ("The answer is 0.50", "0.5"),
    ("I computed 12. The answer is unknown.", None),  # prefix without a number: no answer
    ("no number at all", None),
    ("", None),
    ("The answer is 100", "100"),                     # not 1E+2
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
    assert evaluate.latro_correct("gsm8k", output, {"answer": gold}, checker="fixed") is correct


def test_latro_text_answers():
    ex = {"answer": "Tom is a lempus."}
    assert evaluate.latro_correct("prosqa", "Tom is a terpus. The answer is Tom is a lempus.", ex)
    assert evaluate.latro_correct("prosqa", "The answer is Tom is a lempus", ex)
    assert not evaluate.latro_correct("prosqa", "The answer is Tom is a scrompus.", ex)
    # no answer template: no answer
    assert not evaluate.latro_correct("prosqa", "Tom is a lempus.", ex)
    assert evaluate.latro_correct("prontoqa", "The answer is True.", {"answer": "True"})
    assert not evaluate.latro_correct("prontoqa", "The answer is True.", {"answer": "False"})
    # multiplication answers are digit strings, compared as text (not as the single number "1")
    assert evaluate.latro_correct("multiplication", "The answer is 1 3 9 4.", {"answer": "1 3 9 4"})
    assert not evaluate.latro_correct("multiplication", "The answer is 1 3 9.",
                                      {"answer": "1 3 9 4"})

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
    # released: "heat" is a substring -> lenient accepts
    ("The answer is heat and light.", "A", True, False),
    ("The answer is heat.", "A", True, True),
    ("The answer is (C).", "C", False, True),  # a letter: strict only (released matches texts)
    ("The answer is C", "C", False, True),
    ("The answer is sound or wind.", "C", True, False),    # two options named: strict refuses
    # no "the answer is": no answer (fixed)
    ("Sound is made by wind. I think sound.", "C", False, False),
    ("The answer is wind. No wait, the answer is sound.", "C", True, True),  # the last one counts
    ("The answer is wind. No wait, the answer is sound.", "D", False, False),
])
def test_arc_lenient_and_strict(output, gold, lenient, strict):
    assert evaluate.latro_correct("arc", output, arc(gold), checker="fixed") is lenient
    assert evaluate.latro_correct("arc", output, arc(gold), strict=True) is strict


def test_arc_extract_and_coconut_check():
    # first named, for votes
    assert evaluate.arc_extract("The answer is wind and heat", OPTIONS) == "wind"
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
    outputs = ["The answer is 18.0", "The answer is 17", "The answer is 18", "no idea",
               "The answer is 17."]
    # 18.0 and 18 are one answer: 18 (2 votes, seen first) beats 17 (2 votes, seen later)
    assert evaluate.majority_correct("gsm8k", outputs, {"answer": "18"})
    assert not evaluate.majority_correct("gsm8k", outputs, {"answer": "17"})
    assert not evaluate.majority_correct("gsm8k", ["x", "y"], {"answer": "1"})
    assert evaluate.majority_correct("arc", ["The answer is wind", "The answer is sound",
                                             "the answer is wind."], arc("D"))

# -----------------------------------------------------------------------------
# accuracy over a generate function, and the CLI


def test_accuracy_counts_each_example_once():
    examples = [{"answer": str(i)} for i in range(10)]
    calls = []

    def generate(batch):  # right on even gold answers
        calls.append(len(batch))
        return [f"The answer is {ex['answer'] if int(ex['answer']) % 2 == 0 else 99}."
                for ex in batch]

    acc, outputs = evaluate.accuracy(generate, "gsm8k", examples, batch_size=4)
    assert calls == [4, 4, 2] and len(outputs) == 10 and acc == 0.5
    assert evaluate.score("gsm8k", examples[:2], ["### 0", "### 2"],
                          style="coconut") == [True, False]


def test_cli_scores_a_predictions_file(tmp_path):
    preds = tmp_path / "preds.jsonl"
    rows = [{"answer": "7", "output": "The answer is 7."},
            {"answer": "8", "output": "The answer is 9."},
            {"answer": "9", "outputs": ["The answer is 9", "The answer is 8", "The answer is 9"]}]
    preds.write_text("\n".join(json.dumps(r) for r in rows))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "evaluate.py"), "--task", "gsm8k",
                             "--preds", str(preds)], capture_output=True, text=True, check=True)
    assert "gsm8k: 2/3 correct = 0.6667" in result.stdout
    # --checker: a lowercase delimiter is an answer for the fixed checker only (released reads the
    # last number)
    preds.write_text(json.dumps({"answer": "7", "output": "the answer is 7, not 8"}))
    for checker, want in [("released", "gsm8k: 0/1 correct = 0.0000"),
                          ("fixed", "gsm8k: 1/1 correct = 1.0000")]:
        result = subprocess.run([sys.executable, os.path.join(root, "evaluate.py"), "--task",
                                 "gsm8k", "--preds", str(preds), "--checker", checker],
                                capture_output=True, text=True, check=True)
        assert want in result.stdout

# -----------------------------------------------------------------------------
# the released checker against the fixed one: verdicts derived by hand from the released rules
# (evaluate.py's docstring), every quirk with at least one row; the last field says why the two
# differ where they do

GSM8K_TABLE = [  # (output, gold, released, fixed, why)
    ("The answer is 18.", "18", True, True, ""),
    ("the answer is 18. I first thought 20", "18", False, True,
     "released delimiter is case-sensitive: last number"),
    ("the answer is 18", "18", True, True, "lowercase, but 18 is also the last number"),
    ("The answer is 3. Wait, no. The answer is 4 apples, not 5.", "4", True, True,
     "last delimiter, first number"),
    ("The answer is 3. Wait, no. The answer is 4 apples, not 5.", "3", False, False, ""),
    ("I computed 12. The answer is unknown.", "12", True, False,
     "no number after it: released takes the last one"),
    ("In 2023 she had 5 apples. The answer is five.", "5", True, False, "the same fallback"),
    ("She has 12 and buys 5 more, 17 in total.", "17", True, True, "no delimiter: the last number"),
    ("The answer is 1,234,567.", "1234567", True, True, ""),
    ("The answer is 1,2", "12", True, False, "released drops every comma: 1,2 reads 12"),
    ("The answer is 1,2", "1", False, True, "fixed: commas only between groups of three digits"),
    ("The answer is 1,000,00", "100000", True, False, "released 100000; fixed reads 1,000 then 00"),
    ("The answer is 18.00", "18", True, True, "numeric equality"),
    ("The answer is 0.1", "0.10", True, True, ""),
    ("The answer is 7.5.", "7.5", True, True, ""),
    ("The answer is 12,", "12", True, True, "a number ends with a digit"),
    ("The answer is -2", "2", False, False, ""),
    ("It costs 3-4 dollars", "4", False, True, "released glues the hyphen on: -4"),
    ("It costs 3-4 dollars", "-4", True, False, "the same, the other way"),
    ("The answer is $1,000.", "1000", True, True, ""),
    ("The answer is .5", "0.5", True, True, ""),
    ("nothing", "42", False, False, ""),
    ("", "42", False, False, ""),
    ("The answer is 42. I computed 41 before.", "42", True, True, ""),
    ("The total is 42", "42", True, True, ""),
    ("THE ANSWER IS 7", "7", True, True, "released: no delimiter, but 7 is the last number"),
    ("The answer is: 7 or 8", "7", True, True, ""),
    ("the answer is 7, not 8", "7", False, True,
     "lowercase delimiter: released takes the last number, 8"),
    ("So 5 + 3 = 8. Therefore, the answer is 8 cookies, 2 left", "8", False, True,
     "the same: released reads 2"),
    ("The answer is 10,000", "10000", True, True, ""),
    ("The answer is 5,600 and change 3", "5600", True, True, ""),
    ("The answer is 1e3", "1000", False, False, "no exponents: the first number is 1"),
    ("The answer is 1.0000000000000001", "1", True, False,
     "float equality rounds; fixed compares decimals"),
]

ARC_OPTIONS = [("A", "heat"), ("B", "heat and light"), ("C", "sound"), ("D", "wind"),
               ("E", "2.5 m"), ("F", "It rains.")]
ARC_TABLE = [  # (output, gold option text, released, fixed, why)
    ("The answer is heat and light.", "heat and light", True, True, ""),
    ("the answer is HEAT AND LIGHT", "heat and light", True, True, "lower-cased"),
    ("The answer is heat and light.", "heat", True, True, "a substring test: 'heat' is inside"),
    ("The answer is sound, not heat.", "heat", True, True, "the same"),
    ("The answer is (C).", "sound", False, False, "letters are not option texts"),
    ("The answer is wind. No wait, the answer is sound.", "sound", False, True,
     "released: the FIRST sentence"),
    ("The answer is wind. No wait, the answer is sound.", "wind", True, False,
     "fixed: the LAST delimiter"),
    ("the answer is heat. the answer is sound.", "sound", False, True, "the same"),
    ("The answer is sound. Actually heat.", "heat", False, True,
     "fixed reads to the end, released one sentence"),
    ("Sound is made by wind. I think sound.", "sound", True, False,
     "no delimiter: released, last segment"),
    ("Sound is made by wind. I think sound.", "wind", False, False,
     "wind is not in the last segment"),
    ("I pick heat", "heat", True, False,
     "no delimiter: released searches the whole (one-segment) output"),
    ("The answer is 2.5 m", "2.5 m", False, True,
     "an option with a '.' never matches after the delimiter"),
    ("The answer is e.g. wind", "wind", False, True, "the sentence ends at 'e.'"),
    ("The answer is it rains", "It rains.", True, False, "released drops the gold's final period"),
    ("The answer is It rains.", "It rains.", True, True, ""),
    ("", "heat", False, False, "empty output"),
    ("Options are heat and sound. The answer is sound", "heat", False, False,
     "heat is before the delimiter"),
    ("Heat rises, so the answer is heat", "heat", True, True, ""),
    ("The answer is: [heat]", "heat", True, True, ""),
    ("THE ANSWER IS WIND", "wind", True, True, ""),
    ("The answer is (one of the options): wind.", "wind", True, True, ""),
]


def test_table_covers_at_least_40_outputs_with_differences_both_ways():
    rows = GSM8K_TABLE + ARC_TABLE
    assert len(rows) >= 40
    assert any(r[2] and not r[3] for r in rows) and any(r[3] and not r[2] for r in rows)


@pytest.mark.parametrize("output,gold,released,fixed,why", GSM8K_TABLE)
def test_released_and_fixed_gsm8k(output, gold, released, fixed, why):
    ex = {"answer": gold}
    assert evaluate.latro_correct("gsm8k", output, ex, checker="released") is released
    assert evaluate.latro_correct("gsm8k", output, ex, checker="fixed") is fixed
    # maj@1 is the greedy verdict: the vote extracts exactly what the greedy check extracts
    for checker in evaluate.CHECKERS:
        assert (evaluate.majority_correct("gsm8k", [output], ex, checker)
                is (released if checker == "released" else fixed))


@pytest.mark.parametrize("output,gold,released,fixed,why", ARC_TABLE)
def test_released_and_fixed_arc(output, gold, released, fixed, why):
    ex = {"answer": gold, "options": ARC_OPTIONS}
    assert evaluate.latro_correct("arc", output, ex, checker="released") is released
    assert evaluate.latro_correct("arc", output, ex, checker="fixed") is fixed
    assert evaluate.majority_correct("arc", [output], ex, "released") is released
    assert evaluate.majority_correct("arc", [output], ex, "fixed") is fixed


def test_majority_votes_with_the_greedy_extraction():
    # released GSM8K: "the answer is 7, not 8" votes 8 (its last number), like its greedy check
    outs = ["the answer is 7, not 8", "The answer is 8", "The answer is 7"]
    assert evaluate.majority_correct("gsm8k", outs, {"answer": "8"}, "released")
    assert evaluate.majority_correct("gsm8k", outs, {"answer": "7"}, "fixed")
    # released ARC votes on the searched sentence: two outputs say 'wind' first, one 'sound'
    outs = ["The answer is wind. No, the answer is sound.", "The answer is wind",
            "The answer is sound"]
    assert evaluate.majority_correct("arc", outs, {"answer": "wind", "options": ARC_OPTIONS},
                                     "released")
    assert not evaluate.majority_correct("arc", outs, {"answer": "sound", "options": ARC_OPTIONS},
                                         "released")
    with pytest.raises(ValueError, match="checker='paper'"):
        evaluate.latro_correct("gsm8k", "The answer is 1", {"answer": "1"}, checker="paper")


# ---- the released GSM8K checker on every gold, and answers reached in linear time ------------

@pytest.mark.parametrize("gold, output, released", [
    ("3/4", "so it is 4", True),          # the gold runs through the number finder too: 4
    ("3/4", "The answer is 0.75.", False),
    ("no number", "I do not know", True),  # '' == '': no number on either side
    ("no number", "The answer is 7.", False),
    ("1,080", "The answer is 1080.", True),
    ("18", "no number here", False),
])
def test_the_released_checker_reads_every_gsm8k_gold_the_released_way(gold, output, released):
    # is_equiv_gsm8k, written out: find_number on both sides, commas dropped, float equality,
    # else the two strings
    def find_number(x):
        if "The answer is" in x:
            numbers = re.findall(r"-?[\d,]*\.?\d+", x.split("The answer is")[-1])
            if numbers:
                return numbers[0]
        numbers = re.findall(r"-?[\d,]*\.?\d+", x)
        return numbers[-1] if numbers else ""
    attempted = find_number(output).replace(",", "")
    try:
        want = float(find_number(gold).replace(",", "")) == float(attempted)
    except ValueError:
        want = find_number(gold).replace(",", "") == find_number(attempted).replace(",", "")
    assert want is released
    ex = {"answer": gold}
    assert evaluate.latro_correct("gsm8k", output, ex, checker="released") is released
    assert evaluate.majority_correct("gsm8k", [output], ex, "released") is released


def test_the_released_number_finder_is_the_regex_in_linear_time():
    import random
    rng = random.Random(0)
    for _ in range(20000):  # random strings of the characters the pattern cares about
        text = "".join(rng.choice("0123456789,.-a ,,..--١²") for _ in range(rng.randint(0, 14)))
        assert evaluate.released_numbers(text) == evaluate._RELEASED_NUMBER_RE.findall(text)
    # the regex itself backtracks for ~30 s on this; the finder gives the same answer at once
    assert evaluate.released_find_number("," * 40000 + " The answer is 7.") == "7"
    assert evaluate.released_numbers("1" + "," * 40000 + "x") == ["1"]


def test_the_fixed_checker_compares_decimals_exactly():
    # Decimal.normalize in the default context rounds to 28 digits: these would compare equal
    ex = {"answer": "1"}
    assert not evaluate.latro_correct("gsm8k", "The answer is 1.00000000000000000000000000001",
                                      ex, checker="fixed")
    assert evaluate.latro_correct("gsm8k", "The answer is 1.000", ex, checker="fixed")


def test_the_strict_arc_check_reads_a_long_output():
    # ~1 MB, 210k matches: one sweep over them (comparing every pair took minutes)
    options = [("A", "heat"), ("B", "heat and light"), ("C", "light")]
    big = "The answer is " + "heat and light " * 70000
    assert evaluate.arc_extract(big, options, strict=True) == "heat and light"
    assert evaluate.arc_extract(big + " light", options, strict=True) is None  # B and C named


@pytest.mark.parametrize("gold,output,same", [
    ("1e9999999", "1e9999999", True),                # Decimal's default context overflowed here
    ("1e9999999", "1E+9999999", True),
    ("1e9999999", "1e9999998", False),
    ("0", "1e-5000000", False),                      # underflow would have made it 0
    ("1e-5000000", "0.1e-4999999", True),
    ("1e1001", "1" + "0" * 1001, True),              # past PLAIN_ZEROS: the same text either way
    ("-1,000.50", "-1000.5", True),
    ("0", "-0.000", True),
])
def test_canonical_numbers_are_exact_at_any_exponent(gold, output, same):
    # the fixed checker and maj@k compare canonical_number texts: equal exactly when the values are
    assert (evaluate.canonical_number(gold) == evaluate.canonical_number(output)) is same
    answer = evaluate.canonical_number(output)
    assert evaluate.latro_match("gsm8k", answer, {"answer": gold}, checker="fixed") is same
    assert len(evaluate.canonical_number("1e9999999")) < 20  # no ten million zeros written out


def test_a_two_million_digit_output_is_scored_wrong_fast_by_both_checkers():
    import time
    output = "The answer is " + "7" * 2_000_000
    t0 = time.perf_counter()
    assert not evaluate.latro_correct("gsm8k", output, {"answer": "7"}, checker="fixed")
    assert not evaluate.majority_correct("gsm8k", [output], {"answer": "7"}, "fixed")
    assert time.perf_counter() - t0 < 1.0
    # the released checker: float("7" * 2_000_000) is inf, no exception, and not 7
    assert not evaluate.latro_correct("gsm8k", output, {"answer": "7"}, checker="released")


def test_the_released_checker_keeps_float_semantics_at_the_extremes_without_raising():
    # beyond float's range both sides read as inf, below it as 0.0: equal, as released
    assert evaluate.released_number_correct("9" * 400, "The answer is " + "8" * 400)
    assert evaluate.released_number_correct("0", "The answer is 0." + "0" * 400 + "1")
    # the fixed checker tells them apart
    assert not evaluate.latro_correct("gsm8k", "The answer is " + "8" * 400, {"answer": "9" * 400},
                                      checker="fixed")
    assert not evaluate.latro_correct("gsm8k", "The answer is 0." + "0" * 400 + "1",
                                      {"answer": "0"}, checker="fixed")
    # a gold with an exponent: its number finder reads no exponent ('1e9999999' -> 9999999)
    assert evaluate.released_number_correct("1e9999999", "The answer is 9999999.")


def test_a_predictions_file_with_a_utf8_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"answer": "7", "output": "The answer is 7."})
                     .encode() + b"\n")
    examples, outputs = evaluate.read_predictions(str(path), "gsm8k")
    assert examples[0]["answer"] == "7" and outputs == ["The answer is 7."]

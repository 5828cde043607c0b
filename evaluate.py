"""
Answer checking for nanolatent.

- Coconut (every task): the text after the last '#' of the output, commas removed and stripped,
  must equal the gold answer exactly ("### 18" is right for 18, "### 18.0" is not), as released.
- LaTRO: two checkers, named by `checker`.
  released (the default: numbers comparable with the paper) reproduces the released
    is_equiv_gsm8k / is_equiv_arc, quirks included. Numbers: after the LAST case-sensitive
    "The answer is" the first number, else (no delimiter, or no number after it) the last number
    of the output; a number is -?[digits and commas]*.?digits, its commas then dropped ("1,2"
    reads 12); compared as floats. ARC: the gold option text (lower-cased, final '.' dropped) must
    occur after "the answer is" in the FIRST '.'-sentence holding that phrase (any case); without
    one, in the last '.'-segment of the output.
  fixed: numbers after the last "the answer is" in any case, the first one, None when nothing
    follows (no fallback); commas only between groups of three digits; "3-4" is 3 and 4; compared
    as decimals. ARC: the gold text occurs after the LAST "the answer is" (lenient), or exactly one
    option is named there (strict).
  The README lists every point where the two differ, with an example. Answers that are neither
  numbers nor ARC options (ProsQA, ProntoQA, multiplication) have no released checker: both names
  compare the text after the last "The answer is", stripped, without a final period.
- maj@k: each output's answer is extracted exactly as the greedy check extracts it (numbers: the
  number; ARC: the text the check searches), the most frequent wins, and the greedy check's
  comparison decides; so maj@1 equals the greedy verdict.

Score a predictions file (one JSON object per line with "output" or "outputs", and the example's
fields):
    python evaluate.py --task gsm8k --preds preds.jsonl [--style latro|coconut]
                       [--checker released|fixed] [--strict]
A bad file (missing, empty, invalid JSON, a row without its fields): one line `error: ...`, exit 1.
"""

import argparse
import json
import os
import re
import sys
from decimal import Decimal, InvalidOperation

from configurator import UserError, exit_cleanly_on_user_error

ANSWER_PREFIX = "the answer is"

# A number: optional sign (only when the "-" is not glued to a word or a closing bracket, so "3-4"
# is 3 and 4), digits with optional thousands commas, optional decimals. "18." is 18 (a trailing
# period ends a sentence).
_NUMBER_RE = re.compile(r"(?:(?<![\w)\]])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
                        r"|(?:(?<![\w)\]])-)?\.\d+")

# -----------------------------------------------------------------------------
# numbers

# a canonical number's plain form holds at most this many zeros beyond its digits ('1' + 1000 zeros,
# '0.' + 999 zeros + '1'); further out it is written '1e1001', '1e-1001': no string of a million
# zeros for '1e999999', and the same value always gives the same text
PLAIN_ZEROS = 1000
_DECIMAL_TEXT = re.compile(r"(-?)(\d*)\.?(\d*)(?:E([+-]\d+))?")


def canonical_number(s):
    """'1,000' -> '1000', '18.0' -> '18', '-0.50' -> '-0.5', '1e9999999' -> '1e9999999'; None if s
    is not a number. Exact (no rounding, no context: '1e-5000000' is not '0') and never raises;
    its cost grows with the length of s only, whatever the exponent."""
    try:
        d = Decimal(s.replace(",", "").replace("$", "").strip())
    except InvalidOperation:  # not a number, or an exponent beyond what Decimal holds
        return None
    if not d.is_finite():
        return None
    sign, whole, frac, exp = _DECIMAL_TEXT.fullmatch(str(d)).groups()  # str(d): no context used
    digits = (whole + frac).lstrip("0")
    exp = int(exp or 0) - len(frac)
    stripped = digits.rstrip("0")
    exp += len(digits) - len(stripped)
    if not stripped:
        return "0"                                                         # -0 is 0
    return sign + _digits_times_ten_to(stripped, exp)


def _digits_times_ten_to(digits, exp):
    """The text of the integer `digits` (no leading or trailing zero) times 10**exp: plain within
    PLAIN_ZEROS zeros, else '<d>.<ddd>e<adjusted exponent>'."""
    if 0 <= exp <= PLAIN_ZEROS:
        return digits + "0" * exp
    if -exp <= len(digits) + PLAIN_ZEROS and exp < 0:
        whole, frac = digits[:exp], digits[exp:].rjust(-exp, "0")
        return f"{whole or '0'}.{frac}"
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{mantissa}e{exp + len(digits) - 1}"


def after_last_answer_prefix(text):
    """The text after the last "The answer is" (case-insensitive), or None when it does not
    occur."""
    i = text.lower().rfind(ANSWER_PREFIX)
    return None if i < 0 else text[i + len(ANSWER_PREFIX):]


def extract_number(text):
    """GSM8K / LaTRO: the first number after the last "The answer is", else the last number;
    canonical string."""
    tail = after_last_answer_prefix(text)
    if tail is not None:
        numbers = _NUMBER_RE.findall(tail.replace("$", ""))
        return canonical_number(numbers[0]) if numbers else None
    numbers = _NUMBER_RE.findall(text.replace("$", ""))
    return canonical_number(numbers[-1]) if numbers else None

# -----------------------------------------------------------------------------
# Coconut

def coconut_extract(output_text):
    """The released rule: the text after the last '#', commas removed, stripped."""
    return output_text.split("#")[-1].replace(",", "").strip()


def coconut_correct(output_text, gold):
    return coconut_extract(output_text) == gold.replace(",", "").strip()

# -----------------------------------------------------------------------------
# ARC

def _option_mentions(segment, options):
    """Labels of the options named in segment: "(B)" / a bare "B", or the option's text
    (case-insensitive).

    A text match inside a longer matched option text does not count ("heat" inside
    "heat and light").
    """
    low = segment.lower()
    named = set()
    for label, _ in options:
        if re.search(rf"\({re.escape(label)}\)", segment) \
                or re.fullmatch(rf"\W*{re.escape(label)}\W*", segment):
            named.add(label)
    spans = []
    for label, text in options:
        t = text.lower().strip()
        for m in re.finditer(re.escape(t), low) if t else []:
            spans.append((m.start(), -m.end(), label))
    # a match counts unless a longer one covers it: by start, the longest first, a span is covered
    # when an earlier start reaches as far, or a longer span begins where it does (one sweep, not a
    # comparison of every pair: a long output holds many matches)
    spans.sort()
    reach, i = -1, 0
    while i < len(spans):
        group = [spans[i]]
        while i + len(group) < len(spans) and spans[i + len(group)][0] == group[0][0]:
            group.append(spans[i + len(group)])
        longest = -group[0][1]
        for _, neg_end, label in group:
            if reach < -neg_end and longest == -neg_end:
                named.add(label)
        reach = max(reach, longest)
        i += len(group)
    return named


def arc_extract(output_text, options, strict=False):
    """The option text the output answers with, or None.

    strict: exactly one option named after the last "the answer is". lenient: the option whose text
    occurs first there (a reading aid: the LaTRO checks and maj@k use the searched text instead).
    """
    segment = after_last_answer_prefix(output_text)
    if segment is None:
        return None
    texts = dict(options)
    if strict:
        named = _option_mentions(segment, options)
        return texts[named.pop()] if len(named) == 1 else None
    low = segment.lower()
    hits = [(low.find(t.lower()), -len(t), t) for _, t in options if t and t.lower() in low]
    return min(hits)[2] if hits else None


def arc_correct(output_text, example, strict=False):
    if strict:
        return arc_extract(output_text, example["options"], strict=True) == example["answer"]
    segment = after_last_answer_prefix(output_text)
    return segment is not None and example["answer"].lower() in segment.lower()

# -----------------------------------------------------------------------------
# the released checkers (LaTRO's eval_utils), rewritten rule for rule

CHECKERS = ("released", "fixed")
# sign glued on, commas anywhere: "3-4" -> "3", "-4"; "1,2" -> "1,2"
_RELEASED_NUMBER_RE = re.compile(r"-?[\d,]*\.?\d+")
RELEASED_NUMBER_DELIMITER = "The answer is"  # case-sensitive
RELEASED_ARC_DELIMITER = "the answer is"  # compared with the lower-cased text


def released_numbers(text):
    """_RELEASED_NUMBER_RE.findall(text), in linear time. The pattern backtracks: at every start
    inside a long run of commas it scans the whole run before failing, quadratic in the run (30 s
    on 40k commas). Each match here is found from precomputed runs instead, with the regex's own
    choices: an optional '-', the longest run of digits and commas, then either '.' and digits
    right after the run, or else the run cut after its last digit."""
    n = len(text)
    run_end, digits_end, last_digit = [n] * (n + 1), [n] * (n + 1), [-1] * (n + 1)
    for i in range(n - 1, -1, -1):  # where the [\d,] run / the digit run starting at i ends
        c = text[i]
        run_end[i] = run_end[i + 1] if c.isdecimal() or c == "," else i
        digits_end[i] = digits_end[i + 1] if c.isdecimal() else i
    for i in range(n):  # the last digit before position i + 1
        last_digit[i + 1] = i if text[i].isdecimal() else last_digit[i]
    found, i = [], 0
    while i < n:
        j = i + 1 if text[i] == "-" else i
        k = run_end[j] if j < n else n
        end = None
        if k + 1 < n and text[k] == "." and digits_end[k + 1] > k + 1:
            end = digits_end[k + 1]                                     # run, '.', digits
        elif last_digit[k] >= j:
            end = last_digit[k] + 1                                     # run up to its last digit
        if end is None:
            i += 1
            continue
        found.append(text[i:end])
        i = end
    return found


def released_find_number(text):
    """The first number after the last "The answer is" (case-sensitive), else the last number,
    else ''."""
    if RELEASED_NUMBER_DELIMITER in text:
        numbers = released_numbers(text.split(RELEASED_NUMBER_DELIMITER)[-1])
        if numbers:
            return numbers[0]
    numbers = released_numbers(text)
    return numbers[-1] if numbers else ""


def released_number_correct(gold, output_text):
    """is_equiv_gsm8k: both sides through released_find_number, commas dropped, float equality;
    when a side is no float, the strings are compared (the output's number extracted once more).
    At the extremes it keeps the released float semantics and never raises: a number beyond
    float's range reads as inf (any two such numbers are equal: 400 nines equals 400 eights), one
    below its smallest value reads as 0.0 (0.000...0001 with 400 zeros equals 0); its number
    finder reads no exponent ('1e9999999' is the numbers 1 and 9999999). The fixed checker compares
    canonical_number texts, exactly."""
    attempted = released_find_number(output_text).replace(",", "")
    want = released_find_number(gold).replace(",", "")
    try:
        return float(want) == float(attempted)
    except ValueError:
        return want == released_find_number(attempted).replace(",", "")


def released_arc_segment(output_text):
    """The text is_equiv_arc searches for the gold option: after "the answer is" in the first
    '.'-sentence holding it (lower-cased, stripped of ' []()\"' and a leading ':'), else the last
    '.'-segment; None for an empty output."""
    if not output_text:
        return None
    if RELEASED_ARC_DELIMITER in output_text.lower():
        for sentence in output_text.split("."):
            if RELEASED_ARC_DELIMITER in sentence.lower():
                tail = sentence.lower().split(RELEASED_ARC_DELIMITER)[-1]
                return tail.lstrip(":").strip(" '[]()\".").rstrip(".")
    return output_text.lower().strip(" '[]()\".").rstrip(".").split(".")[-1]


def released_arc_match(gold, segment):
    return segment is not None and gold.lower().strip().rstrip(".") in segment


# -----------------------------------------------------------------------------
# LaTRO: one extractor per kind of answer

def is_number(s):
    return canonical_number(s) is not None


def released_number_rule(task, example, checker):
    """Does the released is_equiv_gsm8k decide? With the released checker: every GSM8K gold (also
    one that is no plain number: '3/4' is read as 4, as released), and numeric golds of other
    tasks."""
    return checker == "released" and (task == "gsm8k" or is_number(example["answer"]))


def latro_extract(task, output_text, example, checker="released", strict=False):
    """The answer the check compares, or None: a number string (numeric answers), the text searched
    for the gold option (ARC), the named option (ARC strict), or the stated text (other tasks)."""
    if checker not in CHECKERS:
        raise ValueError(f"checker={checker!r}: use one of {CHECKERS}")
    if task == "arc":
        if strict:
            return arc_extract(output_text, example["options"], strict=True)
        if checker == "released":
            return released_arc_segment(output_text)
        segment = after_last_answer_prefix(output_text)
        return None if segment is None else segment.lower().strip()
    if released_number_rule(task, example, checker):
        # is_equiv_gsm8k: the number finder runs on the gold too, and an output without a number
        # matches a gold without one ('' == ''); it can never match a gold with a number
        found = released_find_number(output_text).replace(",", "")
        if not found and released_find_number(example["answer"]):
            return None
        return found
    if is_number(example["answer"]):
        return extract_number(output_text)
    tail = after_last_answer_prefix(output_text)
    if tail is None:
        return None
    tail = tail.strip()
    return tail[:-1].strip() if tail.endswith(".") else tail


def normalize_gold(task, example):
    """The gold answer in the form latro_extract returns."""
    gold = example["answer"]
    if task == "arc":
        return gold
    if is_number(gold):
        return canonical_number(gold)
    gold = gold.strip()
    return gold[:-1].strip() if gold.endswith(".") else gold


def latro_match(task, answer, example, checker="released", strict=False):
    """The greedy check's comparison of an extracted answer with the gold one."""
    if answer is None:
        return False
    if task == "arc":
        if strict:
            return answer == example["answer"]
        if checker == "released":
            return released_arc_match(example["answer"], answer)
        return example["answer"].lower() in answer
    if released_number_rule(task, example, checker):
        return released_number_correct(example["answer"], answer)
    return answer == normalize_gold(task, example)


def latro_correct(task, output_text, example, strict=False, checker="released"):
    answer = latro_extract(task, output_text, example, checker, strict)
    return latro_match(task, answer, example, checker, strict)


def check_answer(task, output_text, example, strict=False):
    """Coconut-style check for any task: the answer is the text after the last '#' (ARC: an option
    in it)."""
    if task == "arc":
        return arc_correct("the answer is " + coconut_extract(output_text), example, strict)
    return coconut_correct(output_text, example["answer"])

# -----------------------------------------------------------------------------
# maj@k and accuracy

def majority_vote(answers):
    """The most frequent non-None answer; ties go to the one seen first; None only if every answer
    is None."""
    counts = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return None
    # max keeps the first of equal counts, dicts keep insertion order
    return max(counts, key=counts.get)


def majority_correct(task, outputs, example, checker="released", strict=False):
    """maj@k for LaTRO: extract each output's answer as the greedy check does, vote (numbers by
    value, so 18 and 18.0 are one vote), then apply the greedy check's comparison to the winner."""
    answers = [latro_extract(task, o, example, checker, strict) for o in outputs]
    keys = answers
    if task != "arc" and is_number(example["answer"]):
        keys = [canonical_number(a) or a if a is not None else None for a in answers]
    vote = majority_vote(keys)
    if vote is None:
        return False
    return latro_match(task, answers[keys.index(vote)], example, checker, strict)


def score(task, examples, outputs, style="latro", strict=False, checker="released"):
    """Per-example correctness of outputs (a str each, or a list of k strings for maj@k)."""
    assert len(examples) == len(outputs), f"{len(examples)} examples but {len(outputs)} outputs"
    correct = []
    for ex, out in zip(examples, outputs):
        if isinstance(out, list):
            correct.append(majority_correct(task, out, ex, checker, strict))
        elif style == "coconut":
            correct.append(check_answer(task, out, ex, strict))
        else:
            correct.append(latro_correct(task, out, ex, strict, checker))
    return correct


def accuracy(generate, task, examples, style="latro", strict=False, batch_size=64,
             checker="released"):
    """Run `generate(list of examples) -> list of output texts` over examples in batches;
    (accuracy, outputs).

    Each example is counted exactly once (no padding of the last batch, unlike a
    DistributedSampler).
    """
    outputs = []
    for i in range(0, len(examples), batch_size):
        outputs += generate(examples[i:i + batch_size])
        print(f"\reval {min(i + batch_size, len(examples))}/{len(examples)}", end="",
              file=sys.stderr)
    print(file=sys.stderr)
    correct = score(task, examples, outputs, style, strict, checker)
    return sum(correct) / max(len(correct), 1), outputs


# -----------------------------------------------------------------------------
# the predictions file of the command line

# data.TASKS, written out so that scoring a file does not import torch and transformers
# (test_bad_inputs keeps the two equal)
TASKS = ("prosqa", "prosqa_small", "prontoqa", "multiplication", "modsum", "kgraph", "gsm8k",
         "gsm8k_aug", "arc", "json")


def _row_error(path, row, problem):
    return UserError(f"{path}: row {row}: {problem}")


def read_prediction(r, path, row, task):
    """One row -> (example, output): output is a string, or a non-empty list of k strings for maj@k.
    A numeric answer (JSON 7 or 7.5) is read as its text: gold answers written by hand often are."""
    if not isinstance(r, dict):
        raise _row_error(path, row, f"expected a JSON object, got {type(r).__name__}")
    if "answer" not in r or ("output" not in r and "outputs" not in r):
        raise _row_error(path, row, "needs 'answer' and 'output' (or 'outputs')")
    answer = r["answer"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        kind = type(answer).__name__
        raise _row_error(path, row, f"'answer' must be a string or a number, got {kind}")
    if "outputs" in r:
        output = r["outputs"]
        strings = isinstance(output, list) and all(isinstance(o, str) for o in output)
        if not strings or not output:
            raise _row_error(path, row, "'outputs' must be a non-empty list of strings (k samples)")
    else:
        output = r["output"]
        if not isinstance(output, str):
            raise _row_error(path, row, f"'output' must be a string, got {type(output).__name__}")
    example = {**r, "answer": answer}
    if task == "arc":
        options = r.get("options")
        def is_pair(o):
            return isinstance(o, list) and len(o) == 2 and all(isinstance(x, str) for x in o)
        if not isinstance(options, list) or not options or not all(map(is_pair, options)):
            problem = "arc needs 'options': [[label, text], ...], as data.py writes them"
            raise _row_error(path, row, problem)
        example["options"] = [tuple(o) for o in options]
    return example, output


def read_predictions(path, task):
    """(examples, outputs) of a predictions jsonl; a problem is a UserError naming file and row."""
    if task not in TASKS:
        raise UserError(f"--task {task!r} is unknown; known: {', '.join(TASKS)}")
    if not os.path.isfile(path):
        raise UserError(f"predictions file not found: {path}")
    examples, outputs = [], []
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is dropped
            lines = f.read().split("\n")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text (a binary file?): give a JSON Lines file, "
                        f"one object per line") from None
    if next((l.strip() for l in lines if l.strip()), "") == "[":
        raise UserError(f"{path} holds a JSON array over several lines, not JSON Lines: write "
                        f"one object per line (e.g. jq -c '.[]' {path})")
    for row, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise _row_error(path, row, f"invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise _row_error(path, row, "JSON nested deeper than Python's json reader goes: fix "
                                        "the row") from None
        example, output = read_prediction(r, path, row, task)
        examples.append(example)
        outputs.append(output)
    if not examples:
        raise UserError(f"{path} holds no predictions (one JSON object per line)")
    return examples, outputs


if __name__ == "__main__":
    exit_cleanly_on_user_error()
    parser = argparse.ArgumentParser(description="Score a predictions jsonl file.")
    parser.add_argument("--task", required=True,
                        help="gsm8k, arc, prosqa, ... (decides the answer extraction)")
    parser.add_argument("--preds", required=True,
                        help='jsonl: {"output": str} or {"outputs": [str]} + "answer"')
    parser.add_argument("--style", default="latro", choices=["latro", "coconut"])
    parser.add_argument("--strict", action="store_true",
                        help="ARC: exactly one option named, the gold one")
    parser.add_argument("--checker", default="released", choices=CHECKERS,
                        help="LaTRO answers: released (as the paper's code, the default) or fixed")
    args = parser.parse_args()
    examples, outputs = read_predictions(args.preds, args.task)
    correct = score(args.task, examples, outputs, args.style, args.strict, args.checker)
    print(f"{args.task}: {sum(correct)}/{len(correct)} correct = "
          f"{sum(correct) / max(len(correct), 1):.4f}")

"""
Real data and its checks: unified-format .json / .jsonl files, GSM8K (a local jsonl or the hub's
`openai/gsm8k`), iCoT's GSM8k-Aug text files and ARC-Challenge (a local jsonl or the hub's
`allenai/ai2_arc`), each read and checked row by row. The hub is reached through `datasets`,
imported only when it is asked for. A file that is missing or not UTF-8 text, a row that breaks the
format, or an answer no checker could score is a configurator.UserError naming the file and the row.
"""

import json
import os
import re

from configurator import UserError
from formats import COCONUT_SPECIAL_TOKENS


class DataFileNotFound(UserError, FileNotFoundError):
    """A data file that is not there (a UserError that `except FileNotFoundError` also catches)."""


def _fail(path, row, problem):
    raise UserError(f"{path}: row {row}: {problem}")


def _require_file(path):
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "not found"
        raise DataFileNotFound(f"data file {what}: {path}")


def read_text(path):
    """A data file's text, refused in one line unless it is UTF-8 text (a gzipped file, UTF-16)."""
    _require_file(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raise UserError(f"{path} is gzip-compressed: decompress it (gunzip) and give the text file")
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise UserError(f"{path} is UTF-16 text: save it as UTF-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None


def read_rows(path):
    """Rows of a .json list or a .jsonl file, each with its 1-based row number (line number for
    jsonl)."""
    text = read_text(path)
    if path.endswith(".jsonl"):
        rows = []
        for i, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    _fail(path, i, f"invalid JSON ({e.msg})")
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        lines = [l for l in text.split("\n") if l.strip()]
        if e.msg == "Extra data" and all(l.lstrip().startswith("{") for l in lines):
            raise UserError(f"{path} holds JSON Lines (one object per line), not a JSON list: "
                            f"rename it to .jsonl") from None
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of examples, got {type(data).__name__}")
    return list(enumerate(data, 1))


def validate_example(ex, path, row):
    """The unified format, strictly: a non-empty question, a string answer, steps a list of
    strings."""
    if not isinstance(ex, dict):
        _fail(path, row, f"expected an object, got {type(ex).__name__}")
    for key in ("question", "answer"):
        if key not in ex:
            _fail(path, row, f"missing field '{key}'")
        if not isinstance(ex[key], str):
            _fail(path, row, f"field '{key}' must be a string, got {type(ex[key]).__name__}")
    if not ex["question"].strip():
        _fail(path, row, "empty question")
    steps = ex.get("steps", [])
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        _fail(path, row, "field 'steps' must be a list of strings")
    check_texts(ex, path, row)
    return ex


def check_texts(ex, where, row):
    """What no loader may pass on: an empty answer (every output would end with it and score), the
    text of Coconut's markers (it would become a thought), a lone surrogate (no tokenizer encodes
    it)."""
    if not ex["answer"].strip():
        _fail(where, row, "empty answer: every output would match it")
    for text in [ex["question"], ex["answer"], *ex.get("steps", [])]:
        marker = next((m for m in COCONUT_SPECIAL_TOKENS if m in text), None)
        if marker:
            _fail(where, row, f"holds {marker!r}, the text of a Coconut marker: remove it")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            _fail(where, row, "holds a lone surrogate (\\ud800-\\udfff), not valid text: fix "
                              "the file's escapes")


def load_json(path):
    """Unified-format .json list or .jsonl; extra keys (the release's idx_to_symbol, edges, ...) are
    kept."""
    out = []
    for row, ex in read_rows(path):
        ex = validate_example(ex, path, row)
        out.append({**ex, "steps": list(ex.get("steps", []))})
    return out


def gsm8k_example(question, solution, where="", row=0):
    """Original GSM8K: the solution lines before '#### N' are the steps, N (as written: '1,080') is
    the answer."""
    if "####" not in solution:
        _fail(where, row, "answer has no '#### <number>' line")
    body, answer = solution.rsplit("####", 1)
    answer = answer.strip()  # as written: the released answer text keeps thousands commas
    if not question.strip() or not answer:
        _fail(where, row, "empty question" if not question.strip() else "empty answer after '####'")
    if not re.fullmatch(r"-?[\d,]*\.?\d+", answer):
        _fail(where, row, f"answer {answer!r} after '####' is not a number, as every GSM8K answer "
                          f"is: fix the row, or load other answers with task=json")
    steps = [line.strip() for line in body.strip().split("\n") if line.strip()]
    ex = {"question": question.strip(), "steps": steps, "answer": answer}
    check_texts(ex, where, row)
    return ex


def _check_fields(row_dict, fields, path, row):
    if not isinstance(row_dict, dict):
        _fail(path, row, f"expected an object, got {type(row_dict).__name__}")
    for key in fields:
        if key not in row_dict:
            _fail(path, row, f"missing field '{key}'")
        if not isinstance(row_dict[key], str):
            _fail(path, row, f"field '{key}' must be a string, got {type(row_dict[key]).__name__}")


GSM8K_VAL_TAIL = 500  # GSM8K has no val split: val = the last 500 training problems


def _hub_datasets(name):
    """The `datasets` library, imported only when a hub dataset is asked for."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"loading {name} from the hub needs `pip install datasets`; or give "
                        f"--data_path= local files") from None
    return datasets


def gsm8k_val_rule(rows, split, where):
    """The hub's rule for GSM8K's missing val split, applied to the training rows (printed)."""
    if len(rows) <= GSM8K_VAL_TAIL:
        raise UserError(f"{where}: {len(rows)} training problems, too few to hold out the last "
                        f"{GSM8K_VAL_TAIL} as val; give a val file too")
    part = f"the last {GSM8K_VAL_TAIL}" if split == "val" else f"all but the last {GSM8K_VAL_TAIL}"
    print(f"gsm8k: no val split in {where}; {split} = {part} of its {len(rows)} training problems")
    return rows[-GSM8K_VAL_TAIL:] if split == "val" else rows[:-GSM8K_VAL_TAIL]


def load_gsm8k(split, path=""):
    """GSM8K from a local jsonl ({"question", "answer"}) or the hub. The hub has no val split: val
    is the last 500 training problems, and train the rest, so model selection never looks at the
    test set."""
    if path:
        rows = read_rows(path)
        for row, r in rows:
            _check_fields(r, ("question", "answer"), path, row)
        return [gsm8k_example(r["question"], r["answer"], path, row) for row, r in rows]
    datasets = _hub_datasets("gsm8k")
    hub = datasets.load_dataset("openai/gsm8k", "main",
                                split="test" if split == "test" else "train")
    rows = list(enumerate(hub, 1))
    if split != "test":
        rows = gsm8k_val_rule(rows, split, "the hub (openai/gsm8k)")
    return [gsm8k_example(r["question"], r["answer"], "openai/gsm8k", row) for row, r in rows]


def gsm8k_aug_example(line, path, row):
    """One iCoT GSM8k-Aug line `question||<<eq1>> <<eq2>> #### answer` read as the released
    conversion (`preprocessing/gsm_icot.py`) reads it: the question is the text before the first
    '||', unstripped; the steps are the text between '||' and the first '##', stripped and split
    on single spaces (a line with no equation gives one empty step, ['']); the answer is the text
    after the last '##', stripped, commas kept."""
    parts = line.split("||")
    if len(parts) == 1:
        _fail(path, row, "no '||' between question and rationale")
    if "####" not in line[len(parts[0]) + 2:]:
        _fail(path, row, "no '#### <answer>' after the rationale")
    question = parts[0]
    if not question.strip():
        _fail(path, row, "empty question")
    ex = {"question": question, "steps": parts[1].split("##")[0].strip().split(" "),
          "answer": line.rsplit("##", 1)[-1].strip()}
    check_texts(ex, path, row)
    return ex


def load_gsm8k_aug(path):
    """GSM8k-Aug (iCoT) text lines, one example per line (gsm8k_aug_example); blank lines are
    skipped."""
    if not path:
        raise UserError("gsm8k_aug needs path= a local iCoT text file "
                        "(train.txt / valid.txt / test.txt)")
    # lines as the released text-mode f.readlines() cuts them: at \n, \r\n and \r only
    lines = read_text(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [gsm8k_aug_example(line, path, row) for row, line in enumerate(lines, 1)
            if line.strip()]


def arc_example(r, where, row):
    """ARC row (question, choices {text, label}, answerKey) -> answer = the text of the keyed
    option."""
    _check_fields(r, ("question", "answerKey"), where, row)
    choices = r.get("choices")
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) \
            or not isinstance(choices.get("label"), list) \
            or len(choices["text"]) != len(choices["label"]):
        _fail(where, row, "field 'choices' must be {'text': [...], 'label': [...]} of equal length")
    options = list(zip(choices["label"], choices["text"]))
    gold = [text for label, text in options if label == r["answerKey"]]
    if len(gold) != 1:
        _fail(where, row,
              f"answerKey {r['answerKey']!r} is not one of the labels {choices['label']}")
    if not r["question"].strip():
        _fail(where, row, "empty question")
    ex = {"question": r["question"].strip(), "steps": [], "answer": gold[0], "options": options,
          "answer_label": r["answerKey"]}
    check_texts(ex, where, row)
    return ex


def load_arc(split, path=""):
    """ARC-Challenge from a local jsonl or the hub (`allenai/ai2_arc`, config ARC-Challenge)."""
    if path:
        return [arc_example(r, path, row) for row, r in read_rows(path)]
    datasets = _hub_datasets("arc")
    hub_split = {"train": "train", "val": "validation", "test": "test"}[split]
    hub = datasets.load_dataset("allenai/ai2_arc", "ARC-Challenge", split=hub_split)
    return [arc_example(dict(r), "allenai/ai2_arc", row) for row, r in enumerate(hub, 1)]

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
from formats import COCONUT_SPECIAL_TOKENS, WORD_SPECIALS, example_fields


class DataFileNotFound(UserError, FileNotFoundError):
    """A data file that is not there (a UserError that `except FileNotFoundError` also catches)."""


def _fail(path, row, problem):
    raise UserError(f"{path}: row {row}: {problem}")


def _require_file(path):
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "not found"
        raise DataFileNotFound(f"data file {what}: {path}")


def read_text(path):
    """A data file's text, refused in one line unless it is UTF-8 text (a gzipped file, UTF-16
    with or without its byte-order mark). A UTF-8 byte-order mark is dropped: the first question
    would carry it, and no check comparing questions would see that question."""
    _require_file(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raise UserError(f"{path} is gzip-compressed: decompress it (gunzip) and give the text file")
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or looks_like_utf16(raw):
        raise UserError(f"{path} is UTF-16 text: save it as UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def looks_like_utf16(raw, sample=4096):
    """UTF-16 without a byte-order mark: in its first `sample` bytes, nearly every other byte is
    NUL (the high byte of each ASCII character), in either byte order. UTF-8 text holds no NUL."""
    head = raw[:sample]
    for half in (head[0::2], head[1::2]):
        if half and half.count(0) >= 0.9 * len(half):
            return True
    return False


def json_depth(text):
    """(depth, row, line) of the deepest nesting in a JSON text: row counts the elements of the
    top-level list (1-based), line the text's lines. A plain scan, for the message of a
    RecursionError (json gives no position)."""
    depth, deepest, row, line = 0, (0, 1, 1), 1, 1
    in_string = escaped = False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest[0]:
                deepest = (depth, row, line)
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 1:
            row += 1
    return deepest


def _too_deep(path, text, row=None):
    """The one-line refusal of a JSON text that nests deeper than Python's json reader goes."""
    depth, row_in_text, line = json_depth(text)
    where = f"row {row}" if row is not None else f"row {row_in_text} (line {line})"
    return UserError(f"{path}: {where}: JSON nested {depth} levels deep, deeper than Python's "
                     f"json reader goes (no example nests like that): fix the row")


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
                except RecursionError:
                    raise _too_deep(path, line, i) from None
        return rows
    try:
        data = json.loads(text)
    except RecursionError:
        raise _too_deep(path, text) from None
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
    text of Coconut's markers (it would become a thought) or of the word vocabulary's special
    tokens (it would be read as <eos>, <pad>, ...), a lone surrogate (no tokenizer encodes it).
    The message names the field."""
    if not ex["answer"].strip():
        _fail(where, row, "empty answer: every output would match it")
    for field, text in example_fields(ex):
        marker = next((m for m in COCONUT_SPECIAL_TOKENS if m in text), None)
        if marker:
            _fail(where, row, f"holds {marker!r}, the text of a Coconut marker, in its {field}: "
                              f"remove it")
        special = next((t for t in WORD_SPECIALS if t in text), None)
        if special:
            _fail(where, row, f"holds {special!r}, a special token of the word vocabulary, in its "
                              f"{field}: remove it (a tokenizer would read it as that token)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            _fail(where, row, f"holds a lone surrogate (\\ud800-\\udfff) in its {field}, not valid "
                              f"text: fix the file's escapes")


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
    check_gsm8k_number(answer, where, row)
    steps = [line.strip() for line in body.strip().split("\n") if line.strip()]
    ex = {"question": question.strip(), "steps": steps, "answer": answer}
    check_texts(ex, where, row)
    return ex


# a GSM8K gold: digits with commas only between thousands groups, optional decimals and sign
_GSM8K_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def check_gsm8k_number(answer, where, row):
    """The text after '####' must be a number, its commas between thousands groups ('1,234',
    '-1,000.5'): '1,2,3' would be read as 123 by the released checker, and no output could state
    it as a number the fixed checker reads."""
    if _GSM8K_NUMBER.fullmatch(answer):
        return
    if re.fullmatch(r"-?[\d,]*\.?\d+", answer):
        _fail(where, row, f"answer {answer!r} after '####' has commas that are not thousands "
                          f"groups (1,234 or 1,234,567): fix the number")
    _fail(where, row, f"answer {answer!r} after '####' is not a number, as every GSM8K answer "
                      f"is: fix the row, or load other answers with task=json")


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


# what a local file in place of each hub dataset looks like (one JSON object per line)
LOCAL_FORMATS = {
    "gsm8k": ("data/gsm8k_{split}.jsonl",
              '{"question": "...", "answer": "<solution lines>\\n#### 42"}'),
    "arc": ("data/arc_{split}.jsonl", '{"question": "...", "choices": {"text": ["...", ...], '
                                      '"label": ["A", ...]}, "answerKey": "A"}'),
}


def load_hub(name, repo, config, split):
    """One split of a hub dataset through `datasets`; offline, not cached or not found (the
    ConnectionError / OSError load_dataset raises) is one line saying how to give local files."""
    datasets = _hub_datasets(name)
    try:
        return datasets.load_dataset(repo, config, split=split)
    except OSError as e:  # ConnectionError offline, FileNotFoundError for a dataset not found
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        example, row = LOCAL_FORMATS[name]
        raise UserError(f"{name}: the hub's {repo} cannot be loaded ({reason}); without the "
                        f"network give local files, one per split: --data_path={example} "
                        f"(load_task: path=), one JSON object per line: {row}") from None


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
    hub = load_hub("gsm8k", "openai/gsm8k", "main", "test" if split == "test" else "train")
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
    check_options(options, where, row)
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


def check_options(options, where, row):
    """ARC options [(label, text), ...]: strings (a JSON number as option text is refused, not
    guessed at: 1.50 would read as 1.5), each label once."""
    for label, text in options:
        for what, value in (("label", label), ("text", text)):
            if not isinstance(value, str):
                _fail(where, row, f"option {what} {value!r} is not a string (JSON "
                                  f"{type(value).__name__}): write every label and text in quotes "
                                  f"(\"{value}\")")
    labels = [label for label, _ in options]
    duplicate = next((label for label in labels if labels.count(label) > 1), None)
    if duplicate is not None:
        _fail(where, row, f"duplicate label {duplicate!r} in the choices {labels}: give each "
                          f"option its own label")


def load_arc(split, path=""):
    """ARC-Challenge from a local jsonl or the hub (`allenai/ai2_arc`, config ARC-Challenge)."""
    if path:
        return [arc_example(r, path, row) for row, r in read_rows(path)]
    hub_split = {"train": "train", "val": "validation", "test": "test"}[split]
    hub = load_hub("arc", "allenai/ai2_arc", "ARC-Challenge", hub_split)
    return [arc_example(dict(r), "allenai/ai2_arc", row) for row, r in enumerate(hub, 1)]

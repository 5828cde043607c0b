"""
Data for nanolatent: every task as one example format, and the data command line.

An example is a dict {"question": str, "steps": [str, ...], "answer": str} plus optional metadata.
Coconut trains on question + steps + answer, LaTRO sees only question + answer (its rationales are
latent), and SFT baselines use the steps as the gold rationale.

    examples = load_task("prosqa", "train")   # generated (tasks.py), no download, deterministic
                                              # by seed
    examples = load_task("gsm8k", "test")     # hub `openai/gsm8k` through `datasets`
                                              # (imported lazily)
    examples = load_task("json", "train", path="prosqa_{split}.json")  # the official Coconut files
    tok = vocab.build_tokenizer("words", examples)  # closed word-level vocabulary, for tiny models

Here: load_task / load_splits, which local file serves which split, the split policing, and the
released conversions. The rest, each module importing only those below it:
    tasks.py    the generated tasks (ProsQA, ProntoQA, multiplication, modsum, kgraph)
    loaders.py  real data (unified JSON, GSM8K, GSM8k-Aug, ARC), read and checked row by row
    vocab.py    the tokenizers, and Coconut's markers in a vocabulary
    formats.py  the texts both methods build around an example: prompts, answers, stop strings

Local files never leak one split into another: a path serves a split when it contains `{split}`
(filled in here) or its file name names that split (`gsm8k_test.jsonl`, `valid.txt`); one file for
every split needs an explicit split_layout (a held-out tail, printed). check_split_overlap(splits)
then refuses any question found in two splits (the scripts' allow_split_overlap=True: a warning).
Every mistake in the data or the arguments is a configurator.UserError (one line, no traceback, in
the scripts).

The released Coconut conversions of raw files, so that nothing is needed from that repository:
    python data.py prepare prontoqa 5hop_0shot_random.json data   # data/prontoqa_{split}.json
    python data.py prepare gsm8k_aug valid.txt data/gsm_valid.json  # iCoT GSM8k-Aug, per split
"""

import difflib
import json
import os
import re
import sys

import tasks  # tasks.generate_split is looked up when called (tests replace it)
from configurator import UserError
from formats import GSM8K_SHOTS
from loaders import (DataFileNotFound, gsm8k_val_rule, json_depth, load_arc, load_gsm8k,
                     load_gsm8k_aug, load_json, read_text)
from task_options import (DEFAULT_SIZES, GENERATORS, SPLIT_GENERATORS, check_task_options,
                          task_options)
from tasks import same_question

SPLITS = ("train", "val", "test")
TASKS = tuple(GENERATORS) + ("gsm8k", "gsm8k_aug", "arc", "json")

# -----------------------------------------------------------------------------
# local files: which file serves which split, so that no split leaks into another

# words that name a split in a file name (released files: prosqa_valid.json, iCoT: valid.txt)
SPLIT_WORDS = {"train": ("train", "training"), "val": ("val", "valid", "validation", "dev"),
               "test": ("test", "testing")}


def splits_named_by(path):
    """The splits a file's name names as a separate word: 'data/prosqa_valid.json' -> {'val'}."""
    words = set(re.split(r"[^a-z0-9]+", os.path.basename(path).lower()))
    return {split for split, names in SPLIT_WORDS.items() if words & set(names)}


def parse_split_layout(split_layout):
    """'' -> None; 'tail:VAL,TEST' -> (VAL, TEST) row counts; anything else is a UserError."""
    if not split_layout:
        return None
    m = re.fullmatch(r"tail:(\d+),(\d+)", split_layout.replace(" ", ""))
    if not m or int(m[1]) + int(m[2]) == 0:
        raise UserError(f"split_layout={split_layout!r} is not understood: write 'tail:VAL,TEST' "
                        f"(e.g. 'tail:500,1000': test = the last 1000 rows, val = the 500 before, "
                        f"train = the rest)")
    return int(m[1]), int(m[2])


def tail_split(examples, split, layout, where):
    """One file cut into train | val | test by a held-out tail of (VAL, TEST) rows; printed."""
    n_val, n_test = layout
    total = len(examples)
    if total <= n_val + n_test:
        raise UserError(f"{where}: {total} rows, too few for split_layout='tail:{n_val},{n_test}' "
                        f"(it holds out {n_val + n_test} and needs at least one training row)")
    bounds = {"train": (0, total - n_val - n_test), "val": (total - n_val - n_test, total - n_test),
              "test": (total - n_test, total)}
    lo, hi = bounds[split]
    print(f"{where}: split_layout='tail:{n_val},{n_test}': {split} = rows {lo + 1}-{hi} of {total}")
    return examples[lo:hi]


def load_file(task, path):
    """Every example of one local file, read with the task's loader."""
    if task in GENERATORS or task == "json":
        return load_json(path)
    if task == "gsm8k":
        return load_gsm8k("", path)
    if task == "gsm8k_aug":
        return load_gsm8k_aug(path)
    return load_arc("", path)


def load_split_file(task, split, path, split_layout=""):
    """The examples of `split` from local files. `path` serves a split when it contains `{split}`
    (filled with train / valid or val / test) or when its file name names that split; one file for
    several splits needs split_layout='tail:VAL,TEST'. GSM8K without a val file: the hub's rule."""
    layout = parse_split_layout(split_layout)
    if "{split}" in path:
        if layout:
            raise UserError(f"path {path!r} has one file per split ({{split}}), so split_layout="
                            f"{split_layout!r} does not apply: drop one of them")
        return _load_templated(task, split, path)
    if layout:
        return tail_split(load_file(task, path), split, layout, path)
    named = splits_named_by(path)
    if named != {split}:
        if not named:
            problem = "names no split, and one file for train, val and test would leak between them"
        else:
            problem = f"names the {' and '.join(sorted(named))} split, not {split}"
        raise UserError(f"data file {path} {problem}: give one file per split with {{split}} in "
                        f"the path (e.g. data/mytask_{{split}}.jsonl -> _train, _val, _test), or "
                        f"cut this file with split_layout='tail:VAL,TEST'")
    return load_file(task, path)


def split_file(path, split):
    """The file a path with '{split}' names for a split: val reads *_valid when it exists (the
    released files' name), else *_val."""
    if split == "val" and os.path.exists(path.replace("{split}", "valid")):
        return path.replace("{split}", "valid")
    return path.replace("{split}", split)


def _load_templated(task, split, path):
    train_file = path.replace("{split}", "train")
    val_file = split_file(path, "val")                                 # *_valid, else *_val
    if not os.path.exists(val_file):
        val_file = None
    if split == "val" and val_file:
        return load_file(task, val_file)
    if split == "val" or (split == "train" and task == "gsm8k" and val_file is None):
        if task == "gsm8k" and os.path.exists(train_file):
            return gsm8k_val_rule(load_file(task, train_file), split, train_file)
        if split == "val":
            tried = ", ".join(path.replace("{split}", name) for name in ("valid", "val"))
            raise DataFileNotFound(f"data file not found for the val split: tried {tried}")
    return load_file(task, path.replace("{split}", split))

# -----------------------------------------------------------------------------
# the split policing: no question in two splits, none that scoring or the prompt gives away

def check_split_overlap(splits, allow_overlap=False):
    """splits: {split name: examples}. A question (its canonical text, plus the options for ARC)
    found in two splits would score a model on what it trained on: a UserError that counts the
    overlap per pair of splits and shows one; allow_overlap=True prints it as a warning instead.
    Returns {(a, b): count} of the pairs that overlap."""

    def key(ex):
        return same_question(ex["question"]) + repr(ex.get("options", ""))

    keys = {name: {key(ex): ex["question"] for ex in examples} for name, examples in splits.items()}
    names = list(splits)
    counts, sample = {}, None
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = keys[a].keys() & keys[b].keys()
            if shared:
                counts[(a, b)] = len(shared)
                sample = sample or keys[a][min(shared)]
    if counts:
        pairs = ", ".join(f"{a}/{b} {n}" for (a, b), n in counts.items())
        message = (f"questions found in two splits ({pairs}), e.g. {sample[:80]!r}: a model would "
                   f"be scored on what it trained on")
        if not allow_overlap:
            raise UserError(f"{message}; use disjoint files or another split_layout, or "
                            f"allow_split_overlap=True to go on with a warning")
        print(f"warning: {message} (allow_split_overlap=True)")
    return counts


def check_coconut_answers(splits):
    """Coconut-style scoring reads the text after an output's last '#': an answer holding a '#'
    could never be scored right, so such data is refused."""
    for split, examples in splits.items():
        bad = next((ex for ex in examples if "#" in ex["answer"]), None)
        if bad is not None:
            raise UserError(f"a {split} answer holds '#' ({bad['answer'][:40]!r}): Coconut reads "
                            f"the answer after the last '#', so it could never score; remove it")


def check_shots_unseen(splits):
    """The 8-shot prompt's examples are training problems: refuse data whose val or test split holds
    one (it would be scored on a question answered in its own prompt)."""
    shots = {same_question(q) for q, _, _ in GSM8K_SHOTS}
    for split in ("val", "test"):
        seen = [ex["question"] for ex in splits[split]
                if same_question(ex["question"]) in shots]
        if seen:
            raise UserError(f"the {split} split holds {len(seen)} question(s) of the 8-shot "
                            f"prompt, "
                            f"e.g. {seen[0][:60]!r}: use the 0-shot prompt (eval_prompt='') or "
                            f"data whose {split} split is GSM8K's own")

# -----------------------------------------------------------------------------
# one entry point


def load_task(task, split, *, path="", n=0, seed=0, split_layout="", **task_kwargs):
    """Examples of one task and split. n=0: the task's default size (all rows for loaded data);
    n>0: the first n. path: local files (load_split_file: `{split}` in the path, or a file name that
    names the split); split_layout='tail:VAL,TEST' cuts one local file into train | val | test."""
    if task not in TASKS:
        close = difflib.get_close_matches(task, TASKS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(TASKS)}"
        raise UserError(f"task {task!r} is unknown; {hint}")
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise UserError(f"n={n!r} for the {split} split: give a count >= 0 (0 = the task's "
                        f"default size, all rows of a file)")
    if task in GENERATORS:
        unknown = sorted(set(task_kwargs) - task_options(task))
        if unknown:
            raise UserError(f"task {task!r} has no option {', '.join(unknown)}; its options: "
                            f"{', '.join(sorted(task_options(task)))}")
        check_task_options(task, task_kwargs)
    elif task_kwargs:
        raise UserError(f"task {task!r} takes no task options, got {sorted(task_kwargs)}")
    if path:
        if task in GENERATORS and task_kwargs:
            # e.g. the official prosqa_*.json, loaded as they are
            options = sorted(task_kwargs)
            print(f"{task}: loading {path}; the generator options {options} do not apply to it")
        return _first(load_split_file(task, split, path, split_layout), n, split)
    if split_layout:
        raise UserError(f"split_layout={split_layout!r} cuts one local file: give it with path=")
    if task in SPLIT_GENERATORS:
        size = n or DEFAULT_SIZES[task][SPLITS.index(split)]
        return _first(GENERATORS[task](split, **task_kwargs), size, split)
    if task in GENERATORS:
        size = n or DEFAULT_SIZES[task][SPLITS.index(split)]
        return tasks.generate_split(GENERATORS[task], task, split, size, seed,
                                    **task_kwargs)
    if task in ("json", "gsm8k_aug"):
        example = f"data/{task}_{{split}}.jsonl" if task == "json" else "data/{split}.txt"
        raise UserError(f"task {task!r} needs path= local files, one per split (e.g. {example})")
    if task == "gsm8k":
        return _first(load_gsm8k(split), n, split)
    return _first(load_arc(split), n, split)


def load_splits(task, sizes, *, path="", seed=0, split_layout="", allow_overlap=False,
                batch_size=0, **task_kwargs):
    """{split: examples} of train, val and test (sizes: their counts, 0 = the task's default),
    refused when a question is in two of them, or with allow_overlap=True printed as a warning
    (check_split_overlap), and when the training split holds fewer than one batch_size."""
    splits = {split: load_task(task, split, path=path, n=n, seed=seed, split_layout=split_layout,
                               **task_kwargs)
              for split, n in zip(SPLITS, sizes)}
    for split, examples in splits.items():
        if not examples:
            source = split_file(path, split) if path else f"task {task}"
            raise UserError(f"the {split} split is empty ({source}): give it examples")
    check_split_overlap(splits, allow_overlap)
    if len(splits["train"]) < batch_size:
        raise UserError(f"{len(splits['train'])} training examples < batch_size={batch_size}: "
                        f"lower batch_size or give more data (n_train)")
    return splits


def selection_splits(splits, val_split, task, eval_prompt):
    """latro.py's (train, val, test) examples: val selects the model (val_split='heldout'), or, as
    released, the test split does (val_split='test': GSM8K's val tail then trains too; the test
    accuracy of the selected weights is then optimistic, as the message says). The 8-shot prompt's
    eight worked examples must not be scored: refused in val or test."""
    if eval_prompt == "8shot":
        check_shots_unseen(splits)
    train, val, test = splits["train"], splits["val"], splits["test"]
    if val_split != "test":
        return train, val, test
    if task == "gsm8k":
        train = train + val
    if int(os.environ.get("RANK", 0)) == 0:  # printed once, by rank 0
        print(f"val_split='test': model selection on the test split, as released (its accuracy is "
              f"then optimistic); {len(train)} training questions")
    return train, test, test


def _first(examples, n, split):
    if n > len(examples):
        print(f"note: asked for {n} {split} examples, the data has {len(examples)}")
    return examples[:n] if n else examples

# -----------------------------------------------------------------------------
# the released conversions: raw files -> the unified JSON files the presets read
#     python data.py prepare prontoqa 5hop_0shot_random.json data   (prontoqa_{train,valid,test})
#     python data.py prepare gsm8k_aug valid.txt data/gsm_valid.json (one split per call)

PRONTOQA_SIZES = (9000, 200)  # released prontoqa.py: train = the first 9000, valid the next 200


def prontoqa_from_raw(path):
    """ProntoQA's raw file (`5hop_0shot_random.json` of asaparov/prontoqa's run_experiment.py: an
    object {"example1": {"test_example": {"question", "query", "chain_of_thought", "answer"}},
    ...}) read as the released `preprocessing/prontoqa.py` reads it, in file order: question =
    question + " " + query; steps = the chain_of_thought sentences joined two at a time with one
    space (an odd last one alone); answer as written. In-context examples are ignored."""
    text = read_text(path)  # UTF-8 text, not gzip or UTF-16; a byte-order mark dropped
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except RecursionError:
        depth, _, line = json_depth(text)
        raise UserError(f"{path}: line {line}: JSON nested {depth} levels deep, deeper than "
                        f"Python's json reader goes: fix the file") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected ProntoQA's raw JSON object {{\"example1\": "
                        f"{{\"test_example\": ...}}, ...}}, got a {type(raw).__name__}")
    out = []
    for key, value in raw.items():
        example = value.get("test_example") if isinstance(value, dict) else None
        if not isinstance(example, dict):
            raise UserError(f"{path}: {key}: no 'test_example' object")
        for field in ("question", "query", "answer"):
            if not isinstance(example.get(field), str):
                raise UserError(f"{path}: {key}: test_example needs '{field}' (a string)")
        cot = example.get("chain_of_thought")
        if not isinstance(cot, list) or not all(isinstance(s, str) for s in cot):
            raise UserError(f"{path}: {key}: test_example needs 'chain_of_thought' (a list of "
                            f"strings)")
        out.append({"question": example["question"] + " " + example["query"],
                    "steps": [" ".join(cot[i:i + 2]) for i in range(0, len(cot), 2)],
                    "answer": example["answer"]})
    return out


def write_json(examples, path):
    """A list of examples as the released conversions write it (json.dump, its default format),
    atomically (write_json_files)."""
    write_json_files({path: examples})


def write_json_files(parts):
    """{path: examples}, each written as the released conversions write it (json.dump, its default
    format), all or none: every file goes to a temporary file beside it first, then each is
    renamed over its path (os.replace). A failure (a full disk, a read-only directory, an
    interruption) removes the temporary files and keeps the files that were there before."""
    temps, path = {}, None
    try:
        for path, examples in parts.items():
            temps[path] = _write_temp(examples, path)
        for path, temp in temps.items():
            os.replace(temp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); a file already there is kept "
                        f"as it was") from None
    finally:
        for temp in temps.values():
            if os.path.exists(temp):
                os.remove(temp)


def _write_temp(examples, path):
    """examples json.dump-ed to a new temporary file beside path, synced; its name. Removed again
    when the write fails."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(examples, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    return temp


def check_not_the_input(raw_path, out_paths):
    """No output may be the raw input file (the same path, or a link to it): writing it would
    destroy the input before the conversion is known to be right."""
    for out in out_paths:
        same = os.path.realpath(out) == os.path.realpath(raw_path)
        if not same and os.path.exists(out) and os.path.exists(raw_path):
            same = os.path.samefile(out, raw_path)
        if same:
            raise UserError(f"the output {out} is the input file {raw_path}: it would be "
                            f"overwritten; write the converted file to another path")


def prepare_prontoqa(raw_path, out_dir, sizes=PRONTOQA_SIZES):
    """The released ProntoQA conversion: out_dir/prontoqa_train.json = the first sizes[0]
    examples of the raw file, prontoqa_valid.json the next sizes[1], prontoqa_test.json the rest
    (file order, no shuffle, no dedup). A question in two splits is printed (the runs refuse such
    files unless allow_split_overlap=True). Returns {path: examples written}."""
    n_train, n_val = sizes
    if os.path.isfile(out_dir):
        raise UserError(f"OUT_DIR {out_dir} is a file: prepare prontoqa writes "
                        f"prontoqa_{{train,valid,test}}.json into a directory")
    paths = {split: os.path.join(out_dir, f"prontoqa_{split}.json")
             for split in ("train", "valid", "test")}
    check_not_the_input(raw_path, paths.values())
    examples = prontoqa_from_raw(raw_path)
    if len(examples) <= n_train + n_val:
        raise UserError(f"{raw_path}: {len(examples)} examples, too few for {n_train} train + "
                        f"{n_val} valid and a test split (the rest): give --sizes=TRAIN,VALID "
                        f"that leave some")
    parts = {"train": examples[:n_train], "valid": examples[n_train:n_train + n_val],
             "test": examples[n_train + n_val:]}
    if check_split_overlap(parts, allow_overlap=True):
        print("note: runs on these files stop at the overlap unless --allow_split_overlap=True")
    write_json_files({paths[split]: part for split, part in parts.items()})
    return {paths[split]: len(part) for split, part in parts.items()}


def prepare_gsm8k_aug(raw_path, out_path):
    """The released iCoT conversion (`preprocessing/gsm_icot.py`) of one split's text file to the
    unified JSON the GSM8k presets read (data/gsm_{split}.json). Returns {path: examples}."""
    check_not_the_input(raw_path, [out_path])
    examples = load_gsm8k_aug(raw_path)
    write_json(examples, out_path)
    return {out_path: len(examples)}


USAGE = ("usage: python data.py TASK [SPLIT] [N] [--data_path=PATH] (a look at N examples) | "
         "python data.py prepare prontoqa RAW.json OUT_DIR [--sizes=TRAIN,VALID] | python data.py "
         "prepare gsm8k_aug RAW.txt OUT.json")


def parse_sizes(text):
    """'9000,200' -> (9000, 200): the train and valid sizes of prepare_prontoqa."""
    m = re.fullmatch(r"(\d+),(\d+)", (text or "").replace(" ", ""))
    if not m or int(m[1]) == 0 or int(m[2]) == 0:
        raise UserError(f"--sizes={text!r}: give TRAIN,VALID counts > 0 (released: 9000,200; "
                        f"test = the rest)")
    return int(m[1]), int(m[2])


def prepare_main(args):
    """python data.py prepare KIND RAW OUT [--sizes=TRAIN,VALID]: write the files, say what."""
    sizes, rest, args = None, [], list(args)
    while args:
        arg = args.pop(0)
        if arg == "--sizes":
            sizes = parse_sizes(args.pop(0) if args else "")
        elif arg.startswith("--sizes="):
            sizes = parse_sizes(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    if len(rest) != 3 or rest[0] not in ("prontoqa", "gsm8k_aug"):
        raise UserError(USAGE)
    kind, raw_path, out = rest
    if kind == "prontoqa":
        written = prepare_prontoqa(raw_path, out, sizes or PRONTOQA_SIZES)
    elif sizes:
        raise UserError("--sizes is for prontoqa: gsm8k_aug converts one split's file per call")
    else:
        written = prepare_gsm8k_aug(raw_path, out)
    for path, n in written.items():
        print(f"wrote {path}: {n} examples")


def main(argv):
    """The command line: a quick look at a task (python data.py prosqa_small train 3), or
    prepare (prepare_main). Ctrl-C ends it with one line saying what was interrupted."""
    try:
        if argv[:1] == ["prepare"]:
            return prepare_main(argv[1:])
        return look_main(argv)
    except KeyboardInterrupt:
        if argv[:1] == ["prepare"]:
            raise UserError("interrupted (Ctrl-C) while preparing: no output file was left "
                            "half-written (each is renamed into place whole)") from None
        task = argv[0] if argv else ""
        split = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else "train"
        raise UserError(f"interrupted (Ctrl-C) while generating or loading the {task} {split} "
                        f"examples: nothing was written") from None


def look_main(argv):
    """python data.py TASK [SPLIT] [N] [--data_path=PATH]: the first N examples, as JSON."""
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--data_path=")]
    argv = [a for a in argv if not a.startswith("--data_path=")]  # local files, as in the scripts
    path = paths[-1] if paths else ""
    if not 1 <= len(argv) <= 3 or argv[0].startswith("-"):
        raise UserError(USAGE)
    split = argv[1] if len(argv) > 1 else "train"
    if len(argv) > 2 and not argv[2].isdigit():
        raise UserError(f"N={argv[2]!r} is not a count; {USAGE}")
    n = int(argv[2]) if len(argv) > 2 else 3
    for ex in load_task(argv[0], split, n=n, path=path):
        print(json.dumps({k: ex[k] for k in ("question", "steps", "answer")}, indent=1))


if __name__ == "__main__":
    from configurator import exit_cleanly_on_user_error
    exit_cleanly_on_user_error()
    main(sys.argv[1:])

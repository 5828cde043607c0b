"""Bad input fails fast and clearly: each row is something a user might type or feed us, and the
message it must get. Adding a case is adding a row.

CLI_CASES run a command the way a user types it: it must stop with a UserError carrying the message
and do no work (no WORK on stdout). coconut.py and latro.py run in this process (tests/inprocess.py:
the same code path as from the shell, without paying for a new interpreter and the torch import per
row). evaluate.py and data.py rows, and one row per script in
ONE_LINE_CASES, run as real subprocesses: those must exit with status 1 and print exactly one line
`error: <message>` on stderr (no traceback), which is what the user sees.
LOADER_CASES call the data loaders: each must raise a UserError with its message before any data is
generated.
"""
import gzip
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import data
import evaluate
import task_options
import tasks
import vocab
from configurator import UserError
from inprocess import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what a command prints once it does work: a score, a training or evaluation step
WORK = re.compile(r"correct =|^(step|iter|epoch|eval) ", re.M)


def jsonl(*rows):
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


GOOD = {"answer": "7", "output": "The answer is 7."}
ARC_ROW = {"question": "Which?", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
           "answerKey": "B"}

# the files the cases name as {tmp}/<name>
FILES = {
    "preds.jsonl": jsonl(GOOD),
    "empty.jsonl": "",
    "blank.jsonl": "\n\n  \n",
    "badjson.jsonl": jsonl(GOOD, '{"answer": "7", "output": '),
    "listrow.jsonl": jsonl(["7", "The answer is 7."]),
    "noanswer.jsonl": jsonl({"output": "The answer is 7."}),
    "intoutput.jsonl": jsonl(GOOD, {"answer": "7", "output": 7}),
    "emptyoutputs.jsonl": jsonl({"answer": "7", "outputs": []}),
    "mixedoutputs.jsonl": jsonl({"answer": "7", "outputs": ["The answer is 7.", None]}),
    "boolanswer.jsonl": jsonl({"answer": True, "output": "The answer is True."}),
    "nullanswer.jsonl": jsonl({"answer": None, "output": "The answer is 7."}),
    "arcnooptions.jsonl": jsonl({"answer": "y", "output": "The answer is y."}),
    "mydata.jsonl": jsonl(*[{"question": f"q{i}?", "answer": str(i)} for i in range(10)]),
    "gsm8k_train.jsonl": jsonl(*[{"question": f"q{i}?", "answer": f"#### {i}"} for i in range(10)]),
    "bad_train.json": '[{"question": "q", "answer": "1"},\n {"question": }]',
    "obj_train.json": '{"question": "q", "answer": "1"}',
    "noanswer_train.jsonl": jsonl({"question": "q?"}),
    "gsm_test.jsonl": jsonl({"question": "q?", "answer": "7"}),
    "arc_test.jsonl": jsonl({**ARC_ROW, "answerKey": "E"}),
    "aug_train.txt": "q1||<<1+1=2>> #### 2\nno separator #### 3\n",
    "pq_list.json": json.dumps([{"question": "q", "answer": "True"}]),
    "lines_train.json": jsonl({"question": "q?", "answer": "1"}, {"question": "r?", "answer": "2"}),
    "surrogate_train.json": '[{"question": "q \\ud800?", "answer": "1"}]',
    "emptyans_train.jsonl": jsonl({"question": "q?", "answer": " "}),
    "marker_train.jsonl": jsonl({"question": "q <|latent|> ?", "answer": "1"}),
    "pens_test.jsonl": jsonl({"question": "q?", "answer": "2 + 16 = 18\n#### 18 pens"}),
    "e_train.jsonl": jsonl({"question": "q?", "answer": "1"}),
    "e_val.jsonl": "",
    "v_train.jsonl": jsonl({"question": "q?", "answer": "1"}),
    "v_valid.jsonl": "",
    "v_test.jsonl": jsonl({"question": "r?", "answer": "2"}),
    "e_test.jsonl": jsonl({"question": "r?", "answer": "2"}),
    "array.jsonl": json.dumps([GOOD], indent=1) + "\n",
    "aug_ok_train.txt": "q1||<<1+1=2>> #### 2\n",
    "prontoqa_train.json": '{"example1": {}}',
    "deeppreds.jsonl": jsonl('{"answer": "7", "output": ' + "[" * 200_000 + "]" * 200_000 + "}"),
    "pq_nocot.json": json.dumps({"example1": {"test_example": {
        "question": "Rex is hot.", "query": "True or false: Rex is hot.", "answer": "True"}}}),
    # the word vocabulary's special tokens as text, in each field
    "eosq_train.jsonl": jsonl({"question": "q <eos> ?", "answer": "1"}),
    "padstep_train.jsonl": jsonl({"question": "q?", "answer": "1"},
                                 {"question": "r?", "steps": ["a", "b<pad>"], "answer": "1"}),
    "unkans_train.json": json.dumps([{"question": "q?", "answer": "<unk>"}]),
    "bosopt_test.jsonl": jsonl({**ARC_ROW, "answerKey": "A"}, {**ARC_ROW, "answerKey": "A",
                                "choices": {"text": ["x", "<bos>y"], "label": ["A", "B"]}}),
    "aug_eos_train.txt": "q1||<<1+1=2>> #### 2\nq2 <eos>||<<1+2=3>> #### 3\n",
    # GSM8K golds whose commas are not thousands groups
    "commas_test.jsonl": jsonl({"question": "q?", "answer": "1+2=3\n#### 1,2,3"}),
    "commas2_test.jsonl": jsonl({"question": "q?", "answer": "#### 1,234"},
                                {"question": "r?", "answer": "#### 12,34"}),
    # rows json cannot read (RecursionError), ARC options json reads but no check could use
    "deep_train.json": '[{"question": "q?", "answer": "1"},\n {"question": ' + "[" * 200_000
                       + "]" * 200_000 + ', "answer": "1"}]',
    "deep_train.jsonl": jsonl({"question": "q?", "answer": "1"},
                              '{"question": ' + "[" * 200_000 + "]" * 200_000 + "}"),
    "arcnum_test.jsonl": jsonl({**ARC_ROW, "choices": {"text": [1, 2.5], "label": ["A", "B"]}}),
    "arcdup_test.jsonl": jsonl(ARC_ROW, {**ARC_ROW, "choices": {"text": ["x", "y"],
                                                               "label": ["B", "B"]}}),
}

# files that are not UTF-8 text
BYTES = {
    "utf16_train.json": '[{"question": "q?", "answer": "1"}]'.encode("utf-16"),
    "gz_train.json": gzip.compress(b'[{"question": "q?", "answer": "1"}]'),
    "binary.jsonl": bytes(range(256)) * 4,
    # UTF-16 without its byte-order mark, in both byte orders
    "u16le_train.jsonl": jsonl({"question": "q?", "answer": "1"}).encode("utf-16-le"),
    "u16be_train.txt": "q1||<<1+1=2>> #### 2\n".encode("utf-16-be"),
}

EVAL = ["evaluate.py", "--task", "gsm8k", "--preds"]

CLI_CASES = [
    # evaluate.py: the task, the file, each row's fields
    (["evaluate.py", "--task", "gsm9k", "--preds", "{tmp}/preds.jsonl"],
     "--task 'gsm9k' is unknown; known: prosqa, prosqa_small"),
    (EVAL + ["{tmp}/missing.jsonl"], "predictions file not found: {tmp}/missing.jsonl"),
    (EVAL + ["{tmp}"], "predictions file not found: {tmp}"),
    (EVAL + ["{tmp}/empty.jsonl"], "{tmp}/empty.jsonl holds no predictions"),
    (EVAL + ["{tmp}/blank.jsonl"], "{tmp}/blank.jsonl holds no predictions"),
    (EVAL + ["{tmp}/badjson.jsonl"], "{tmp}/badjson.jsonl: row 2: invalid JSON (Expecting value"),
    (EVAL + ["{tmp}/listrow.jsonl"], "listrow.jsonl: row 1: expected a JSON object, got list"),
    (EVAL + ["{tmp}/binary.jsonl"], "binary.jsonl is not UTF-8 text (a binary file?)"),
    (EVAL + ["{tmp}/array.jsonl"], "array.jsonl holds a JSON array over several lines, not JSON "
                                   "Lines"),
    (EVAL + ["{tmp}/noanswer.jsonl"], "noanswer.jsonl: row 1: needs 'answer' and 'output'"),
    (EVAL + ["{tmp}/deeppreds.jsonl"], "deeppreds.jsonl: row 1: JSON nested deeper than Python's "
                                       "json reader goes: fix the row"),
    (EVAL + ["{tmp}/intoutput.jsonl"], "row 2: 'output' must be a string, got int"),
    (EVAL + ["{tmp}/emptyoutputs.jsonl"], "row 1: 'outputs' must be a non-empty list of strings"),
    (EVAL + ["{tmp}/mixedoutputs.jsonl"], "row 1: 'outputs' must be a non-empty list of strings"),
    (EVAL + ["{tmp}/boolanswer.jsonl"], "row 1: 'answer' must be a string or a number, got bool"),
    (EVAL + ["{tmp}/nullanswer.jsonl"], "row 1: 'answer' must be a string or a number, got None"),
    (["evaluate.py", "--task", "arc", "--preds", "{tmp}/arcnooptions.jsonl"],
     "row 1: arc needs 'options': [[label, text], ...]"),
    # data.py's quick look
    (["data.py", "prosqa_smal", "train", "3"],
     "task 'prosqa_smal' is unknown; did you mean prosqa_small?"),
    # data.py prepare: the released conversions of raw files
    (["data.py", "prepare", "prontoqa", "{tmp}/nope.json", "{tmp}/pq"],
     "data file not found: {tmp}/nope.json"),
    (["data.py", "prepare", "prontoqa", "{tmp}/gz_train.json", "{tmp}/pq"],
     "gz_train.json is gzip-compressed"),
    (["data.py", "prepare", "prontoqa", "{tmp}/pq_list.json", "{tmp}/pq"],
     "pq_list.json: expected ProntoQA's raw JSON object"),
    (["data.py", "prepare", "prontoqa", "{tmp}/pq_nocot.json", "{tmp}/pq", "--sizes=5"],
     "--sizes='5': give TRAIN,VALID counts > 0"),
    (["data.py", "prepare", "prontoqa", "{tmp}/pq_nocot.json", "{tmp}/pq"],
     "pq_nocot.json: example1: test_example needs 'chain_of_thought' (a list of strings)"),
    (["data.py", "prepare", "gsm8k_aug", "{tmp}/aug_train.txt", "{tmp}/gsm_train.json"],
     "aug_train.txt: row 2: no '||' between"),
    (["data.py", "prepare", "gsm8k", "{tmp}/mydata.jsonl", "{tmp}/x.json"],
     "usage: python data.py TASK [SPLIT] [N]"),
    # issue 30: prepare never writes over its input
    (["data.py", "prepare", "gsm8k_aug", "{tmp}/aug_ok_train.txt", "{tmp}/aug_ok_train.txt"],
     "the output {tmp}/aug_ok_train.txt is the input file {tmp}/aug_ok_train.txt: it would be "
     "overwritten; write the converted file to another path"),
    (["data.py", "prepare", "gsm8k_aug", "{tmp}/aug_ok_train.txt", "{tmp}/./aug_ok_train.txt"],
     "the output {tmp}/./aug_ok_train.txt is the input file {tmp}/aug_ok_train.txt"),
    (["data.py", "prepare", "prontoqa", "{tmp}/prontoqa_train.json", "{tmp}"],
     "the output {tmp}/prontoqa_train.json is the input file {tmp}/prontoqa_train.json"),
    (["data.py", "prepare", "prontoqa", "{tmp}/pq_nocot.json", "{tmp}/pq_nocot.json"],
     "OUT_DIR {tmp}/pq_nocot.json is a file: prepare prontoqa writes "
     "prontoqa_{train,valid,test}.json into a directory"),
    (["data.py", "prepare", "gsm8k_aug", "{tmp}/aug_ok_train.txt", "{tmp}/preds.jsonl/x.json"],
     "cannot write {tmp}/preds.jsonl/x.json (File exists); a file already there is kept"),
    # issue 30: bench.py's options, checked before minutes of measuring (and before out_json)
    (["bench.py", "--sections=coconut_trian"],
     "sections='coconut_trian': 'coconut_trian' is unknown; did you mean coconut_train?"),
    (["bench.py", "--sections=memory,mfu,latro"], "'latro' is unknown; did you mean latro_step?"),
    (["bench.py", "--sections="], "sections='': give one or more of coconut_train, coconut_eval"),
    (["bench.py", "--sizes=tiny,gtp2"], "sizes='tiny,gtp2': 'gtp2' is unknown; did you mean "
                                        "gpt2?"),
    (["bench.py", "--sections=latro_step", "--sizes=gpt2"],
     "sections=latro_step runs on the sizes ('tiny',) of preset=cpu, and sizes='gpt2' has none: "
     "nothing would be measured"),
    (["bench.py", "--repeats=0"], "repeats=0: give 1 or more timed repetitions per side"),
    (["bench.py", "--repeats=-3"], "repeats=-3: give 1 or more timed repetitions per side"),
    (["bench.py", "--warmup=-1"], "warmup=-1: give 0 or more untimed repetitions"),
    (["bench.py", "--out_json={tmp}/no_dir/bench.json"],
     "out_json='{tmp}/no_dir/bench.json': its directory {tmp}/no_dir does not exist: create it or "
     "give another path"),
    (["bench.py", "--out_json={tmp}"], "out_json='{tmp}' is a directory: give a file name"),
    (["bench.py", "--out_json=/proc/bench.json"],
     "out_json='/proc/bench.json': cannot write in /proc ("),
    # coconut.py / latro.py cases go here: (["latro.py", "--n_train=-5"], "n_train"), ...
    # latro.py: all found by the up-front check, before data, model or out_dir (more in
    # test_latro.py's CONFIG_ERRORS, which call the check directly)
    (["latro.py", "--n_train=-5"], "n_train=-5: give a value >= 0 (0 = the task's default size)"),
    (["latro.py", "--lr=1e-3"], "config key 'lr' is now called 'learning_rate'"),
    (["latro.py", "--temperature=0"], "temperature=0.0: greedy rollouts make the K rationales"),
    (["latro.py", "--top_p=0"], "top_p=0.0: use 0 < top_p <= 1"),
    (["latro.py", "--max_rationale_tokens=0"],
     "max_rationale_tokens=0: LaTRO optimises the rationale"),
    (["latro.py", "--eval_interval=0"], "eval_interval=0: give a value > 0"),
    (["latro.py", "--penalty=grp"], "penalty='grp': use one of 'group', 'rank_mean', 'none'"),
    (["latro.py", "--task=gsm8k", "--eval_prompt=8shot"],
     "eval_prompt=8shot needs a model's own tokenizer"),
    (["latro.py", "--task=gsm9k", "--arc_options=x"],
     "task='gsm9k' is unknown; did you mean gsm8k?"),
    (["latro.py", "--stop_strings=release"], "stop_strings='release': did you mean 'released'?"),
    (["latro.py", "--sft_steps=0", "--latro_steps=0"],
     "with no SFT warm-up (sft_steps=0) and latro_steps=0"),
    # latro.py: out_dir and resume, before data or model
    (["latro.py", "--out_dir={tmp}/preds.jsonl"],
     "out_dir '{tmp}/preds.jsonl' is a file, not a directory"),
    (["latro.py", "--init_from=resume", "--out_dir={tmp}/no_run"], "'{tmp}/no_run' has no ckpt.pt"),
    # latro.py: the data against the model, before the model is loaded
    (["latro.py", "--block_size=16", "--out_dir={tmp}/short"],
     "but the model has 16: raise block_size"),
    (["latro.py", "--task=json", "--data_path={tmp}/mydata.jsonl"], "mydata.jsonl names no split"),
    # coconut.py: the config (before the data), the data, out_dir, the model's positions
    (["coconut.py", "--num_epochs=0"], "num_epochs=0 must be > 0 (eval_only=True evaluates"),
    (["coconut.py", "--eval_only=True"],
     "eval_only=True with init_from='scratch' would score an untrained"),
    (["coconut.py", "--n_train=-5"],
     "n_train=-5: give a value >= 0 (0 = the task's default size)"),
    (["coconut.py", "--method=coconat"], "method='coconat': use one of 'coconut', 'cot'"),
    (["coconut.py", "--reset_optimizer=always"], "reset_optimizer='always': use one of 'stage'"),
    (["coconut.py", "--task=prosqa_smal"], "task='prosqa_smal' is unknown; did you mean "
                                           "prosqa_small?"),
    (["coconut.py", "--task_options=min_hops"], "task_options='min_hops' must be a dict literal"),
    (["coconut.py", "--uniform_prob=1.5"], "uniform_prob=1.5: give a value in [0, 1]"),
    (["coconut.py", "--ckpt_interval=-1"], "ckpt_interval=-1: give a value >= 0"),
    # a learning rate of 0 trains nothing (issue 30): refused as in latro.py
    (["coconut.py", "--learning_rate=0"], "learning_rate=0.0: give a value > 0"),
    (["coconut.py", "--thoughts_sweep=0,x"], "thoughts_sweep='0,x': give thought counts >= 0"),
    (["coconut.py", "--batch_size=10"],
     "batch_size=10 (global) must be a multiple of micro_batch_size=128 x 1 ranks"),
    (["coconut.py", "--gradient_checkpointing=True"], "does not work with method=coconut"),
    (["coconut.py", "--fsdp=True"], "fsdp=True shards over the processes of a torchrun launch"),
    (["coconut.py", "--init_from={tmp}/nope.pt"],
     "init_from='{tmp}/nope.pt': no such checkpoint file"),
    (["coconut.py", "--init_from={tmp}/preds.jsonl"], "is a file but not a .pt checkpoint"),
    (["coconut.py", "--init_from={tmp}/no_model_here", "--n_train=8", "--n_val=2", "--n_test=2",
      "--batch_size=8", "--micro_batch_size=8", "--learning_rate=1e-4"],
     "init_from='{tmp}/no_model_here': no model there"),
    (["coconut.py", "--init_from=resume", "--out_dir={tmp}/fresh"], "has no ckpt.pt"),
    (["coconut.py", "--out_dir={tmp}/preds.jsonl"], "is a file, not a directory"),
    (["coconut.py", "--task=json", "--task_options={}", "--data_path={tmp}/mydata.jsonl"],
     "mydata.jsonl names no split, and one file for"),
    (["coconut.py", "--n_train=8", "--n_val=2", "--n_test=2", "--batch_size=8",
      "--micro_batch_size=8", "--block_size=8"],
     "needs 12 positions but the model has 8: raise --block_size"),
    (["coconut.py", "--n_train=4", "--n_val=2", "--n_test=2", "--batch_size=8",
      "--micro_batch_size=8"], "4 training examples < batch_size=8"),
]


def load(task, split="train", **kwargs):
    """A case that calls load_task; '{tmp}' in a string argument is the directory of FILES."""
    def call(tmp):
        filled = {}
        for key, value in kwargs.items():
            filled[key] = value.replace("{tmp}", tmp) if isinstance(value, str) else value
        return data.load_task(task, split, **filled)
    return call


def no_datasets(tmp):
    sys.modules["datasets"] = None  # `import datasets` raises ImportError (restored by the test)
    return data.load_task("gsm8k", "train")


def fake_datasets(error):
    """A `datasets` module whose load_dataset raises `error`, as the real one raises offline (a
    ConnectionError) or for a dataset it cannot find (an OSError)."""
    def load_dataset(*args, **kwargs):
        raise error

    module = type(sys)("datasets")
    module.load_dataset = load_dataset
    return module


def offline(task, split, error):
    """A case that loads a hub dataset with load_dataset raising `error`."""
    def call(tmp):
        sys.modules["datasets"] = fake_datasets(error)  # restored by the test
        return data.load_task(task, split)
    return call


OFFLINE = ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")


def empty_val(tmp):
    return data.load_splits("json", (0, 0, 0), path=f"{tmp}/e_{{split}}.jsonl")


def empty_valid(tmp):
    # the released files name the split 'valid': the error names the file that was read
    return data.load_splits("json", (0, 0, 0), path=f"{tmp}/v_{{split}}.jsonl")


def nearly_the_same(tmp):
    # the same question to a model: other white space, letter case, a compatibility character
    rows = [{"question": "Tom is a cat. Is Tom a pet?", "steps": [], "answer": "yes"}]
    other = [{"question": "TOM  is a cat.  Is Tom a\u00a0pet?", "steps": [], "answer": "yes"}]
    return data.check_split_overlap({"train": rows, "val": other, "test": []})


def hashed(tmp):
    return data.check_coconut_answers({"train": [{"question": "q", "answer": "a#b"}]})


def no_tokenizer(tmp):
    return vocab.build_tokenizer(f"{tmp}/no_tokenizer_here", [])


def overlapping(tmp):
    rows = [{"question": f"q{i}?", "steps": [], "answer": str(i)} for i in range(5)]
    return data.check_split_overlap({"train": rows, "val": rows[4:], "test": rows[:2]})


LOADER_CASES = [
    # the task and its options: the task is checked first
    (load("prosqa_smal", symbolic=True),
     "task 'prosqa_smal' is unknown; did you mean prosqa_small?"),
    (load("sudoku"), "task 'sudoku' is unknown; known: prosqa, prosqa_small"),
    (load("modsum", "dev"), "split must be one of ('train', 'val', 'test'), got 'dev'"),
    (load("modsum", n=-5), "n=-5 for the train split: give a count >= 0"),
    (load("modsum", n=True), "n=True for the train split: give a count >= 0"),
    (load("modsum", n=2.5), "n=2.5 for the train split"),
    (load("prosqa", nodes=5), "task 'prosqa' has no option nodes; its options: hop_weights"),
    (load("modsum", digits=3), "task 'modsum' has no option digits; its options: modulus, terms"),
    (load("json", path="x.json", digits=3), "task 'json' takes no task options, got ['digits']"),
    (load("json"), "task 'json' needs path= local files, one per split"),
    (load("gsm8k_aug"), "task 'gsm8k_aug' needs path= local files, one per split"),
    (no_datasets, "loading gsm8k from the hub needs `pip install datasets`"),
    # issue 30: the hub out of reach: how to give local files instead, with their format
    (offline("gsm8k", "train", OFFLINE),
     "gsm8k: the hub's openai/gsm8k cannot be loaded (Couldn't reach 'openai/gsm8k' on the Hub "
     "(OfflineModeIsEnabled)); without the network give local files, one per split: "
     "--data_path=data/gsm8k_{split}.jsonl (load_task: path=), one JSON object per line: "
     "{\"question\": \"...\", \"answer\": \"<solution lines>\\n#### 42\"}"),
    (offline("gsm8k", "test", OSError("[Errno -2] Name or service not known")),
     "gsm8k: the hub's openai/gsm8k cannot be loaded ([Errno -2] Name or service not known)"),
    (offline("arc", "val", FileNotFoundError("Dataset 'allenai/ai2_arc' doesn't exist")),
     "arc: the hub's allenai/ai2_arc cannot be loaded (Dataset 'allenai/ai2_arc' doesn't exist); "
     "without the network give local files, one per split: --data_path=data/arc_{split}.jsonl "
     "(load_task: path=), one JSON object per line: {\"question\": \"...\", \"choices\": "
     "{\"text\": "),
    # which file serves which split: no leakage
    (load("json", path="{tmp}/mydata.jsonl"), "mydata.jsonl names no split, and one file for"),
    (load("json", "test", path="{tmp}/mydata.jsonl"), "mydata.jsonl names no split"),
    (load("gsm8k", "test", path="{tmp}/gsm8k_train.jsonl"), "names the train split, not test"),
    (load("json", path="{tmp}/mydata.jsonl", split_layout="last:5"),
     "split_layout='last:5' is not understood: write 'tail:VAL,TEST'"),
    (load("json", path="{tmp}/mydata.jsonl", split_layout="tail:0,0"), "is not understood"),
    (load("json", path="{tmp}/mydata.jsonl", split_layout="tail:5,5"),
     "10 rows, too few for split_layout='tail:5,5'"),
    (load("modsum", split_layout="tail:1,1"), "split_layout='tail:1,1' cuts one local file"),
    (load("json", path="{tmp}/d_{split}.json", split_layout="tail:1,1"),
     "has one file per split ({split}), so split_layout='tail:1,1' does not apply"),
    (load("gsm8k", "val", path="{tmp}/gsm8k_{split}.jsonl"),
     "gsm8k_train.jsonl: 10 training problems, too few to hold out the last 500"),
    (load("json", "val", path="{tmp}/d_{split}.json"),
     "data file not found for the val split: tried {tmp}/d_valid.json, {tmp}/d_val.json"),
    (overlapping, "questions found in two splits (train/val 1, train/test 2), e.g. 'q4?'"),
    # the files themselves: missing, not JSON, rows without their fields
    (load("json", path="{tmp}/nope_train.json"), "data file not found: {tmp}/nope_train.json"),
    (load("json", path="{tmp}/train"), "data file is a directory, not a file: {tmp}/train"),
    (load("json", path="{tmp}/bad_train.json"), "bad_train.json: invalid JSON at line 2"),
    (load("json", path="{tmp}/obj_train.json"), "obj_train.json: expected a JSON list of examples"),
    (load("json", path="{tmp}/noanswer_train.jsonl"), "noanswer_train.jsonl: row 1: missing field"),
    (load("gsm8k", "test", path="{tmp}/gsm_test.jsonl"),
     "gsm_test.jsonl: row 1: answer has no '#### <number>' line"),
    (load("arc", "test", path="{tmp}/arc_test.jsonl"), "arc_test.jsonl: row 1: answerKey 'E'"),
    (load("gsm8k_aug", path="{tmp}/aug_train.txt"), "aug_train.txt: row 2: no '||' between"),
    # files that are not what their name says, and rows no method can use
    (load("json", path="{tmp}/utf16_train.json"), "utf16_train.json is UTF-16 text: save it as"),
    (load("json", path="{tmp}/gz_train.json"), "gz_train.json is gzip-compressed: decompress it"),
    (load("json", path="{tmp}/lines_train.json"),
     "lines_train.json holds JSON Lines (one object per line), not a JSON list: rename it to "
     ".jsonl"),
    (load("json", path="{tmp}/surrogate_train.json"), "row 1: holds a lone surrogate"),
    (load("json", path="{tmp}/emptyans_train.jsonl"), "row 1: empty answer: every output would"),
    (load("json", path="{tmp}/marker_train.jsonl"),
     "row 1: holds '<|latent|>', the text of a Coconut marker"),
    (load("gsm8k", "test", path="{tmp}/pens_test.jsonl"),
     "row 1: answer '18 pens' after '####' is not a number"),
    (empty_val, "the val split is empty ({tmp}/e_val.jsonl)"),
    (empty_valid, "the val split is empty ({tmp}/v_valid.jsonl)"),
    (nearly_the_same, "questions found in two splits (train/val 1)"),
    (hashed, "a train answer holds '#' ('a#b'): Coconut reads the answer after the last '#'"),
    (no_tokenizer, "tokenizer '{tmp}/no_tokenizer_here' cannot be loaded"),
    # generator options: checked before any example is drawn
    (load("prosqa_small", min_hops=4, max_hops=2), "task_options: min_hops=4 is more than "
                                                   "max_hops=2: give min <= max"),
    (load("prosqa_small", min_hops="two"), "task_options min_hops='two': task 'prosqa_small' "
                                           "expects int"),
    # issue 30: each generator's options bounded, before any example is drawn
    (load("multiplication", digits=0), "task_options for multiplication: digits=0: give digits "
                                       ">= 1"),
    (load("multiplication", digits=3000), "task_options for multiplication: digits=3000: "
                                          "products of more than 4300 digits exceed Python's"),
    (load("prontoqa", hops=0), "task_options for prontoqa: hops=0: give 1 <= hops <= 15"),
    (load("prontoqa", hops=16), "task_options for prontoqa: hops=16: give 1 <= hops <= 15 (a "
                                "chain of hops concepts and a distractor chain of 2 use 17"),
    (load("prosqa", hop_weights=(0, 0, 0, 0)),
     "task_options for prosqa: hop_weights=(0, 0, 0, 0): weights are shares of the hop counts: "
     "give numbers >= 0, not all 0"),
    (load("prosqa", hop_weights=(1, -1, 1, 1)), "hop_weights=(1, -1, 1, 1): weights are shares"),
    (load("prosqa_small", hop_weights=[0, 0, 0]), "task_options for prosqa_small: "
                                                  "hop_weights=[0, 0, 0]: weights are shares"),
    (load("prosqa", hop_weights=(1, 2)), "task_options for prosqa: hop_weights=(1, 2) needs one "
                                         "weight per hop count 3..6 (4), got 2"),
    (load("prosqa", hop_weights=3), "hop_weights=3: give a list of 4 numbers, the share of "
                                    "questions of each hop count 3..6"),
    (load("prosqa", min_nodes=0), "task_options for prosqa: min_nodes=0: a graph has two roots "
                                  "at least; give min_nodes >= 2"),
    (load("prosqa_small", min_hops=0), "min_hops=0: an answer is one hop away at least"),
    (load("kgraph", entities=1), "task_options for kgraph: needs entities >= 2, relations >= 1 "
                                 "and 1 <= held_out < entities, got entities=1"),
    (load("kgraph", held_out=200), "1 <= held_out < entities, got entities=200, relations=4, "
                                   "held_out=200"),
    (load("kgraph", relations=0), "got entities=200, relations=0, held_out=40"),
    (load("kgraph", hops=1), "task_options for kgraph: hops=1: give hop counts >= 2"),
    (load("kgraph", hops=(2, 2.5)), "hops=(2, 2.5): give hop counts >= 2 (an int or a list"),
    (load("kgraph", val_share=1.0), "needs 0 < val_share < 1 and fact_repeat >= 1, got "
                                    "val_share=1.0"),
    (load("kgraph", fact_repeat=0), "got val_share=0.2, fact_repeat=0"),
    (load("kgraph", hops=(10,)), "hops=(10,), fact_repeat=3 make more than 5,000,000 training "
                                 "questions: give fewer"),
    (load("modsum", terms=0), "task_options for modsum: terms=0: give terms >= 1"),
    (load("modsum", modulus=0), "task_options for modsum: modulus=0: give modulus >= 2"),
    # issue 30: the word vocabulary's special tokens as text, named by file, row and field
    (load("json", path="{tmp}/eosq_train.jsonl"),
     "eosq_train.jsonl: row 1: holds '<eos>', a special token of the word vocabulary, in its "
     "question: remove it"),
    (load("json", path="{tmp}/padstep_train.jsonl"),
     "padstep_train.jsonl: row 2: holds '<pad>', a special token of the word vocabulary, in its "
     "step 2"),
    (load("json", path="{tmp}/unkans_train.json"), "unkans_train.json: row 1: holds '<unk>', a "
                                                  "special token of the word vocabulary, in its "
                                                  "answer"),
    (load("arc", "test", path="{tmp}/bosopt_test.jsonl"),
     "bosopt_test.jsonl: row 2: holds '<bos>', a special token of the word vocabulary, in its "
     "option B"),
    (load("gsm8k_aug", path="{tmp}/aug_eos_train.txt"),
     "aug_eos_train.txt: row 2: holds '<eos>', a special token of the word vocabulary, in its "
     "question"),
    # issue 30: a GSM8K gold's commas are thousands groups
    (load("gsm8k", "test", path="{tmp}/commas_test.jsonl"),
     "commas_test.jsonl: row 1: answer '1,2,3' after '####' has commas that are not thousands "
     "groups (1,234 or 1,234,567): fix the number"),
    (load("gsm8k", "test", path="{tmp}/commas2_test.jsonl"),
     "commas2_test.jsonl: row 2: answer '12,34' after '####' has commas that are not thousands "
     "groups"),
    # issue 30: JSON nested deeper than json reads, for a list file and a JSON Lines file
    (load("json", path="{tmp}/deep_train.json"),
     "deep_train.json: row 2 (line 2): JSON nested 200002 levels deep, deeper than Python's json "
     "reader goes"),
    (load("json", path="{tmp}/deep_train.jsonl"),
     "deep_train.jsonl: row 2: JSON nested 200001 levels deep, deeper than Python's json reader "
     "goes"),
    # issue 30: ARC options that are numbers (refused, not guessed at) or share a label
    (load("arc", "test", path="{tmp}/arcnum_test.jsonl"),
     "arcnum_test.jsonl: row 1: option text 1 is not a string (JSON int): write every label and "
     "text in quotes (\"1\")"),
    (load("arc", "test", path="{tmp}/arcdup_test.jsonl"),
     "arcdup_test.jsonl: row 2: duplicate label 'B' in the choices ['B', 'B']: give each option "
     "its own label"),
    # issue 30: UTF-16 without a byte-order mark, the message of UTF-16 with one
    (load("json", path="{tmp}/u16le_train.jsonl"), "u16le_train.jsonl is UTF-16 text: save it as "
                                                   "UTF-8"),
    (load("gsm8k_aug", path="{tmp}/u16be_train.txt"), "u16be_train.txt is UTF-16 text: save it "
                                                      "as UTF-8"),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    for name, text in FILES.items():
        (d / name).write_text(text, encoding="utf-8")
    for name, raw in BYTES.items():
        (d / name).write_bytes(raw)
    (d / "train").mkdir()
    return str(d)


def run(argv, tmp):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    argv = [a.replace("{tmp}", tmp) for a in argv]
    return subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], cwd=tmp,
                          capture_output=True, text=True, env=env, timeout=300)


def assert_one_clear_line(r, message, tmp):
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr  # no traceback
    assert message.replace("{tmp}", tmp) in r.stderr
    assert not WORK.search(r.stdout), r.stdout


# they import torch: seconds as a subprocess
IN_PROCESS = ("coconut.py", "latro.py", "data.py", "bench.py")


@pytest.mark.parametrize("argv, message", CLI_CASES, ids=[" ".join(c[0][:2]) + f" #{i}"
                                                          for i, c in enumerate(CLI_CASES)])
def test_cli_bad_input_is_a_clear_error_and_no_work(argv, message, tmp, tmp_path):
    if argv[0] not in IN_PROCESS:  # no torch import: as cheap as a subprocess gets
        assert_one_clear_line(run(argv, tmp), message, tmp)
        return
    r = run_main(argv[0], [a.replace("{tmp}", tmp) for a in argv[1:]], cwd=tmp_path)
    assert r.code == 1 and r.error is not None, r.out[-2000:]
    assert message.replace("{tmp}", tmp) in str(r.error)
    assert not WORK.search(r.out), r.out


# what the user sees from each script: one line on stderr, status 1 (an error found before the data,
# and one found after the data, when the model is looked up)
ONE_LINE_CASES = [
    (["data.py", "prosqa_smal", "train", "3"], "task 'prosqa_smal' is unknown"),
    (["bench.py", "--sections=coconut_trian"], "did you mean coconut_train?"),
    (["latro.py", "--temperature=0"], "temperature=0.0: greedy rollouts make the K rationales"),
    (["coconut.py", "--init_from={tmp}/no_model_here", "--n_train=8", "--n_val=2", "--n_test=2",
      "--batch_size=8", "--micro_batch_size=8", "--learning_rate=1e-4"],
     "init_from='{tmp}/no_model_here': no model there"),
]


@pytest.mark.parametrize("argv, message", ONE_LINE_CASES,
                         ids=[" ".join(c[0][:2]) + f" #{i}" for i, c in enumerate(ONE_LINE_CASES)])
def test_script_error_is_one_line_on_stderr_and_status_1(argv, message, tmp):
    assert_one_clear_line(run(argv, tmp), message, tmp)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the preset runs")
def test_bench_gpu_preset_without_cuda_is_one_line_and_status_1(tmp):
    r = run(["bench.py", "--preset=gpu"], tmp)
    assert_one_clear_line(r, "preset=gpu needs a CUDA GPU and this torch sees none", tmp)
    assert r.stdout == "" and not os.path.exists(os.path.join(tmp, "bench.json"))


@pytest.mark.parametrize("call, message", LOADER_CASES,
                         ids=[f"loader #{i}" for i in range(len(LOADER_CASES))])
def test_loader_bad_input_is_a_user_error_before_any_work(call, message, tmp, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("data was generated before the error")

    monkeypatch.setattr(tasks, "generate_split", no_generation)
    monkeypatch.setitem(sys.modules, "datasets", sys.modules.get("datasets"))
    with pytest.raises(UserError) as e:
        call(tmp)
    assert message.replace("{tmp}", tmp) in str(e.value)


def test_the_tables_are_big_enough_and_evaluate_knows_every_task():
    assert len(CLI_CASES) + len(LOADER_CASES) >= 40
    # evaluate.py keeps its own copy, so that scoring a file does not import torch
    assert evaluate.TASKS == data.TASKS


def test_numeric_answers_are_scored_as_their_text(tmp_path):
    # a hand-written gold answer is often a JSON number: 7, 7.0 and 1250.5 are read as their text
    preds = tmp_path / "preds.jsonl"
    preds.write_text(jsonl({"answer": 7, "output": "The answer is 7."},
                           {"answer": 7.0, "output": "The answer is 7"},
                           {"answer": 1250.5, "output": "The answer is 1,250.50."},
                           {"answer": 3, "output": "The answer is 4."}))
    r = run(["evaluate.py", "--task", "gsm8k", "--preds", str(preds)], str(tmp_path))
    assert r.returncode == 0 and r.stdout == "gsm8k: 3/4 correct = 0.7500\n", r.stderr


def test_a_utf8_byte_order_mark_is_dropped_so_row_1_meets_every_check(tmp_path):
    # issue 30: the BOM stayed on row 1's question; the 8-shot and split-overlap checks missed it
    from formats import GSM8K_SHOTS
    shot = {"question": GSM8K_SHOTS[0][0], "answer": GSM8K_SHOTS[0][2]}
    (tmp_path / "d_test.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl(shot).encode())
    (tmp_path / "d_train.jsonl").write_text(jsonl(shot, {"question": "q?", "answer": "1"}))
    test = data.load_task("json", "test", path=str(tmp_path / "d_{split}.jsonl"))
    assert test[0]["question"] == shot["question"]
    with pytest.raises(UserError, match="the test split holds 1 question"):
        data.check_shots_unseen({"train": [], "val": [], "test": test})
    train = data.load_task("json", "train", path=str(tmp_path / "d_{split}.jsonl"))
    with pytest.raises(UserError, match=r"questions found in two splits \(train/test 1\)"):
        data.check_split_overlap({"train": train, "test": test})
    aug = tmp_path / "bom_train.txt"
    aug.write_bytes(b"\xef\xbb\xbfq1||<<1+1=2>> #### 2\n")
    assert data.load_task("gsm8k_aug", "train", path=str(aug))[0]["question"] == "q1"


def small_hf_tokenizer(path):
    """A Hugging Face tokenizer (WordPiece, not word-level) with eos '</s>' and an added special
    token '<|im_end|>', saved and loaded as a hub tokenizer is."""
    from tokenizers import Tokenizer as RustTokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = "<s> </s> <unk> hello world".split()
    rust = RustTokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    hf.add_tokens(["<|im_end|>"], special_tokens=True)
    hf.save_pretrained(path)
    return vocab.build_tokenizer(str(path), [])


@pytest.mark.parametrize("field, text, named", [
    ("question", "hello <|im_end|> world", "in its question ('hello <|im_end|> world')"),
    ("steps", ["a", "b </s>"], "in its step 2 ('b </s>')"),
    ("answer", "<s>7", "in its answer ('<s>7')"),
])
def test_a_tokenizers_own_special_tokens_in_the_data_are_refused(tmp_path, field, text, named):
    # issue 30: vocab.check_no_special_text, which the scripts call after build_tokenizer
    tok = small_hf_tokenizer(tmp_path / "tok")
    good = {"question": "hello world", "steps": [], "answer": "7"}
    splits = {"train": [good], "val": [good], "test": [good, {**good, field: text}]}
    vocab.check_no_special_text(tok, splits["train"])                   # clean data: no error
    token = re.search(r"<\|im_end\|>|</s>|<s>", str(text))[0]
    with pytest.raises(UserError) as e:
        vocab.check_no_special_text(tok, splits)
    assert str(e.value) == (f"the test split's example 2 holds {token!r} {named}, a special token "
                            f"of tokenizer {str(tmp_path / 'tok')!r}: it would be read as that "
                            f"token; remove it from the data")
    with pytest.raises(UserError, match=r"^example 2 holds"):               # a plain list
        vocab.check_no_special_text(tok, splits["test"])


def test_the_word_vocabularys_special_tokens_are_checked_the_same_way():
    words = vocab.build_tokenizer("words", [{"question": "a b", "steps": [], "answer": "c"}])
    vocab.check_no_special_text(words, [{"question": "a b", "steps": [], "answer": "c"}])
    with pytest.raises(UserError, match="example 1 holds '<eos>' in its option B"):
        vocab.check_no_special_text(words, [{"question": "a", "steps": [], "answer": "c",
                                             "options": [("A", "c"), ("B", "<eos>")]}])


@pytest.mark.parametrize("task, options", [
    ("prontoqa", {"hops": 1}), ("prontoqa", {"hops": 15}), ("multiplication", {"digits": 1}),
    ("modsum", {"terms": 1, "modulus": 2}), ("prosqa_small", {"hop_weights": None}),
    ("prosqa_small", {"hop_weights": [0, 0, 1]}), ("prosqa_small", {"min_nodes": 2}),
    ("kgraph", {"entities": 2, "held_out": 1, "relations": 1}),
])
def test_the_edges_of_the_generator_option_bounds_are_accepted(task, options):
    # issue 30: the one value past each bound is refused in LOADER_CASES; the bound itself works
    task_options.check_task_options(task, options)
    assert len(data.load_task(task, "train", n=2, **options)) == 2


def test_data_py_offline_is_one_line_saying_how_to_give_local_files(tmp, tmp_path, monkeypatch):
    # issue 30: `python data.py gsm8k train 3` without network; in process with load_dataset
    # raising what it raises offline, then as a real process with the hub really out of reach
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(OFFLINE))
    r = run_main("data.py", ["gsm8k", "train", "3"], cwd=tmp_path)
    assert r.code == 1 and "--data_path=data/gsm8k_{split}.jsonl" in str(r.error), r.out
    monkeypatch.undo()
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "gsm8k", "train", "3"],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert_one_clear_line(p, "gsm8k: the hub's openai/gsm8k cannot be loaded (", tmp)
    assert "--data_path=data/gsm8k_{split}.jsonl (load_task: path=)" in p.stderr
    # and the way out it names works: the same look at a local file
    local = tmp_path / "gsm8k_train.jsonl"
    local.write_text(jsonl({"question": "q?", "answer": "1+1=2\n#### 2"}))
    r = run_main("data.py", ["gsm8k", "train", "1", f"--data_path={local}"], cwd=tmp_path)
    assert r.code == 0 and '"answer": "2"' in r.out, r.out


def dump_that_fails_midway(error):
    """json.dump that writes the first half of its text, then raises `error` (a full disk)."""
    def dump(obj, f, **kwargs):
        text = json.dumps(obj, **kwargs)
        f.write(text[:len(text) // 2])
        f.flush()
        raise error
    return dump


def leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def test_prepare_writes_atomically_and_keeps_the_old_file_when_a_write_fails(tmp_path,
                                                                             monkeypatch):
    # issue 30: a temp file beside the output, then os.replace; a failure keeps the previous file
    import errno
    raw = tmp_path / "valid.txt"
    raw.write_text("q1||<<1+1=2>> #### 2\nq2||<<2+2=4>> #### 4\n")
    out = tmp_path / "out" / "gsm_valid.json"
    data.main(["prepare", "gsm8k_aug", str(raw), str(out)])
    before = out.read_text()
    raw.write_text("q3||<<3+3=6>> #### 6\n")
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(json, "dump", dump_that_fails_midway(full))
    with pytest.raises(UserError, match=r"cannot write .*gsm_valid.json \(No space left on "
                                        r"device\); a file already there is kept as it was"):
        data.main(["prepare", "gsm8k_aug", str(raw), str(out)])
    assert out.read_text() == before and leftovers(out.parent) == []
    # Ctrl-C midway: one line, and the same holds; a bug midway goes on up, and the same holds
    monkeypatch.setattr(json, "dump", dump_that_fails_midway(KeyboardInterrupt()))
    with pytest.raises(UserError, match=r"^interrupted \(Ctrl-C\) while preparing: no output"):
        data.main(["prepare", "gsm8k_aug", str(raw), str(out)])
    assert out.read_text() == before and leftovers(out.parent) == []
    monkeypatch.setattr(json, "dump", dump_that_fails_midway(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        data.main(["prepare", "gsm8k_aug", str(raw), str(out)])
    assert out.read_text() == before and leftovers(out.parent) == []
    monkeypatch.undo()
    data.main(["prepare", "gsm8k_aug", str(raw), str(out)])
    assert json.loads(out.read_text())[0]["question"] == "q3" and leftovers(out.parent) == []


def test_prepare_prontoqa_writes_its_three_files_all_or_none(tmp_path, monkeypatch):
    import errno
    raw = {f"example{i}": {"test_example": {
        "question": f"Rex{i} is hot.", "query": f"True or false: Rex{i} is hot.",
        "chain_of_thought": [f"Rex{i} is hot."], "answer": "True"}} for i in range(1, 6)}
    raw_path = tmp_path / "raw.json"
    raw_path.write_text(json.dumps(raw))
    out = tmp_path / "pq"
    data.prepare_prontoqa(str(raw_path), str(out), (2, 1))
    before = {p.name: p.read_text() for p in out.iterdir()}
    calls, dump = [], json.dump

    def third_fails(obj, f, **kwargs):                        # train and valid written, test not
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.EROFS, "Read-only file system")
        dump(obj, f, **kwargs)

    monkeypatch.setattr(json, "dump", third_fails)
    with pytest.raises(UserError, match=r"prontoqa_test.json \(Read-only file system\)"):
        data.prepare_prontoqa(str(raw_path), str(out), (1, 1))
    assert {p.name: p.read_text() for p in out.iterdir()} == before   # no file replaced, no temp


def test_a_refused_bench_run_leaves_the_results_file_as_it_was(tmp_path):
    # issue 30: a typo in --sections ran nothing and wrote an empty table over the results
    results = tmp_path / "bench.json"
    results.write_text('{"rows": ["earlier results"]}')
    for argv in (["--sections=coconut_trian"], ["--sizes=gtp2"], ["--repeats=0"]):
        r = run_main("bench.py", argv + [f"--out_json={results}"], cwd=tmp_path)
        assert r.code == 1 and r.error is not None and r.out == "", r.out
    assert results.read_text() == '{"rows": ["earlier results"]}'
    assert os.listdir(tmp_path) == ["bench.json"]                  # the write probe left nothing


def test_bench_writes_its_results_file_whole(tmp_path):
    # the good path past the checks: the memory table (no model is run), written atomically
    results = tmp_path / "bench.json"
    results.write_text("earlier")
    r = run_main("bench.py", ["--sections=memory", f"--out_json={results}"], cwd=tmp_path)
    assert r.code == 0, r.out
    rows = json.loads(results.read_text())["rows"]
    assert rows and {row["section"] for row in rows} == {"memory"}
    assert os.listdir(tmp_path) == ["bench.json"]


def test_ctrl_c_while_generating_is_one_line(tmp_path):
    # issue 30: `python data.py prosqa train 20000` stopped with Ctrl-C once its progress shows
    import signal
    import time
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "data.py"), "prosqa", "train",
                          "20000"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    seen, deadline = b"", time.time() + 120
    while b"generating prosqa train" not in seen and time.time() < deadline:
        seen += os.read(p.stderr.fileno(), 256)                     # progress after ~2 s
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    err = (seen + err).decode()
    assert p.returncode == 1 and "Traceback" not in err, err
    # the progress line is ended, then the one line of the error
    assert err.splitlines()[-1] == ("error: interrupted (Ctrl-C) while generating or loading the "
                                    "prosqa train examples: nothing was written"), err
    assert err.count("error:") == 1 and out == b""


def test_ctrl_c_in_data_py_is_a_user_error_for_a_look_and_for_prepare(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tasks, "generate_split", interrupted)
    with pytest.raises(UserError, match=r"^interrupted \(Ctrl-C\) while generating or loading "
                                        r"the modsum val examples"):
        data.main(["modsum", "val", "5"])
    monkeypatch.setattr(data, "load_gsm8k_aug", interrupted)
    with pytest.raises(UserError, match=r"^interrupted \(Ctrl-C\) while preparing: no output"):
        data.main(["prepare", "gsm8k_aug", str(tmp_path / "a.txt"), str(tmp_path / "b.json")])

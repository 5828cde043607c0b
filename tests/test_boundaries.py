"""Boundaries that no other test reached, each tested on both sides against a hand-worked
expectation or an independent computation:

- the tail stop check's window (model.TailStopCheck): the longest stop's UTF-8 bytes + 2 tokens, and
  the 2 are needed (a SentencePiece tokenizer drops a suffix's leading space);
- preflight's positions check: n_positions tokens pass, n_positions + 1 are refused;
- the disk check: ckpt.pt holds π0's weights with a reference model, and epoch_N.pt files count;
- the memory plan's bytes per value: 2 in bf16, 4 in fp32, for the KV cache and the activations;
- a save without an optimizer (best.pt, epoch_N.pt) never writes non-finite weights;
- the fixed checker's number finder: a '-' right after ')' or ']' is no minus sign;
- the released checker scores every numeric answer (modsum too), never a text answer;
- the seed range [0, 2**32);
- GSM8k-Aug lines end at \\n, \\r\\n and a lone \\r, not at U+2028;
- a UTF-16 file is refused as UTF-16 whichever its byte order;
- the 8-shot prompt's questions are refused in val and in test, not in train.

Each test fails when its behaviour is broken by one line (checked by planting the change in a copy
of the tree).
"""
import contextlib
import os
import types

import pytest
import torch
from transformers import AutoConfig, GPT2LMHeadModel

import checkpoints
import configurator
import data
import evaluate
import loaders
import model
import preflight
from configurator import ConfigError, UserError
from formats import GSM8K_SHOTS

# -----------------------------------------------------------------------------
# 1. the tail stop window: the longest stop's bytes + 2 tokens


@pytest.fixture(scope="module")
def mistral_tok(tmp_path_factory):
    """Mistral-7B-v0.3's SentencePiece tokenizer.model (from the mistral-common wheel)."""
    from test_tokenizers import load, package_data
    name = "mistral_instruct_tokenizer_240323.model.v3"
    return load(tmp_path_factory.mktemp("mistral"),
                [(os.path.join(package_data("mistral_common"), name), "tokenizer.model")],
                "LlamaTokenizer")


STOP = " 18"                               # 3 bytes: the window is 3 + 2 = 5 tokens
TEXT = "She pays 3 x 6 = 18 dollars."


def first_firing(check, ids):
    """The number of tokens at which the check first stops the row, fed token by token as the
    sampler feeds it; None when it never does."""
    not_finished = torch.zeros(1, dtype=torch.bool)
    return next((t for t in range(1, len(ids) + 1)
                 if check(torch.tensor([ids[:t]]), not_finished)[0]), None)


def test_tail_stop_window_stops_on_the_token_that_completes_a_short_stop(mistral_tok):
    tok = mistral_tok
    ids = tok.encode(TEXT)
    pieces = tok.hf.convert_ids_to_tokens(ids)
    # the pitfall: one piece per character, and the space alone is dropped when decoded first
    assert pieces[-6:-2] == ["▁=", "▁", "1", "8"] and tok.decode(ids[-5:-2]) == "18"
    complete = next(t for t in range(1, len(ids) + 1) if STOP in tok.decode(ids[:t]))
    assert pieces[complete - 1] == "8"                          # the '8' of '18' completes it
    check = model.TailStopCheck(tok, [STOP])
    assert first_firing(check, ids) == complete                 # on that token, not before
    # two tokens fewer decode '▁', '1', '8' alone: "18", the space dropped, so the stop is missed
    short = model.TailStopCheck(tok, [STOP])
    short.window -= 2
    assert first_firing(short, ids) is None


class Scripted(torch.nn.Module):
    """A causal LM stand-in that writes a fixed continuation, one token per forward (enough of the
    transformers interface for model.generate)."""
    def __init__(self, continuation, vocab, prompt_len):
        super().__init__()
        self.continuation, self.vocab, self.prompt_len = continuation, vocab, prompt_len
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, past_key_values=None, **kwargs):
        done = attention_mask.shape[1] - self.prompt_len                # tokens generated so far
        logits = torch.full((input_ids.shape[0], 1, self.vocab), -1e9)
        logits[:, :, self.continuation[min(done, len(self.continuation) - 1)]] = 0.0
        return types.SimpleNamespace(logits=logits, past_key_values=past_key_values)


def test_sample_stops_a_rollout_on_the_token_that_completes_a_short_stop(mistral_tok):
    tok = mistral_tok
    ids = tok.encode(TEXT)
    complete = next(t for t in range(1, len(ids) + 1) if STOP in tok.decode(ids[:t]))
    how = model.Sampler(tok, {tok.eos_id}, [STOP], tok.pad_id, 1, contextlib.nullcontext())
    outs, stopped, n_decoded = model.sample(Scripted(ids, len(tok), 3), [[5, 6, 7]], 40, how)
    assert n_decoded == complete < len(ids)
    assert tok.decode(outs[0]) == "She pays 3 x 6 =" and stopped.tolist() == [True]

# -----------------------------------------------------------------------------
# 2. preflight: a sequence of exactly n_positions tokens fits, one more does not

TINY = dict(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
MEMORY = dict(fsdp=False, precision="fp32", grad_accum=1, kv_cache=(1, 16),
              activations=(16, 0, False))


@pytest.mark.parametrize("tokens,fits", [(15, True), (16, True), (17, False)])
def test_preflight_takes_exactly_n_positions_tokens(tokens, fits):
    cfg = AutoConfig.for_model("gpt2", **TINY)
    longest = [(tokens, "the longest rollout", "lower max_new_tokens")]
    if fits:
        n = preflight.preflight(cfg, "cpu", longest=longest, **MEMORY)
        assert n == sum(p.numel() for p in GPT2LMHeadModel(cfg).parameters())
    else:
        with pytest.raises(UserError, match=r"the longest rollout needs 17 positions but the "
                                            r"model has 16: lower max_new_tokens"):
            preflight.preflight(cfg, "cpu", longest=longest, **MEMORY)

# -----------------------------------------------------------------------------
# 3. the disk check: ckpt.pt (weights 4 + AdamW 8 + π0 4 bytes/param) twice, best.pt, epoch_N.pt


def free_bytes(monkeypatch, free):
    usage = types.SimpleNamespace(total=10 * free + 1, used=0, free=free)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage)


@pytest.mark.parametrize("with_reference,extra_weights,need", [
    (False, 0, 2 * 1000 * 12 + 4 * 1000),              # 28,000 bytes: ckpt.pt twice, best.pt
    (True, 0, 2 * 1000 * 16 + 4 * 1000),               # 36,000: π0's weights in ckpt.pt
    (False, 3, 2 * 1000 * 12 + 4 * 1000 * 4),          # 40,000: 3 epoch_N.pt
    (True, 2, 2 * 1000 * 16 + 4 * 1000 * 3),           # 44,000: both
])
def test_disk_check_counts_the_reference_and_the_epoch_files(monkeypatch, tmp_path,
                                                             with_reference, extra_weights, need):
    free_bytes(monkeypatch, need)
    preflight.check_disk(str(tmp_path), 1000, with_reference, extra_weights)      # exactly enough
    free_bytes(monkeypatch, need - 1)
    with pytest.raises(UserError, match="checkpoints need about"):
        preflight.check_disk(str(tmp_path), 1000, with_reference, extra_weights)  # a byte short


@pytest.mark.parametrize("reference,per_param", [
    ("none", 2 * 12 + 4 * 3),                          # ckpt.pt twice, best.pt, 2 epoch_N.pt
    ("full", 2 * 16 + 4 * 3),                          # π0's fp32 weights in ckpt.pt too
])
def test_preflight_checks_the_disk_for_the_run_it_plans(monkeypatch, tmp_path, reference,
                                                        per_param):
    cfg = AutoConfig.for_model("gpt2", **TINY)
    need = per_param * sum(p.numel() for p in GPT2LMHeadModel(cfg).parameters())
    monkeypatch.delenv("RANK", raising=False)
    memory = {**MEMORY, "reference": reference}
    free_bytes(monkeypatch, need)
    preflight.preflight(cfg, "cpu", longest=[], out_dir=str(tmp_path), extra_weights=2, **memory)
    free_bytes(monkeypatch, need - 1)
    with pytest.raises(UserError, match=r"best.pt, and 2 epoch_N.pt"):
        preflight.preflight(cfg, "cpu", longest=[], out_dir=str(tmp_path), extra_weights=2,
                            **memory)

# -----------------------------------------------------------------------------
# 4. the memory plan: 2 bytes per cached or saved value in bf16, 4 in fp32


@pytest.mark.parametrize("precision,unit", [("bf16", 2), ("fp32", 4)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_plan_counts_bytes_per_value_of_the_precision(monkeypatch, precision, unit,
                                                             checkpointing):
    cfg = AutoConfig.for_model("gpt2", vocab_size=100, n_positions=64, n_embd=32, n_layer=3,
                               n_head=4)
    seen = {}
    real = preflight.memory_plan

    def spy(n_params, **kw):
        seen.update(kw)
        return real(n_params, **kw)

    monkeypatch.setattr(preflight, "memory_plan", spy)
    preflight.plan_memory(cfg, "cpu", fsdp=False, precision=precision, grad_accum=1,
                          kv_cache=(6, 40), activations=(80, 10, checkpointing))
    # keys and values, 3 layers, 4 heads of 8, 6 rows of 40 positions
    assert seen["kv_cache_bytes"] == 2 * 3 * 4 * 8 * 6 * 40 * unit
    # 17 values of width 32 per token per layer (checkpointing: each layer's input, 1 value, and
    # one layer's 17), then 10 scored positions' logits (unit) and their fp32 log-softmax (8)
    per_token = (3 + 17 if checkpointing else 3 * 17) * 32 * unit
    assert seen["activations_bytes"] == 80 * per_token + 10 * 100 * (unit + 8)
    assert seen["device_bytes"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") \
        // int(os.environ.get("LOCAL_WORLD_SIZE", 1))

# -----------------------------------------------------------------------------
# 5. a save without an optimizer never writes non-finite weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_weights_only_save_refuses_non_finite_weights_and_keeps_the_last_file(tmp_path, bad):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    best = str(tmp_path / checkpoints.BEST_NAME)
    checkpoints.save_run(best, {"iter_num": 5}, net)                    # finite: written
    kept = open(best, "rb").read()
    assert torch.equal(torch.load(best, weights_only=True)["model"]["1.weight"], net[1].weight)
    with torch.no_grad():
        net[1].weight[0, 1] = bad
    with pytest.raises(UserError, match=r"non-finite weights \(1.weight\) after step 6: best.pt "
                                        r"not written"):
        checkpoints.save_run(best, {"iter_num": 6}, net)
    assert open(best, "rb").read() == kept                             # the good file unchanged
    epoch = checkpoints.epoch_path(str(tmp_path), 2)
    with pytest.raises(UserError, match=r"\(1.weight\) after step 6: epoch_2.pt not written"):
        checkpoints.save_run(epoch, {"iter_num": 6}, net)
    assert sorted(os.listdir(tmp_path)) == ["best.pt"]                 # no new file, no temp file

# -----------------------------------------------------------------------------
# 6. the fixed checker's numbers: a '-' right after ')' or ']' is no minus sign


@pytest.mark.parametrize("text,number", [
    ("She ends with (2)-1", "1"),
    ("She ends with [2]-1", "1"),
    ("She ends with 2-1", "1"),                       # after a digit (a word character): no sign
    ("She ends with x -1", "-1"),                     # after a space: a sign
    ("She ends with (2) -1", "-1"),
    ("She ends with (-1)", "-1"),                     # after '(': a sign
    ("She ends with (2)-.5", "0.5"),
    ("She ends with x -.5", "-0.5"),
])
def test_fixed_number_finder_reads_no_minus_sign_after_a_closing_bracket(text, number):
    assert evaluate.extract_number(text) == number
    # the fixed checker's verdict on a numeric answer rests on that number
    assert evaluate.latro_correct("gsm8k", text, {"answer": number}, checker="fixed")
    other = number[1:] if number.startswith("-") else "-" + number
    assert not evaluate.latro_correct("gsm8k", text, {"answer": other}, checker="fixed")

# -----------------------------------------------------------------------------
# 7. the released checker scores every numeric answer (not only GSM8K's), never a text answer


@pytest.mark.parametrize("output,gold,released,fixed", [
    # "The answer is" with no number after it: released falls back to the output's last number,
    # fixed has no answer
    ("3 - 1 = 2, 2 + 1 = 3. The answer is", "3", True, False),
    # the released delimiter is case-sensitive: its last number; fixed: the first after it
    ("the answer is 1. Check: 1 + 2 = 3", "3", True, False),
    ("the answer is 1. Check: 1 + 2 = 3", "1", False, True),
    # released drops every comma: "1,2" reads 12; fixed reads 1
    ("The answer is 1,2.", "12", True, False),
    ("The answer is 1,2.", "1", False, True),
])
@pytest.mark.parametrize("task", ["gsm8k", "modsum"])
def test_released_checker_scores_numeric_answers_of_every_task(task, output, gold, released,
                                                               fixed):
    ex = {"question": "2 + 1 - 0 mod 5?", "steps": [], "answer": gold}
    assert evaluate.latro_correct(task, output, ex, checker="released") is released
    assert evaluate.latro_correct(task, output, ex, checker="fixed") is fixed
    assert evaluate.majority_correct(task, [output], ex, "released") is released


@pytest.mark.parametrize("checker", evaluate.CHECKERS)
def test_released_checker_leaves_text_answers_to_the_text_comparison(checker):
    # multiplication's answers are digit strings ("1 3 9 4"), never one number: both checkers
    # compare the text after "The answer is"; read as numbers, "4 9 3 1" would match (4 == 4)
    ex = {"question": "7 3 1 * 2 0 0 0", "steps": [], "answer": "1 3 9 4"}
    assert evaluate.latro_correct("multiplication", "The answer is 1 3 9 4.", ex, checker=checker)
    assert not evaluate.latro_correct("multiplication", "The answer is 4 9 3 1.", ex,
                                      checker=checker)
    assert not evaluate.latro_correct("multiplication", "So 1 3 9 4", ex, checker=checker)

# -----------------------------------------------------------------------------
# 8. the seed range [0, 2**32)


@pytest.mark.parametrize("seed,ok", [(0, True), (2**32 - 1, True), (2**32, False), (-1, False)])
def test_seed_range_is_0_to_2_to_the_32(seed, ok):
    import latro
    # latro.py's configuration (the keys check_system reads) with this seed
    cfg = configurator.configure(dict(vars(latro)), [], verbose=False)
    c = types.SimpleNamespace(**{**cfg, "device": "cpu", "seed": seed, "fsdp": False,
                                 "wandb_log": False})
    if ok:
        configurator.check_system(c, "latro.py", False)
    else:
        with pytest.raises(ConfigError, match=rf"seed={seed}: give a seed in \[0, 2\*\*32\)"):
            configurator.check_system(c, "latro.py", False)

# -----------------------------------------------------------------------------
# 12. GSM8k-Aug lines end at \n, \r\n and a lone \r (as readlines() cuts them), not at U+2028

AUG = ["Tom has 3 apples and buys 4.||<<3+4=7>> #### 7",
       "Ann has 2 pens and buys 5 more.||<<2+5=7>> <<7*1=7>> #### 7",
       "Bo had 9 and lost 1.||<<9-1=8>> #### 8"]


@pytest.mark.parametrize("end", ["\r", "\r\n"])
def test_gsm8k_aug_lines_end_at_a_lone_carriage_return_as_at_a_newline(tmp_path, end):
    unix, other = tmp_path / "unix.txt", tmp_path / "other.txt"
    unix.write_bytes("\n".join(AUG).encode() + b"\n")
    other.write_bytes(end.join(AUG).encode() + end.encode())
    want = loaders.load_gsm8k_aug(str(unix))
    assert [ex["answer"] for ex in want] == ["7", "7", "8"]
    assert want[1]["steps"] == ["<<2+5=7>>", "<<7*1=7>>"]
    assert loaders.load_gsm8k_aug(str(other)) == want


def test_gsm8k_aug_lines_do_not_end_at_a_line_separator(tmp_path):
    # U+2028 ends a line for str.splitlines(), not for readlines(): one question holds it
    path = tmp_path / "ls.txt"
    path.write_bytes(("Tom has 3 apples\u2028and buys 4.||<<3+4=7>> #### 7\n" + AUG[2])
                     .encode())
    got = loaders.load_gsm8k_aug(str(path))
    assert [ex["question"] for ex in got] == ["Tom has 3 apples\u2028and buys 4.",
                                              "Bo had 9 and lost 1."]

# -----------------------------------------------------------------------------
# 13. UTF-16 is refused as UTF-16 in either byte order


@pytest.mark.parametrize("raw,message", [
    (b"\xfe\xff" + "\n".join(AUG).encode("utf-16-be"), "is UTF-16 text: save it as UTF-8"),
    (b"\xff\xfe" + "\n".join(AUG).encode("utf-16-le"), "is UTF-16 text: save it as UTF-8"),
    ("\n".join(AUG).encode("latin-1") + b"\xe9", r"is not UTF-8 text \(byte 145\)"),
])
def test_a_utf16_file_is_refused_as_utf16_in_either_byte_order(tmp_path, raw, message):
    path = tmp_path / "train.txt"
    path.write_bytes(raw)
    with pytest.raises(UserError, match=message):
        loaders.read_text(str(path))
    with pytest.raises(UserError, match=message):
        loaders.load_gsm8k_aug(str(path))
    path.write_bytes("\n".join(AUG).encode("utf-8"))                  # UTF-8: read
    assert len(loaders.load_gsm8k_aug(str(path))) == 3

# -----------------------------------------------------------------------------
# 14. the 8-shot prompt's questions: refused in val and in test, fine in train


@pytest.mark.parametrize("where", ["train", "val", "test"])
def test_an_8_shot_question_is_refused_in_val_and_test_only(where):
    shot = {"question": GSM8K_SHOTS[0][0], "steps": [], "answer": GSM8K_SHOTS[0][2]}
    other = {"question": "How many pens are left?", "steps": [], "answer": "3"}
    splits = {s: [other] for s in ("train", "val", "test")}
    splits[where] = [other, shot]
    if where == "train":
        data.check_shots_unseen(splits)
    else:
        with pytest.raises(UserError, match=rf"the {where} split holds 1 question.s. of the "
                                            rf"8-shot prompt.*data whose {where} split"):
            data.check_shots_unseen(splits)

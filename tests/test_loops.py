"""The paths that run only inside the training loops or at their edges, each held against an
independent computation (by hand, batch 1, or a second code path) rather than against the same run:
marker rows, gradient accumulation under DDP, best.pt across a resume, the validation loss, LaTRO's
answer term and answer tokens, the evaluation's answer likelihood, the warm-up loss, the rollout's
early stop with a real SentencePiece tokenizer, the strict ARC check."""
import os
import re
import subprocess
import sys
import types

import pytest
import torch

import formats
import latro
import metrics
from coconut import Coconut, Curriculum, collate, layout
from evaluate import arc_extract
from inprocess import COCONUT_TINY, run_main
from metrics import Decoding, validation_loss
from model import Sampler, load_model, sample
from vocab import Tokenizer, build_tokenizer, marker_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TINY = COCONUT_TINY + ["--learning_rate=0.01", "--epochs_per_stage=1"]


def tiny(vocab, seed=0, sharpen=8.0):
    """A 1-layer GPT-2 from scratch whose larger weights make greedy decoding vary."""
    torch.manual_seed(seed)
    m = load_model("scratch", vocab, n_layer=1, n_head=2, n_embd=32, block_size=128)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(sharpen if p.dim() > 1 else 1.0)
    return m.eval()


def logp_of(m, prefix, target):
    """Σ_t log p(target_t | prefix, target_<t): one batch-1 forward, no padding, full vocabulary."""
    logp = m(torch.tensor([prefix + target])).logits[0, :-1].log_softmax(-1)
    return sum(logp[len(prefix) - 1 + t, tok] for t, tok in enumerate(target))


def steps_and_losses(stdout):
    return {int(l.split()[1].split("/")[0]): float(l.split("| loss ")[1].split()[0])
            for l in stdout.splitlines() if l.startswith("step ")}


# ---- Coconut ---------------------------------------------------------------------------------

def test_marker_rows_copy_the_double_angle_bracket_when_the_single_one_exists_too():
    # the released choice is '<<' (one GPT-2 token); '<' is only the fallback of vocabularies
    # without it
    tok = build_tokenizer("words", [{"question": "a << b < c.", "steps": [], "answer": "d"}])
    double, single = tok.token_id("<<"), tok.token_id("<")
    assert double != single
    assert marker_source(tok, "auto", "openai-community/gpt2") == double


def test_two_ranks_with_two_micro_steps_each_equal_one_process_with_four(tmp_path):
    # 8 examples per step: one process takes micro-batches 0..3 of 2, rank r takes blocks 2r, 2r+1;
    # gradients are all-reduced on each rank's last micro-step only, and must sum to the same step
    args = TINY + ["--micro_batch_size=2", "--num_epochs=2", "--ddp_timeout=120"]
    one = run_main("coconut.py", args + [f"--out_dir={tmp_path / 'one'}"])
    assert one.code == 0 and "x 4 accumulation x 1 ranks" in one.out, one.out[-2000:]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "coconut.py", *args, f"--out_dir={tmp_path / 'two'}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "x 2 accumulation x 2 ranks" in p.stdout
    assert "ddp: parameters identical on 2 ranks: True" in p.stdout
    a, b = steps_and_losses(one.out), steps_and_losses(p.stdout)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert max(abs(a[k] - b[k]) for k in a) < 1e-4
    wa = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_a_resume_after_best_pt_was_chosen_keeps_the_choice(tmp_path):
    # stages 0, 1, 2, 2, 2: epochs 2-4 are all-latent, best.pt is the first epoch of best val acc
    # among them; stopped after epoch 3 and resumed, the run must make the same choice
    straight = run_main("coconut.py", TINY + ["--num_epochs=5", f"--out_dir={tmp_path / 'a'}"])
    assert straight.code == 0, straight.out[-2000:]
    accs = {int(e): float(a) for e, a in
            re.findall(r"^epoch (\d+) stage \d+ \| val loss \S+ \| val acc (\S+)", straight.out,
                       re.M)}
    want = max((accs[e], -e) for e in (2, 3, 4))                       # the first of the best
    d = tmp_path / "b"
    assert run_main("coconut.py", TINY + ["--num_epochs=4", f"--out_dir={d}"]).code == 0
    resumed = run_main("coconut.py", TINY + ["--num_epochs=5", f"--out_dir={d}",
                                             "--init_from=resume"])
    assert resumed.code == 0, resumed.out[-2000:]
    for out_dir in (tmp_path / "a", d):
        best = torch.load(out_dir / "best.pt", weights_only=True)
        ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
        assert (best["val_acc"], -best["epoch"]) == want
        assert ckpt["best_val_acc"] == want[0]
    # not vacuous: an epoch after the best one did not beat it, so a resume that forgot the best
    # val acc would have chosen it
    assert any(accs[e] <= want[0] for e in range(-want[1] + 1, 5))


def test_the_validation_loss_is_the_mean_per_labelled_token_over_the_split():
    V, PAD, EOS, BOT, LAT, EOT = 30, 0, 1, 27, 28, 29
    m = tiny(V, sharpen=1.0)
    cur = Curriculum("coconut", 1, 2, True, (BOT, LAT, EOT))
    rows = [([5, 6, 7], [[8, 9]], [10, EOS]), ([5], [[8], [9, 11, 12]], [13, 14, 15, EOS]),
            ([6, 7], [], [10, 11, 12, EOS])]
    dec = Decoding(None, LAT, 2, 4, torch.no_grad(), "cpu")             # batches of 2 rows, then 1
    dec.tok = types.SimpleNamespace(pad_id=PAD)
    laid = [layout(*ex, 1, cur) for ex in rows]
    got = validation_loss(Coconut(m, LAT), [collate(laid[i:i + 2], LAT, PAD) for i in (0, 2)], dec)
    # by hand: each row alone, its summed next-token loss over its labelled tokens, then the total
    # over all labelled tokens (batch means would weigh the last batch's single row as much as two)
    total, count = 0.0, 0
    for q, steps, answer in rows:
        prompt, target = layout(q, steps, answer, 1, cur)
        ids = torch.tensor([prompt + target])
        labels = torch.full_like(ids, -100)
        labels[0, len(prompt):] = torch.tensor(target)
        with torch.no_grad():
            total += Coconut(m, LAT)(ids, torch.ones_like(ids), labels).item() * len(target)
        count += len(target)
    assert abs(got - total / count) < 1e-5
    assert len({len(layout(*r, 1, cur)[1]) for r in rows}) == 3         # not vacuous: 3 lengths


# ---- LaTRO -----------------------------------------------------------------------------------

V, PAD, EOS = 40, 0, 1


def latro_rows():
    xs = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    zs = [[14, 15, 16], [], [17, 18], [19, 20, 21, 22]]
    ys = [[20, 21, EOS], [22, EOS], [23, 24, 25, EOS], [26, EOS]]
    return xs, zs, ys


@pytest.mark.parametrize("sft_coef", [0.0, 1.0])
def test_the_update_holds_the_answer_term_exactly_when_sft_coef_is_positive(sft_coef):
    # the gradient latro_backward leaves, over 2 micro-batches, against the surrogate written out
    # row by row: mean(-A log π(z)) + sft_coef mean(-log π(y | x, z))
    m = tiny(V)
    xs, zs, ys = latro_rows()
    adv = torch.tensor([0.5, -1.0, 2.0, -1.5])
    m.zero_grad()
    loss = latro.latro_backward(latro.SequenceScorer(m), (xs, zs, ys), adv, sft_coef, 2, PAD,
                                torch.enable_grad(), "cpu")
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    want = sum(-adv[i] * logp_of(m, xs[i], zs[i]) - sft_coef * logp_of(m, xs[i] + zs[i], ys[i])
               for i in range(4)) / 4
    want.backward()
    assert abs(loss - want.item()) < 1e-4
    assert all(torch.allclose(a, b.grad, atol=1e-5) for a, b in zip(got, m.parameters()))
    # the answer term moves the gradient: it is really in (1.0) or really out (0.0)
    m.zero_grad()
    (sum(-adv[i] * logp_of(m, xs[i], zs[i]) for i in range(4)) / 4).backward()
    without = [p.grad.clone() for p in m.parameters()]
    same = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, without))
    assert same == (sft_coef == 0)


def chat_words():
    """A word-level tokenizer with a chat template whose turns end with <|end|>, not <eos>."""
    tok = Tokenizer.from_words(["The answer is 1 2 3 4 5 a b c ."])
    tok.add_special_tokens(["<|user|>", "<|assistant|>", "<|end|>"])
    tok.hf.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>"
                            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


def test_the_answer_ends_with_the_end_of_turn_token_and_the_reward_covers_it():
    tok = chat_words()
    eot = tok.token_id("<|end|>")
    assert tok.end_of_turn_id == eot != tok.eos_id
    (y,) = formats.encode_answers(tok, [{"answer": "3"}])
    assert y == tok.encode("The answer is 3.") + [eot]                   # as released
    m = tiny(len(tok))
    x, z = tok.encode("a b c"), tok.encode("1 2")
    with torch.no_grad():
        _, logp_y = latro.score_rows(latro.SequenceScorer(m), [x], [z], [y], tok.pad_id, 1,
                                     torch.no_grad())
        assert abs(logp_y.item() - logp_of(m, x + z, y).item()) < 1e-4
        assert abs(logp_y.item() - logp_of(m, x + z, y[:-1]).item()) > 1e-3  # eot is scored


def test_the_evaluation_scores_the_answer_after_the_output_cut_at_its_stop():
    tok = Tokenizer.from_words(["The answer is 1 2 3 4 5 6 7 8 9 0 a b c d e f g h . "
                                "Let's think step by step."])
    m = tiny(len(tok), seed=3)
    examples = [{"question": "a b", "answer": "3", "steps": []},
                {"question": "c d e", "answer": "7", "steps": []}]
    ev = metrics.Evaluation(task="json", style="cot", arc_options="released", checker="released",
                            stop_strings=[], max_new_tokens=8, seed=0,
                            sampler=Sampler(tok, {tok.eos_id, tok.end_of_turn_id}, [], tok.pad_id,
                                            2, torch.no_grad()),
                            score=lambda m, *rows, **kw: latro.score_rows(
                                latro.SequenceScorer(m), *rows, **kw))
    xs = formats.encode_prompts(tok, examples, "json", "released", "cot")
    outs, _, _ = sample(m, xs, 8, ev.sampler)
    # a stop string that the first greedy output holds after its first token
    stop = tok.decode(outs[0][2:3])
    ev.stop_strings = [stop]
    got = metrics.split_metrics(m, m, examples, 0, ev)["answer_logp"]
    want = 0.0
    for x, out, ex in zip(xs, outs, examples):  # by hand: decode, cut before the stop, score y
        ids = [t for t in out if t not in (tok.eos_id, tok.pad_id)]
        cut = next((k for k in range(len(ids) + 1) if stop in tok.decode(ids[:k + 1])), len(ids))
        y = formats.encode_answers(tok, [ex])[0]
        want += logp_of(m, x + ids[:cut], y).item()
    assert abs(got - want / 2) < 1e-4
    assert stop in tok.decode(outs[0])                                   # not vacuous


def test_the_warm_up_loss_is_the_mean_per_token_over_the_share():
    m = tiny(V)
    xs, zs, ys = latro_rows()
    m.zero_grad()
    loss = latro.sft_loss_backward(latro.SequenceScorer(m), (xs, zs, ys), 3, PAD,
                                   torch.enable_grad(), "cpu")             # micro-batches 3 + 1
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    n_tok = sum(len(z) + len(y) for z, y in zip(zs, ys))
    want = -sum(logp_of(m, x, z + y) for x, z, y in zip(xs, zs, ys)) / n_tok
    want.backward()
    assert abs(loss - want.item()) < 1e-4
    assert all(torch.allclose(a, b.grad, atol=1e-5) for a, b in zip(got, m.parameters()))


class Scripted(torch.nn.Module):
    """A causal LM stand-in that writes a fixed continuation, one token per forward, and counts
    its forwards; enough of the transformers interface for model.generate."""
    def __init__(self, continuation, vocab):
        super().__init__()
        self.continuation, self.vocab, self.calls = continuation, vocab, 0
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, past_key_values=None, **kwargs):
        done = attention_mask.shape[1] - self.prompt_len                # tokens generated so far
        self.calls += 1
        logits = torch.full((input_ids.shape[0], 1, self.vocab), -1e9)
        logits[:, :, self.continuation[min(done, len(self.continuation) - 1)]] = 0.0
        return types.SimpleNamespace(logits=logits, past_key_values=past_key_values)


def test_the_rollout_stops_at_the_step_its_text_completes_a_stop_phrase(tmp_path):
    # Mistral's SentencePiece model: after a newline "The" is its own piece, so only the decoded
    # text shows the stop; generation must end on the very token that completes it
    from test_tokenizers import load, package_data
    name = "mistral_instruct_tokenizer_240323.model.v3"
    tok = load(tmp_path, [(os.path.join(package_data("mistral_common"), name),
                           "tokenizer.model")], "LlamaTokenizer")
    text = "She pays 3 x 6 = 18 dollars.\nThe answer is 18. More text follows here and on."
    ids = tok.encode(text)
    complete = next(k for k in range(1, len(ids) + 1) if "The answer is" in tok.decode(ids[:k]))
    model = Scripted(ids, len(tok))
    model.prompt_len = 3
    how = Sampler(tok, {tok.eos_id}, ["The answer is"], tok.pad_id, 1, torch.no_grad())
    outs, stopped, n_decoded = sample(model, [[5, 6, 7]], 40, how)
    assert n_decoded == complete < len(ids)                             # stopped on that token
    assert tok.decode(outs[0]) == "She pays 3 x 6 = 18 dollars.\n" and stopped.tolist() == [True]
    assert model.calls == complete                                      # prefill + complete - 1


# ---- the strict ARC check --------------------------------------------------------------------

def test_a_capital_letter_used_as_a_word_does_not_name_that_option():
    options = [("A", "heat"), ("B", "wind"), ("C", "sound")]
    # "A" is the article here, not option A: the answer names one option, wind
    assert arc_extract("The answer is A gust of wind.", options, strict=True) == "wind"
    assert arc_extract("The answer is I think (B).", options, strict=True) == "wind"
    assert arc_extract("The answer is B", options, strict=True) == "wind"     # a bare label
    assert arc_extract("The answer is A or B.", options, strict=True) is None  # two named

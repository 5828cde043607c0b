"""latro.py: RLOO, truncation at stops, one-pass scoring, rewards, the loss, sampling, and the
script end to end (resume, 2-process DDP, batch arithmetic). CPU, tiny models, no network."""
import copy
import os

import pytest
import torch

import latro
from checkpoints import save_checkpoint
from configurator import RENAMED, ConfigError, UserError, configure
from formats import RELEASED_STOP_STRINGS, parse_stop_strings
from inprocess import run_main
from latro import (SequenceScorer, build_batch, latro_loss, latro_rewards,
                   lr_at, rloo_advantages, score_rows)
from inprocess import check_rules_of
from model import Sampler, cut_at_stop, disable_dropout, load_model, sample
from parallel import rank_prompts, step_indices
from preflight import latro_longest
from run import RESUME_KEYS, SHAPE_KEYS, Run
from vocab import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, PAD, EOS = 40, 0, 1

def tiny(seed=0):
    torch.manual_seed(seed)
    m = load_model("scratch", V, arch="gpt2", n_layer=2, n_head=2, n_embd=32, block_size=64,
                   eos_id=EOS, pad_id=PAD)
    # a random model with small weights repeats one token; sharpen it so sampling varies
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return m.eval()

def rows():
    """Three [x, z, y] rows of different lengths (so the batch has padding), one with an empty
    rationale."""
    xs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    zs = [[14, 15, 16], [], [17, 18]]
    ys = [[20, 21, EOS], [22, EOS], [23, 24, 25, EOS]]
    return xs, zs, ys

def seq_logprob(m, prefix, target):
    """Σ log p(target | prefix) from one batch-1, unpadded, full-vocabulary forward over prefix +
    target."""
    ids = torch.tensor([prefix + target])
    logp = m(ids).logits[0, :-1].log_softmax(-1)
    return sum(logp[len(prefix) - 1 + t, tok].item() for t, tok in enumerate(target))

# ---- RLOO ----------------------------------------------------------------------------------------

def test_rloo_equals_brute_force_leave_one_out():
    torch.manual_seed(0)
    N, K = 3, 5
    r = torch.randn(N * K, dtype=torch.float64)
    want = torch.empty_like(r)
    for i in range(N):
        for k in range(K):
            others = [r[i * K + j].item() for j in range(K) if j != k]
            want[i * K + k] = r[i * K + k] - sum(others) / (K - 1)
    assert torch.allclose(rloo_advantages(r, K), want, atol=1e-12)

def test_rloo_identical_rewards_give_zero_advantages():
    r = torch.tensor([-3.5] * 4 + [-0.25] * 4)
    assert (rloo_advantages(r, 4) == 0).all()

# ---- truncation at the first stop ----------------------------------------------------------------

# A word-level tokenizer with exactly V ids (4 specials + 36 pieces: ":" and "," are pieces), so
# tiny() samples text it can decode
WORDS = ("The answer is so the final Answer: Therefore, bar far x y z a b c d e f g h i j k l "
         "m n o p q r s t u").split()
TOK = Tokenizer.from_words([" ".join(WORDS)])
assert len(TOK) == V

def test_released_stop_strings():
    assert len(RELEASED_STOP_STRINGS) == 18 and len(set(RELEASED_STOP_STRINGS)) == 18
    assert ({" the answer is", "So, the answer is", "Therefore, the answer is", "Answer:"}
            <= set(RELEASED_STOP_STRINGS))
    assert parse_stop_strings("released") == RELEASED_STOP_STRINGS
    assert parse_stop_strings("A|B c|") == ["A", "B c"] and parse_stop_strings("") == []

def test_cut_before_the_first_stop_in_the_text():
    stops, ids = RELEASED_STOP_STRINGS, {TOK.eos_id, TOK.pad_id}
    cases = [  # (text, kept text, stopped)
        ("a b The answer is c", "a b", True),
        ("a b so the answer is c", "a b so", True),           # lowercase phrasing: " the answer is"
        # the whole phrase goes, not only " the answer is"
        ("a Therefore, the answer is b", "a", True),
        ("a Answer: b The answer is c", "a", True),           # the first stop wins
        ("The answer is a", "", True),                        # stop at once: empty rationale
        ("a b c", "a b c", False),                            # no stop: non-stopped
    ]
    for text, kept, stopped in cases:
        n, hit = cut_at_stop(TOK, TOK.encode(text), ids, stops)
        assert (TOK.decode(TOK.encode(text)[:n]), hit) == (kept, stopped), text
    # a stop id ends the text first: a stop string after it does not count; eos first -> cut there
    row = TOK.encode("a b") + [TOK.eos_id] + TOK.encode("The answer is c")
    assert cut_at_stop(TOK, row, ids, stops) == (2, True)
    # a stop starting inside a token cuts before that token ("ar" starts inside "bar")
    assert cut_at_stop(TOK, TOK.encode("a bar b"), ids, ["ar"]) == (1, True)
    assert cut_at_stop(TOK, TOK.encode("a far b"), ids, []) == (3, False)  # stop ids only

# ---- scoring, rewards, KL ------------------------------------------------------------------------

def test_one_pass_scoring_equals_separate_passes():
    """One padded pass over [x, z, y] == log π(z|x) from a pass over [x, z] and log π(y|x,z) from
    another."""
    m = tiny()
    xs, zs, ys = rows()
    with torch.no_grad():
        logp_z, logp_y = SequenceScorer(m)(*build_batch(xs, zs, ys, PAD))
        for i, (x, z, y) in enumerate(zip(xs, zs, ys)):
            assert abs(logp_z[i].item() - (seq_logprob(m, x, z) if z else 0.0)) < 1e-4
            assert abs(logp_y[i].item() - seq_logprob(m, x + z, y)) < 1e-4
    assert logp_z.dtype == torch.float32

def test_reward_covers_exactly_the_answer_tokens():
    """The released code also summed the last rationale token into log π(y|x,z); here it changes the
    sum a lot."""
    m = tiny()
    x, z, y = [5, 6, 7], [14, 15, 16], [20, 21, EOS]
    with torch.no_grad():
        _, logp_y = SequenceScorer(m)(*build_batch([x], [z], [y], PAD))
        exact = seq_logprob(m, x + z, y)
        # answer sum plus log π(z_last | x, z_<last)
        off_by_one = seq_logprob(m, x + z[:-1], z[-1:] + y)
    assert abs(logp_y.item() - exact) < 1e-4
    assert abs(off_by_one - exact) > 0.1

def test_kl_is_exactly_zero_at_step_0():
    """π0 is a copy of the initial policy scored on the same rows: the same computation, bit for
    bit."""
    m = tiny()
    ref = copy.deepcopy(m).requires_grad_(False)
    xs = [x for x in rows()[0] for _ in range(4)]
    ys = [y for y in rows()[2] for _ in range(4)]
    g = torch.Generator().manual_seed(0)
    how = Sampler(TOK, {TOK.eos_id, PAD}, ["b", "c"], PAD, 5, torch.no_grad())
    zs, stopped, _ = sample(m, xs, 10, how, g, temperature=1.0)
    logp_z, logp_y = score_rows(SequenceScorer(m), xs, zs, ys, PAD, 4, torch.no_grad())
    ref_logp_z, _ = score_rows(SequenceScorer(ref), xs, zs, ys, PAD, 4, torch.no_grad())
    rewards, kl = latro_rewards(logp_y, logp_z, ref_logp_z, stopped, 4, 0.05, 2.0, "group")
    assert (kl == 0).all() and sum(map(len, zs)) > 0

def test_non_stopped_penalty_per_group_and_rank_mean():
    raw = torch.tensor([-1.0, -3.0, -2.0, -6.0])  # two groups of K=2
    stopped = torch.tensor([True, False, True, True])
    zero = torch.zeros(4)
    r, _ = latro_rewards(raw, zero, zero, stopped, 2, 0.05, 2.0, "group")
    assert r.tolist() == [-1.0, 2.0 * -2.0, -2.0, -6.0]  # γ × the mean raw reward of its own group
    r, _ = latro_rewards(raw, zero, zero, stopped, 2, 0.05, 2.0, "rank_mean")
    # γ × the mean over the whole batch (released)
    assert r.tolist() == [-1.0, 2.0 * -3.0, -2.0, -6.0]
    r, kl = latro_rewards(raw, torch.tensor([1.0, 0, 0, 0]), zero, stopped.fill_(True), 2, 0.5,
                          2.0, "none")
    assert r.tolist() == [-1.5, -3.0, -2.0, -6.0] and kl.tolist() == [1.0, 0, 0, 0]

# ---- the loss and its gradient -------------------------------------------------------------------

def test_loss_gradient_by_hand_on_sequence_logprobs():
    """d/dlogp_z mean(−A·logp_z) = −A/n ; d/dlogp_y sft_coef·mean(−logp_y) = −sft_coef/n ; A gets no
    gradient."""
    logp_z = torch.tensor([-2.0, -1.0, -4.0], requires_grad=True)
    logp_y = torch.tensor([-0.5, -3.0, -1.0], requires_grad=True)
    adv = torch.tensor([0.5, -1.0, 0.5], requires_grad=True)
    latro_loss(logp_z, logp_y, adv, 0.3).backward()
    assert torch.allclose(logp_z.grad, -adv.detach() / 3)
    assert torch.allclose(logp_y.grad, torch.full((3,), -0.3 / 3))
    assert adv.grad is None

def test_loss_gradient_through_the_model_equals_per_row_sum():
    """The batched one-pass loss gives ∇ = 1/n Σ_i [−A_i ∇log π(z_i|x_i) − c ∇log π(y_i|x_i,z_i)],
    row by row."""
    m = tiny()
    xs, zs, ys = rows()
    adv, c = torch.tensor([0.7, -0.2, -0.5]), 0.5
    lz, ly = SequenceScorer(m)(*build_batch(xs, zs, ys, PAD))
    latro_loss(lz, ly, adv, c).backward()
    batched = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    for i in range(3):
        lz, ly = SequenceScorer(m)(*build_batch(xs[i:i + 1], zs[i:i + 1], ys[i:i + 1], PAD))
        ((-adv[i] * lz - c * ly) / 3).sum().backward()
    for a, b in zip(batched, (p.grad for p in m.parameters())):
        assert torch.allclose(a, b, atol=1e-5)

# ---- sampling ------------------------------------------------------------------------------------

def test_early_stopped_sampling_equals_full_sampling_cut_at_first_stop():
    """A row stops as soon as its decoded tail holds a stop; cutting the full-length samples with
    cut_at_stop gives the same rationales and flags. Stops: an id, one-token and two-token strings,
    one inside a token."""
    m = tiny()
    xs = [x for x in rows()[0] for _ in range(8)]
    how = Sampler(TOK, {TOK.eos_id, PAD}, ["x y", "c", "ar", "so the"], PAD, 4, torch.no_grad())
    early, stopped, n_early = sample(m, xs, 20, how, torch.Generator().manual_seed(0),
                                     temperature=1.0)
    full, stopped_full, n_full = sample(m, xs, 20, how, torch.Generator().manual_seed(0),
                                        early_stop=False, temperature=1.0)
    assert early == full and torch.equal(stopped, stopped_full)
    assert n_early < n_full  # batches did stop early
    assert stopped.any() and not stopped.all() and any(len(z) > 0 for z in early)  # not vacuous

def test_dropout_off_for_pretrained_models():
    # GPT-2 dropout modules and Llama's attention dropout (a float handed to the kernel) are both
    # switched off: two train-mode forwards are then the same function
    for arch in ("gpt2", "llama"):
        m = load_model("scratch", V, arch=arch, n_layer=1, n_head=2, n_embd=32, block_size=32,
                       dropout=0.5)
        ids = torch.randint(4, V, (2, 12))
        m.train()
        assert not torch.equal(m(ids).logits, m(ids).logits)  # dropout is on before
        disable_dropout(m)
        assert torch.equal(m(ids).logits, m(ids).logits)

# ---- batch arithmetic ----------------------------------------------------------------------------

def per_rank(config, world_size):
    """The per-rank counts latro.py takes from the global ones once the config check has passed
    (check_config makes them divide): prompts per rank, rollouts per rank, gradient accumulation
    steps."""
    prompts = config["batch_size"] // world_size
    rollouts = prompts * config["rloo_k"]
    return prompts, rollouts, rollouts // config["micro_batch_size"]

def test_batch_layout_and_its_errors():
    # the released setup: 8 GPUs x 3 prompts x 16, accumulation 12
    released = cfg("--batch_size=24", "--rloo_k=16", "--micro_batch_size=4")
    check_rules_of(latro, released, 8)
    assert per_rank(released, 8) == (3, 48, 12)
    with pytest.raises(ValueError, match="batch_size=6 .* 4 ranks"):
        check_rules_of(latro, cfg("--batch_size=6", "--rloo_k=8", "--micro_batch_size=4"), 4)
    with pytest.raises(ValueError, match="micro_batch_size=5"):
        check_rules_of(latro, cfg("--batch_size=8", "--rloo_k=4", "--micro_batch_size=5"), 1)
    with pytest.raises(ValueError, match="rloo_k=1"):
        check_rules_of(latro, cfg("--batch_size=8", "--rloo_k=1", "--micro_batch_size=4"), 1)

# ---- the script end to end -----------------------------------------------------------------------

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--n_train=64", "--n_val=8", "--n_test=8",
        "--sft_steps=3", "--sft_batch_size=8", "--sft_target_acc=0", "--latro_steps=4",
        "--batch_size=2", "--rloo_k=4", "--micro_batch_size=4", "--max_rationale_tokens=12",
        "--max_new_tokens=16", "--maj_k=2", "--eval_interval=2", "--export_hf=False"]

def run(args):
    """latro.py with args in this process (tests/inprocess.py); the result reads as a finished
    subprocess's (returncode, stdout, stderr)."""
    return run_main("latro.py", args)

def test_bad_batch_arithmetic_fails_before_any_work(tmp_path):
    p = run(TINY + [f"--out_dir={tmp_path}", "--micro_batch_size=3"])
    assert p.returncode != 0
    assert "micro_batch_size=3" in p.stderr and "2 prompts x rloo_k=4 = 8 rollouts" in p.stderr
    # failed before loading data or a model
    assert "data:" not in p.stdout and not os.listdir(tmp_path)

def test_split_overlap_refused_unless_allowed(tmp_path):
    # a val question that is also a training question: refused; allow_split_overlap=True goes on
    # with a warning (here up to the next check: a block_size too small, after the data)
    import json
    import data
    splits = {s: data.load_task("modsum", s, n=16 if s == "train" else 4) for s in data.SPLITS}
    splits["val"][0] = splits["train"][3]
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        (tmp_path / f"d_{name}.json").write_text(json.dumps(splits[split]))
    args = TINY + ["--task=json", f"--data_path={tmp_path / 'd_{split}.json'}", "--block_size=16"]
    p = run(args + [f"--out_dir={tmp_path / 'refused'}"])
    assert p.returncode == 1 and "questions found in two splits (train/val 1)" in p.stderr
    p = run(args + [f"--out_dir={tmp_path / 'allowed'}", "--allow_split_overlap=True"])
    assert "warning: questions found in two splits (train/val 1)" in p.stdout
    assert p.returncode == 1 and "but the model has 16" in p.stderr

# (resume, kills, NaN guards, 2-process DDP and FSDP runs: tests/test_latro_script.py)

@pytest.mark.parametrize("preset", ["config/latro_gsm8k.py", "config/latro_arc.py",
                                    "config/latro_sft_gsm8k.py", "config/latro_sft_arc.py"])
def test_presets_parse_and_divide_on_8_gpus(preset):
    # a preset must only name real keys with the right types, and its batch must split over the 8
    # GPUs it names
    import latro
    from configurator import configure
    cfg = configure(dict(vars(latro)), [preset], verbose=False)
    check_rules_of(latro, cfg, 8)
    prompts, rollouts, accum = per_rank(cfg, 8)
    # the released 8 x 3 prompts, 48 rollouts in 12 micro-steps of 4
    assert (prompts, rollouts, accum) == (3, 48, 12)


def test_sft_baseline_prompts_and_targets():
    # the released SFT baseline: GSM8K trains on the bare question -> solution + 'The answer is N'
    # (no period), and is evaluated with the CoT prompt; ARC trains on the direct-answer prompt,
    # evaluated with the format block
    from formats import ARC_SFT_EVAL_FORMAT, latro_prompt, sft_target
    gsm = {"question": "Q?", "steps": ["2 + 3 = <<2+3=5>>5", "5 x 2 = 10"], "answer": "10"}
    assert latro_prompt(gsm, "gsm8k", style="sft") == "Q?"
    assert (latro_prompt(gsm, "gsm8k", style="sft_eval") == latro_prompt(gsm, "gsm8k")
            == "Q? Let's think step by step.")
    assert sft_target(gsm, "gsm8k") == "2 + 3 = <<2+3=5>>5\n5 x 2 = 10\nThe answer is 10"
    arc = {"question": "Which?", "steps": [], "answer": "wind",
           "options": [("A", "heat"), ("B", "wind")]}
    assert latro_prompt(arc, "arc", style="sft") == ("Which?\nOptions: ['heat', 'wind']\n"
                                                     "Choose one from available options and "
                                                     "return your answer like `The answer is "
                                                     "{final_answer}`.")
    assert (latro_prompt(arc, "arc", style="sft_eval")
            == ARC_SFT_EVAL_FORMAT + "\nQuestion: Which?\nOptions: ['heat', 'wind']\n")
    assert sft_target(arc, "arc") == "The answer is wind."
    with pytest.raises(ValueError, match="prompt style 'zero'"):
        latro_prompt(gsm, "gsm8k", style="zero")


def test_sft_baseline_run_and_bad_names(tmp_path):
    # the SFT-baseline path end to end: one target text per question, epochs -> steps, linear decay,
    # no LaTRO
    p = run(TINY + [f"--out_dir={tmp_path}", "--prompt=sft", "--eval_prompt=sft_eval",
                    "--sft_share=1.0", "--sft_epochs=0.25", "--sft_batch_size=8",
                    "--sft_decay=True", "--latro_steps=0", "--maj_k=0"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "up to 2 steps of 8 (0.25 epochs)" in p.stdout and "SFT baseline | test acc" in p.stdout
    # (a bad checker name: CONFIG_ERRORS below)


# ---- the up-front check, resume refusal, the per-rank prompts and the lr schedule ----------------

def cfg(*args):
    """latro.py's effective configuration for these --key=value arguments (defaults otherwise)."""
    return configure(dict(vars(latro)), list(args), verbose=False)

def test_a_renamed_key_is_refused_with_its_new_name():
    # one vocabulary in both scripts: an old name (--lr) is an error that names the new one
    with pytest.raises(ConfigError, match="'lr' is now called 'learning_rate'"):
        configure(dict(vars(latro)), ["--lr=1e-3"], verbose=False, renamed=RENAMED)
    for old, new in RENAMED.items():
        assert new in cfg() and old not in cfg()
        with pytest.raises(ConfigError, match=f"'{old}' is now called '{new}'"):
            configure(dict(vars(latro)), [f"--{old}=1"], verbose=False, renamed=RENAMED)

CONFIG_ERRORS = [  # (arguments, world size, message): each names the key and what to do
    # the task first
    (["--task=gsm9k", "--arc_options=x"], 1, "task='gsm9k' is unknown; did you mean gsm8k?"),
    (["--arc_options=letters"], 1, "arc_options='letters': use one of 'released', 'lettered'"),
    (["--penalty=grp"], 1, "penalty='grp': use one of 'group', 'rank_mean', 'none'"),
    (["--checker=paper"], 1, "checker='paper': use one of"),
    (["--eval_prompt=zero"], 1, "eval_prompt='zero'"),
    (["--arch=bert"], 1, "arch='bert'"),
    (["--device=tpu"], 1, "device='tpu'"),
    (["--device=cuda"], 1, "this torch sees no CUDA GPU"),
    (["--stop_strings=Released"], 1, "did you mean 'released'?"),
    (["--stop_strings=Answer:| "], 1, "holds a blank stop string"),
    (["--n_train=-5"], 1, "n_train=-5: give a value >= 0 (0 = the task's default size)"),
    (["--n_val=-1"], 1, "n_val=-1"),
    (["--n_test=-1"], 1, "n_test=-1"),
    (["--eval_interval=0"], 1, "eval_interval=0: give a value > 0"),
    (["--sft_eval_interval=0"], 1, "sft_eval_interval=0"),
    (["--gen_batch_size=0"], 1, "gen_batch_size=0"),
    (["--learning_rate=0"], 1, "learning_rate=0.0: give a value > 0"),
    (["--beta=1e400"], 1, "beta=inf: give a finite number"),
    (["--beta=-0.1"], 1, "beta=-0.1: give a value >= 0"),
    (["--latro_steps=-1"], 1, "latro_steps=-1"),
    (["--maj_k=-1"], 1, "maj_k=-1"),
    (["--temperature=0"], 1, "temperature=0.0: greedy rollouts make the K rationales"),
    (["--top_p=0"], 1, "top_p=0.0: use 0 < top_p <= 1"),
    (["--top_p=1.5"], 1, "top_p=1.5"),
    (["--max_rationale_tokens=0"], 1, "max_rationale_tokens=0: LaTRO optimises the rationale"),
    (["--sft_share=0"], 1, "sft_share=0.0"),
    (["--sft_target_acc=45"], 1, "sft_target_acc=45.0: give a value in [0, 1] (an accuracy; 0 = "
                                 "run all sft_steps)"),
    (["--dropout=1"], 1, "dropout=1.0"),
    (["--n_embd=30", "--n_head=4"], 1, "n_embd=30 is not a multiple of n_head=4"),
    (["--sft_steps=0", "--latro_steps=0"], 1, "trains nothing"),
    (["--init_from=resume", "--overwrite=True"], 1, "choose one"),
    (["--fsdp=True"], 1, "fsdp=True shards over the processes of a torchrun launch"),
    (["--sft_batch_size=63"], 2, "sft_batch_size=63 does not split over 2 ranks"),
    (["--batch_size=6"], 4, "batch_size=6 prompts per step do not split over 4 ranks"),
    (["--rloo_k=1"], 1, "rloo_k=1"),
]

@pytest.fixture
def no_cuda(monkeypatch):
    """torch as the checks see it on a machine without a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

def check_config(config, world=1):
    """latro.py's checks (CHOICES, BOUNDS, the shared rules, check_config) on a configuration, as
    a launch of `world` ranks checks them; the per-rank counts the script then uses."""
    check_rules_of(latro, config, world)
    return per_rank(config, world)

@pytest.mark.parametrize("args, world, message", CONFIG_ERRORS,
                         ids=[c[0][0] for c in CONFIG_ERRORS])
def test_check_config_refuses_with_a_message_naming_the_key(args, world, message, no_cuda):
    with pytest.raises(UserError) as e:
        check_config(cfg(*args), world)
    assert message in str(e.value)

def test_check_config_accepts_the_defaults_presets_and_documented_zeros(no_cuda):
    assert check_config(cfg()) == (8, 64, 1)
    assert check_config(cfg("--n_train=0", "--n_val=0", "--maj_k=0", "--beta=0",
                            "--latro_steps=0")) == (8, 64, 1)
    assert check_config(cfg("--stop_strings=", "--penalty=none")) == (8, 64, 1)  # stop ids only
    for preset in ("latro_gsm8k", "latro_arc", "latro_sft_gsm8k", "latro_gsm8k_8b"):
        assert check_config(cfg(f"config/{preset}.py"), 8) == (3, 48, 12)

def test_longest_sequences_count_prompt_rationale_and_answer():
    from transformers import GPT2Config
    from preflight import preflight
    prompts, answers, gold = [[1] * 10, [1] * 4], [[2] * 3, [2] * 9], [([1] * 5, [3] * 20, [2] * 3)]
    # the longest rollout: 4 + 9 answer tokens + max(12, 8) = 25; the gold row 28
    def lengths(*args):
        return tuple(n for n, _, _ in latro_longest(*args))
    assert lengths(prompts, answers, gold, 12, 8) == (25, 28)
    assert lengths(prompts, answers, [], 12, 8) == (25, 0)
    # the evaluation's length counts too
    assert lengths(prompts, answers, [], 8, 12) == (25, 0)
    longest = [(25, "the longest rollout", "lower it"),
               (28, "the longest gold warm-up row", "raise it")]
    assert [what for _, what, _ in latro_longest(prompts, answers, gold, 12, 8)] == [
        "the longest rollout or evaluation (prompt + answer + max(max_rationale_tokens, "
        "max_new_tokens))", "the longest gold warm-up row"]
    with pytest.raises(UserError, match="gold warm-up row needs 28 positions but the model has 27"):
        preflight(GPT2Config(n_positions=27), "cpu", longest=longest)
    with pytest.raises(UserError,
                       match="rollout needs 25 positions but the model has 24: lower it"):
        preflight(GPT2Config(n_positions=24), "cpu", longest=longest)

def check_resume(ckpt, config, tmp_path):
    """What latro.py does on --init_from=resume: its run.Run loads out_dir/ckpt.pt (load_run) and
    checks it with check_same_run on RESUME_KEYS, plus SHAPE_KEYS for a model from scratch
    (writes=False: out_dir is not claimed)."""
    save_checkpoint(str(tmp_path / "ckpt.pt"), ckpt)
    config = {**config, "out_dir": str(tmp_path), "init_from": "resume", "device": "cpu"}
    Run("latro", config, resume_keys=RESUME_KEYS["latro"], scratch_keys=SHAPE_KEYS["latro"],
        writes=False).stop.restore()

def test_resume_refuses_another_scripts_or_another_runs_checkpoint(tmp_path):
    mine = cfg("--task=modsum", "--n_layer=3")
    ok = {"script": "latro", "ref_model": None, "source": "scratch", "config": dict(mine),
          "model": {}, "optimizer": {}}
    check_resume(ok, mine, tmp_path)
    with pytest.raises(UserError,
                       match="ckpt.pt is not a latro.py checkpoint .written by coconut.py"):
        check_resume({**ok, "script": "coconut"}, mine, tmp_path)
    # no script entry, no slot for π0
    with pytest.raises(UserError, match="not a latro.py checkpoint"):
        check_resume({k: v for k, v in ok.items() if k not in ("script", "ref_model")}, mine,
                     tmp_path)
    other = cfg("--task=modsum", "--n_layer=2", "--seed=1")
    with pytest.raises(UserError,
                       match="seed: checkpoint 1337, now 1; n_layer: checkpoint 3, now 2"):
        check_resume(ok, other, tmp_path)
    # a pretrained model's shape comes from the checkpoint's source: the scratch shape keys do not
    # apply
    check_resume({**ok, "source": "gpt2"}, cfg("--task=modsum", "--n_layer=2"), tmp_path)

@pytest.mark.parametrize("world", [2, 4])
def test_rank_prompts_are_disjoint_and_cover_the_single_process_step(world):
    for step in (0, 3, 7):  # 7 x 8 = 56: a step that crosses into the second epoch of 60 questions
        shares = [rank_prompts(step, 8, 60, 5, r, world) for r in range(world)]
        assert all(len(s) == 8 // world for s in shares)
        assert sum(shares, []) == rank_prompts(step, 8, 60, 5, 0, 1) == step_indices(step, 8, 60, 5)
        assert len(set(sum(shares, []))) == 8  # disjoint

def test_lr_follows_the_linear_schedule_exactly():
    # step 0 uses the peak, each step 1/total less, the last step peak/total (never 0: every step
    # learns)
    assert [lr_at(s, 1e-4, 4) for s in range(4)] == pytest.approx([1e-4, 7.5e-5, 5e-5, 2.5e-5],
                                                                   rel=1e-12)
    assert lr_at(0, 3.0, 117) == 3.0 and lr_at(116, 3.0, 117) == pytest.approx(3.0 / 117, rel=1e-12)

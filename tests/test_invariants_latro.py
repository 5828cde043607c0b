"""LaTRO invariants that single-line bugs break: the KL term against a hand computation, one random
stream per sampling chunk, the data order, and real tiny runs (KL exactly 0 at the first step, the
logged lr on the schedule, one step independent of micro_batch_size,
2 DDP ranks x 1 prompt = 1 process x 2 prompts). CPU, tiny models. (Resume with dropout on:
tests/test_latro_script.py.)"""
import os
import re
import subprocess
import sys

import torch

from inprocess import run_main
from checkpoints import load_checkpoint
from latro import SequenceScorer, latro_rewards, rollout_seed, score_rows
from model import Sampler, load_model, sample
from parallel import step_indices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, PAD, EOS = 24, 0, 1


def tiny(seed):
    torch.manual_seed(seed)
    m = load_model("scratch", V, arch="gpt2", n_layer=1, n_head=2, n_embd=16, block_size=32,
                   eos_id=EOS, pad_id=PAD)
    with torch.no_grad():  # sharpen the random weights: two seeds give clearly different models
        for p in m.parameters():
            p.mul_(6.0 if p.dim() > 1 else 1.0)
    return m.eval()


def seq_logprob(m, prefix, target):
    """Σ_t log p(target_t | prefix, target_<t) from one unpadded full-vocabulary forward."""
    logp = m(torch.tensor([prefix + target])).logits[0, :-1].log_softmax(-1)
    return sum(logp[len(prefix) - 1 + t, tok].item() for t, tok in enumerate(target))


class NoStopTokenizer:
    """decode() for sample(): no text ever holds a stop string (the tests use stop ids only)."""
    def decode(self, ids):
        return ""


def test_kl_and_reward_equal_a_hand_computation_when_the_policy_differs_from_pi0():
    """kl_i = log π(z_i|x_i) − log π0(z_i|x_i) and r_i = log π(y_i|x_i,z_i) − β·kl_i, each a sum
    over exactly the rationale (or answer) tokens: checked against unpadded batch-1 forwards of two
    different models, with the rows scored in padded chunks of 2 and 3."""
    policy, ref = tiny(0), tiny(1)
    xs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    zs = [[14, 15, 16], [17], [18, 19]]
    ys = [[20, EOS], [21, EOS], [22, EOS]]
    stopped = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        logp_z, logp_y = score_rows(SequenceScorer(policy), xs, zs, ys, PAD, 2, torch.no_grad())
        ref_z, _ = score_rows(SequenceScorer(ref), xs, zs, ys, PAD, 3, torch.no_grad())
        rewards, kl = latro_rewards(logp_y, logp_z, ref_z, stopped, 3, 0.25, 2.0, "group")
        for i, (x, z, y) in enumerate(zip(xs, zs, ys)):
            want_kl = seq_logprob(policy, x, z) - seq_logprob(ref, x, z)
            want_r = seq_logprob(policy, x + z, y) - 0.25 * want_kl
            assert abs(kl[i].item() - want_kl) < 1e-4 and abs(rewards[i].item() - want_r) < 1e-4
    assert kl.abs().min() > 0.05  # the two models differ on every row: not a vacuous comparison


def test_each_sampling_chunk_draws_its_own_random_stream():
    """Eight copies of one prompt sampled in chunks of 4: the chunks are different draws (one seed
    per chunk), and the same generator seed gives the same rationales again."""
    m = tiny(0)
    prompts = [[5, 6, 7]] * 8
    how = Sampler(NoStopTokenizer(), {EOS, PAD}, [], PAD, 4, torch.no_grad())
    draw = lambda: sample(m, prompts, 12, how, torch.Generator().manual_seed(3), temperature=1.0)[0]
    outs = draw()
    assert outs == draw()
    assert outs[:4] != outs[4:]
    assert len({tuple(o) for o in outs}) > 2  # the model does sample varied rationales


def test_consecutive_steps_take_each_question_once_per_epoch_and_epochs_reshuffle():
    """step_indices: the steps of one epoch partition the questions (a step may straddle two
    epochs), and the next epoch is another order."""
    n = 12
    epoch0 = sum((step_indices(s, 4, n, 7) for s in range(3)), [])
    epoch1 = sum((step_indices(s, 4, n, 7) for s in range(3, 6)), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(n)) and epoch0 != epoch1
    straddle = sum((step_indices(s, 5, n, 7) for s in range(5)), [])  # 25 = 2 epochs + 1 question
    assert sorted(straddle[:12]) == sorted(straddle[12:24]) == list(range(n))


# ---- real tiny runs ---------------------------------------------------------------------------

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--n_train=32", "--n_val=2", "--n_test=2",
        "--sft_steps=0", "--batch_size=2", "--rloo_k=4", "--max_rationale_tokens=8",
        "--max_new_tokens=8", "--maj_k=0", "--eval_interval=100", "--export_hf=False",
        "--device=cpu", "--learning_rate=1e-3"]
STEP = re.compile(r"^step (\d+)/(\d+) \| reward (\S+) \| kl (\S+) \| .* "
                  r"\| loss (\S+) \| lr (\S+) \|", re.M)


def run(args, launcher=None):
    """Run latro.py on TINY + args (in this process, or under a launcher such as torchrun); returns
    the output and its step lines as (step, of, reward, kl, loss, lr)."""
    if launcher is None:
        r = run_main("latro.py", TINY + args)
        assert r.code == 0, (r.error, r.out[-3000:])
        return r.out, STEP.findall(r.out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*launcher, os.path.join(ROOT, "latro.py"), *TINY, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, STEP.findall(p.stdout)


def weights(out_dir):
    return load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["model"]


def test_first_step_kl_is_zero_lr_follows_the_schedule_and_a_step_ignores_micro_batch_size(
        tmp_path):
    """A tiny run of 3 steps, with one micro-batch of 8 rollouts and with 4 micro-batches of 2:
    - the KL to π0 is exactly 0 at the first step (π0 is the initial policy, on the same rows);
    - the logged lr is lr·(1 − (step−1)/latro_steps): linear decay to 0, no warm-up;
    - loss and weights do not depend on micro_batch_size (gradient accumulation averages)."""
    _, one = run([f"--out_dir={tmp_path / 'one'}", "--micro_batch_size=8", "--latro_steps=3"])
    _, four = run([f"--out_dir={tmp_path / 'four'}", "--micro_batch_size=2", "--latro_steps=3"])
    assert [s[:2] for s in one] == [s[:2] for s in four] == [("1", "3"), ("2", "3"), ("3", "3")]
    assert one[0][3] == four[0][3] == "0.0000"
    schedule = [1e-3, float(f"{1e-3 * 2 / 3:.2e}"), float(f"{1e-3 / 3:.2e}")]
    assert [float(s[5]) for s in one] == [float(s[5]) for s in four] == schedule
    close = lambda a, b: abs(float(a) - float(b)) <= 2e-4 + 1e-3 * abs(float(a))
    for a, b in zip(one, four):
        assert close(a[4], b[4]) and close(a[2], b[2]), (a, b)  # the same loss, the same rollouts
    assert any(abs(float(s[4])) > 1e-3 for s in one)  # the loss is not trivially 0
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "four")
    # Adam moves a weight by about lr per step whatever its gradient's scale: a rounding-level
    # difference in a near-zero gradient may flip one move; 3 steps move weights up to 3e-3
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3


def test_two_ranks_with_one_prompt_each_equal_one_process_with_two_prompts(tmp_path):
    """Under DDP each rank takes its own prompts of the global batch: 2 gloo ranks x 1 prompt give
    the weights of 1 process x 2 prompts. Rollouts with top_p=1e-9 (the nucleus keeps only the top
    token: greedy, which the up-front check refuses as temperature=0) do not depend on the rank's
    random stream, and sft_coef=1 gives the answer term a gradient (K identical rollouts have
    zero advantages)."""
    args = ["--top_p=1e-9", "--sft_coef=1", "--micro_batch_size=4", "--latro_steps=2"]
    run(args + [f"--out_dir={tmp_path / 'one'}"])
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    out, _ = run(args + [f"--out_dir={tmp_path / 'two'}"], launcher=torchrun)
    assert "per rank 1 prompts, 4 rollouts" in out
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert diff < 1e-5, diff  # measured: exactly 0; a rank repeating rank 0's prompt: 3e-3


def test_rollout_seed_is_new_at_every_step_and_rank_and_fixed_by_them():
    """The sampler is reseeded each step from (seed, step, rank): no two (step, rank) pairs of a run
    share a stream (a seed that ignored the step would draw the same rationales every step for the
    same prompts), and the same triple always gives the same seed (resume draws the same)."""
    seeds = [rollout_seed(1337, step, rank) for step in range(500) for rank in range(16)]
    assert len(set(seeds)) == len(seeds)
    assert rollout_seed(1337, 7, 3) == seeds[7 * 16 + 3]
    assert rollout_seed(1337, 0, 0) != rollout_seed(7, 0, 0)

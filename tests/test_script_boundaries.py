"""Script-level boundaries of coconut.py and latro.py (issue 33), each held on both sides against
what the runs themselves print, never against a value read back from the code under test:

- preflight's positions check, in both scripts: a run whose longest sequence needs exactly
  block_size positions trains; block_size one less is refused, naming the positions;
- coconut.py's n_thoughts_eval=0 tests with no thought (Q <bot> <eot>), as the thought sweep's row
  for 0 does, not with the final stage's count as -1 does;
- latro.py's SFT warm-up stops at the first evaluation whose val accuracy reaches sft_target_acc,
  equality included, and not before;
- latro.py evaluates the last LaTRO step when eval_interval does not divide latro_steps, and the
  final test names the best of the evaluated steps.

Each test fails when its behaviour is broken by one line (checked by planting the change in a copy
of the tree). Tiny in-process runs (tests/inprocess.py), a few seconds in all.
"""
import re

import pytest

from inprocess import COCONUT_TINY, run_main
from test_latro_script import TINY as LATRO_TINY
from vocab import COCONUT_MARKERS

NEEDS = re.compile(r"(.*) needs (\d+) positions but the model has (\d+)")
STEP_LINE = re.compile(r"^step \d+/\d+ ", re.M)


def positions_boundary(script, args, out_dir):
    """(n, what, run at n positions): the positions the run's longest sequence needs, as preflight's
    refusals name it. A far too small block_size names the first kind of sequence that does not
    fit; that many positions may name a longer kind (latro: the rollout first, then the gold row),
    and so on until none longer is named. The last run is the one at n positions."""
    block, what = 4, None
    for i in range(5):
        r = run_main(script, args + [f"--block_size={block}", f"--out_dir={out_dir}/find{i}"])
        m = NEEDS.search(str(r.error)) if r.error else None
        if not m or int(m[2]) <= block:
            return block, what, r
        assert int(m[3]) == block, str(r.error)
        block, what = int(m[2]), m[1]
    raise AssertionError("preflight named ever longer sequences")


def assert_positions_boundary(script, args, out_dir):
    n, what, at_n = positions_boundary(script, args, out_dir)
    assert what is not None and n > 4
    # exactly n positions: preflight passes and the run trains to its end
    assert at_n.code == 0, str(at_n.error) or at_n.out[-2000:]
    assert STEP_LINE.search(at_n.out), at_n.out[-2000:]
    # one position fewer: refused before any step, naming the same sequence and both numbers
    below = run_main(script, args + [f"--block_size={n - 1}", f"--out_dir={out_dir}/below"])
    assert below.code == 1 and below.error is not None, below.out[-2000:]
    assert f"{what} needs {n} positions but the model has {n - 1}" in str(below.error)
    assert not STEP_LINE.search(below.out), below.out[-2000:]
    return n, what


# -----------------------------------------------------------------------------
# A. preflight's positions boundary, both scripts


# seed 1: the longest sequence is a training row (69 tokens; val rows reach 57). Seed 0: a val row
# at the training layout (65 tokens) is longer than every training row (64): the validation loss
# runs it, so preflight must count it (it once did not, and the validation loss then indexed past
# the position table)
@pytest.mark.parametrize("seed, longest", [(1, "training example"), (0, "val example")])
def test_coconut_preflight_passes_exactly_block_size_positions_and_refuses_one_fewer(
        tmp_path, seed, longest):
    args = COCONUT_TINY + [f"--seed={seed}", "--num_epochs=1"]
    _, what = assert_positions_boundary("coconut.py", args, tmp_path)
    assert what.startswith(longest)


def test_latro_preflight_passes_exactly_block_size_positions_and_refuses_one_fewer(tmp_path):
    args = LATRO_TINY + ["--latro_steps=1", "--sft_steps=1"]
    # the rollout/evaluation is refused first (43 positions), then the gold row, the longest (56)
    first = run_main("latro.py", args + ["--block_size=4", f"--out_dir={tmp_path}/first"])
    assert "the longest rollout or evaluation" in str(first.error)
    n, what = assert_positions_boundary("latro.py", args, tmp_path)
    assert what == "the longest gold warm-up row"
    assert n > int(NEEDS.search(str(first.error))[2])


# -----------------------------------------------------------------------------
# B. coconut.py: n_thoughts_eval=0 is no thought, -1 the final stage's count

# c_thought=2, max_latent_stage=1: the final stage (2) has 2 thoughts, so 0 and -1 differ
COCONUT_TWO = COCONUT_TINY + ["--learning_rate=0.01", "--epochs_per_stage=1", "--c_thought=2"]
TEST_LINE = re.compile(r"^test acc ([\d.]+) \| tokens generated ([\d.]+) ", re.M)
SWEEP_ROW = re.compile(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", re.M)
PROBE_PROMPT = re.compile(r"^--- '(.*)' -> ", re.M)


@pytest.fixture(scope="module")
def coconut_best(tmp_path_factory):
    """best.pt of a tiny run through stages 0, 1 and the final 2 (one epoch each)."""
    out = tmp_path_factory.mktemp("coconut_two")
    r = run_main("coconut.py", COCONUT_TWO + ["--num_epochs=3", f"--out_dir={out}"])
    assert r.code == 0, str(r.error) or r.out[-2000:]
    assert "thoughts 2 |" in r.out
    return out / "best.pt"


def eval_with(best, n_thoughts_eval, out_dir):
    """(test line's (acc, tokens), the sweep's rows {thoughts: (acc, tokens)}, the first test
    prompt as decoded) of an eval-only run from best with --n_thoughts_eval."""
    r = run_main("coconut.py", COCONUT_TWO + [
        "--eval_only=True", f"--init_from={best}", f"--n_thoughts_eval={n_thoughts_eval}",
        "--thoughts_sweep=0,2", "--probe=1", f"--out_dir={out_dir}"])
    assert r.code == 0, str(r.error) or r.out[-2000:]
    (line,) = TEST_LINE.findall(r.out)
    rows = {int(n): (acc, tokens) for n, acc, tokens in SWEEP_ROW.findall(r.out)}
    assert sorted(rows) == [0, 2], r.out[-2000:]
    return line, rows, PROBE_PROMPT.search(r.out)[1]


def test_coconut_n_thoughts_eval_0_tests_with_no_thought_not_the_final_stage_count(coconut_best,
                                                                                   tmp_path):
    bot, latent, eot = (COCONUT_MARKERS[k] for k in ("bot", "latent", "eot"))
    zero, rows, prompt0 = eval_with(coconut_best, 0, tmp_path / "zero")
    final, rows_final, prompt_final = eval_with(coconut_best, -1, tmp_path / "final")
    assert rows == rows_final                             # the same model, the same reference rows
    assert rows[0][1] != rows[2][1]                       # 0 and 2 thoughts generate differently
    # n_thoughts_eval=0: the row for 0 thoughts, accuracy and tokens; prompts Q <bot> <eot>
    assert zero == rows[0]
    assert prompt0.endswith(f"{bot} {eot}") and latent not in prompt0
    # -1: the final stage's 2 thoughts, the row for 2, other tokens than 0's
    assert final == rows[2] and final[1] != zero[1]
    assert prompt_final.endswith(f"{bot} {latent} {latent} {eot}")
    assert prompt_final.replace(f" {latent}", "") == prompt0  # the same question


# -----------------------------------------------------------------------------
# C. latro.py: the warm-up stops at the first evaluation reaching sft_target_acc, equality included

SFT = ["--sft_steps=40", "--sft_eval_interval=5", "--latro_steps=0"]
SFT_LINE = re.compile(r"^sft (\d+)/(\d+) \| val acc ([\d.]+) ", re.M)


def sft_lines(target, out_dir):
    r = run_main("latro.py", LATRO_TINY + SFT + [f"--sft_target_acc={target}",
                                                 f"--out_dir={out_dir}"])
    assert r.code == 0, str(r.error) or r.out[-2000:]
    return [(int(k), int(n), float(a)) for k, n, a in SFT_LINE.findall(r.out)]


def test_latro_sft_warmup_stops_at_the_first_evaluation_reaching_the_target(tmp_path):
    # sft_target_acc=0: every one of the 40 steps, an evaluation each 5
    full = sft_lines(0, tmp_path / "full")
    assert [k for k, _, _ in full] == list(range(0, 41, 5)) and {n for _, n, _ in full} == {40}
    # the first evaluation with a val accuracy above 0 (n_val=8: a multiple of 1/8, printed exactly)
    k, _, acc = next(line for line in full if line[2] > 0)
    assert 0 < k < 40 and acc < 1 and (acc * 8).is_integer(), full
    # the target equal to that accuracy: the warm-up stops there, its last evaluation is step k
    stopped = sft_lines(acc, tmp_path / "equal")
    assert stopped == [line for line in full if line[0] <= k]
    # a target just above it: the warm-up goes on past k
    above = sft_lines(acc + 1e-3, tmp_path / "above")
    assert above[-1][0] > k and above[:len(stopped)] == stopped


# -----------------------------------------------------------------------------
# D. latro.py: the last LaTRO step is evaluated when eval_interval does not divide latro_steps

# a LaTRO learning rate at which val accuracy moves between evaluations (0.125, 0.5, 0, 0)
LATRO_EVAL = LATRO_TINY + ["--sft_steps=60", "--learning_rate=3e-3", "--eval_interval=2"]
EVAL_LINE = re.compile(r"^eval step (\d+) \| val acc ([\d.]+) ", re.M)
AFTER_LINE = re.compile(r"^after LaTRO .*\(weights of step (\d+), best val ([\d.]+)\)$", re.M)


def latro_evals(latro_steps, out_dir):
    r = run_main("latro.py", LATRO_EVAL + [f"--latro_steps={latro_steps}", f"--out_dir={out_dir}"])
    assert r.code == 0, str(r.error) or r.out[-2000:]
    evals = [(int(s), float(a)) for s, a in EVAL_LINE.findall(r.out)]
    (after,) = AFTER_LINE.findall(r.out)
    return evals, (int(after[0]), float(after[1]))


def best_of(evals):
    """The step whose val accuracy is highest, the first of equals (a later one must beat it)."""
    best = evals[0]
    for step, acc in evals[1:]:
        if acc > best[1]:
            best = (step, acc)
    return best


def test_latro_evaluates_the_last_step_when_eval_interval_does_not_divide_latro_steps(tmp_path):
    evals, after = latro_evals(5, tmp_path / "five")
    assert [s for s, _ in evals] == [0, 2, 4, 5]          # every 2 steps, and step 5, the last
    assert after == best_of(evals)                        # the final test names the best of those
    assert len({a for _, a in evals}) > 1                 # (a choice among different accuracies)
    # latro_steps=4: 2 divides it, no step 5 to evaluate
    evals4, after4 = latro_evals(4, tmp_path / "four")
    assert [s for s, _ in evals4] == [0, 2, 4]
    assert after4 == best_of(evals4)

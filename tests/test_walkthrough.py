"""docs/walkthrough.md prints what it says it prints: its ```python blocks, pasted in order at a
Python prompt in the repository root, each give the output in the ```text block that follows them.

The blocks run here as at the prompt: line by line through code.InteractiveConsole, in one
namespace, so a bare expression prints its value and a block that the prompt would refuse (a
compound statement not closed by a blank line) fails here too. Each block's stdout is compared with
its text block line by line: the text with every number taken out must be equal, and the numbers
within NUMBER_TOLERANCE. A failure names the block by its first line and shows expected and got."""
import code
import contextlib
import io
import os
import re
import traceback

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "walkthrough.md")

# integers (counts, ids, columns) must be equal; decimals match when |got - want| <= ABS_TOL +
# REL_TOL * |want|: the page prints 4 decimals, and another CPU or thread count may move the last
# one. A number printed in e-notation (a max abs difference, 4.8e-07) states a bound: it matches
# another when both are below TINY
ABS_TOL, REL_TOL, TINY = 1e-3, 1e-3, 1e-5
NUMBER_TOLERANCE = (f"integers equal, decimals within abs {ABS_TOL} + rel {REL_TOL}, "
                    f"e-notation both below {TINY}")
# a number on its own: not part of a word (e12, r0, c0), a sign only where no word precedes it
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?!\w|\.\d)", re.I)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.S | re.M)


def page_blocks(text):
    """[(code, expected output)]: every ```python block of a page and the ```text block right
    after it (nothing but blank lines between them)."""
    fences = list(FENCE.finditer(text))
    pairs = []
    for i, m in enumerate(fences):
        if m.group(1) != "python":
            continue
        first = m.group(2).split("\n", 1)[0]
        after = fences[i + 1] if i + 1 < len(fences) else None
        if after is None or after.group(1) != "text" or text[m.end():after.start()].strip():
            raise ValueError(f"the block starting {first!r} is not followed by a ```text block")
        pairs.append((m.group(2), after.group(2)))
    return pairs


def first_line(block):
    return block.split("\n", 1)[0]


class Prompt(code.InteractiveConsole):
    """The Python prompt: lines pushed one at a time; errors are kept, not only printed."""
    def __init__(self):
        super().__init__(locals={"__name__": "__console__", "__builtins__": __builtins__})
        self.errors = []

    def showtraceback(self):
        self.errors.append(traceback.format_exc())

    def showsyntaxerror(self, filename=None, **kwargs):
        self.errors.append(traceback.format_exc())


def run_blocks(blocks):
    """Each block's stdout and errors ([(output, [traceback, ...])]), the blocks pasted in order
    at one prompt; a blank line after each block closes a compound statement it ends with."""
    prompt, results = Prompt(), []
    with torch.random.fork_rng(devices=[]):                 # the page seeds torch: not for others
        for block in blocks:
            out, n_errors = io.StringIO(), len(prompt.errors)
            with contextlib.redirect_stdout(out):
                for line in block.rstrip("\n").split("\n") + [""]:
                    prompt.push(line)
            results.append((out.getvalue(), prompt.errors[n_errors:]))
    return results


def numbers_match(want, got):
    a, b = float(want), float(got)
    if not re.search("[.e]", want, re.I):
        return a == b
    if "e" in (want + got).lower():
        return (abs(a) < TINY and abs(b) < TINY) or abs(a - b) <= REL_TOL * abs(a)
    return abs(a - b) <= ABS_TOL + REL_TOL * abs(a)


def lines_match(want, got):
    """Equal with the numbers taken out, and each number within the tolerance."""
    if NUMBER.sub("#", want) != NUMBER.sub("#", got):
        return False
    return all(numbers_match(a, b) for a, b in zip(NUMBER.findall(want), NUMBER.findall(got)))


def output_mismatch(block, want, got):
    """None when the output `got` of `block` matches the page's `want`, else the message."""
    w, g = ([line.rstrip() for line in t.rstrip("\n").split("\n")] for t in (want, got))
    bad = [i for i, (a, b) in enumerate(zip(w, g)) if not lines_match(a, b)]
    if len(w) == len(g) and not bad:
        return None
    where = (f"line {bad[0] + 1} differs:\n  expected: {w[bad[0]]}\n  got:      {g[bad[0]]}"
             if bad else f"{len(w)} lines expected, {len(g)} printed")
    return (f"block {first_line(block)!r}: {where}\n(numbers compared with {NUMBER_TOLERANCE})\n"
            f"--- expected\n{want.rstrip()}\n--- got\n{got.rstrip()}")


def page_mismatches(pairs, results):
    """Every block whose output or errors differ from the page: [message, ...]."""
    out = []
    for (block, want), (got, errors) in zip(pairs, results):
        if errors:
            out.append(f"block {first_line(block)!r} raised:\n" + "\n".join(errors))
        else:
            out.append(output_mismatch(block, want, got))
    return [m for m in out if m]


with open(PAGE, encoding="utf-8") as f:
    PAIRS = page_blocks(f.read())


@pytest.fixture(scope="module")
def page_run():
    """The page's blocks run once, in order, at one prompt."""
    return run_blocks([block for block, _ in PAIRS])


def test_the_page_has_blocks_and_fits_100_columns():
    assert len(PAIRS) >= 10
    for block, want in PAIRS:
        long = [line for line in (block + want).split("\n") if len(line) > 100]
        assert not long, f"block {first_line(block)!r}: lines over 100 characters: {long}"


@pytest.mark.parametrize("i", range(len(PAIRS)),
                         ids=[f"{i}:{first_line(b)[:40]}" for i, (b, _) in enumerate(PAIRS)])
def test_block_prints_what_the_page_shows(page_run, i):
    block, want = PAIRS[i]
    got, errors = page_run[i]
    earlier = [first_line(PAIRS[j][0]) for j in range(i) if page_run[j][1]]
    assert not errors, (f"block {first_line(block)!r} raised (earlier blocks that raised: "
                        f"{earlier}):\n" + "\n".join(errors))
    message = output_mismatch(block, want, got)
    assert message is None, message


def test_a_changed_output_fails_and_a_last_digit_wobble_passes(page_run, tmp_path):
    """The comparison on an edited copy of the page: each text block changed by one number
    (+1) or one word is reported, naming its block; every number moved by 1 in its last printed
    digit is not."""
    with open(PAGE, encoding="utf-8") as f:
        text = f.read()
    results = [(got, []) for got, _ in page_run]
    for k, (block, want) in enumerate(PAIRS):
        m = NUMBER.search(want)
        if m and "e" not in m.group().lower():
            n = m.group()
            more = str(int(n) + 1) if n.lstrip("+-").isdigit() else f"{float(n) + 1:f}"
            edited = want[:m.start()] + more + want[m.end():]
        else:
            edited = want.replace("\n", " changed\n", 1)
        copy = tmp_path / f"walkthrough_{k}.md"
        copy.write_text(text.replace("```text\n" + want, "```text\n" + edited, 1),
                        encoding="utf-8")
        found = page_mismatches(page_blocks(copy.read_text(encoding="utf-8")), results)
        assert len(found) == 1 and repr(first_line(block)) in found[0], (k, found)

    def wobble(m):  # 4 decimals and more: the last one + 1
        s = m.group()
        decimals = len(s.split(".")[1]) if "." in s and "e" not in s.lower() else 0
        return f"{float(s) + 10.0 ** -decimals:.{decimals}f}" if decimals >= 4 else s
    wobbled = [(block, NUMBER.sub(wobble, want)) for block, want in PAIRS]
    assert page_mismatches(wobbled, results) == []


def test_a_changed_function_changes_the_page(monkeypatch):
    """The page's numbers come from the code it calls: with the RLOO baseline taken over all K
    rewards (its own included) instead of the other K-1, the block that prints the advantages no
    longer matches, and no block before it changes."""
    import latro

    def mean_baseline(rewards, rloo_k):
        r = rewards.view(-1, rloo_k)
        return (r - r.mean(1, keepdim=True)).view(-1)
    monkeypatch.setattr(latro, "rloo_advantages", mean_baseline)
    results = run_blocks([block for block, _ in PAIRS])
    bad = [first_line(block) for (block, want), (got, errors) in zip(PAIRS, results)
           if errors or output_mismatch(block, want, got)]
    table = [first_line(block) for block, _ in PAIRS if "adv = rloo_advantages(" in block]
    assert bad[:1] == table, (bad, table)

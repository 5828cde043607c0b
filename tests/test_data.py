"""Tests for data.py, tasks.py, loaders.py, vocab.py and formats.py: generators (ProsQA statistics,
arithmetic, determinism, disjoint splits), tokenizers, loaders."""

import json
import re
import sys
from collections import Counter

import pytest

import data
import formats
import tasks
import vocab
from configurator import UserError

# -----------------------------------------------------------------------------
# ProsQA


def parse_fact(sentence):
    """'Tom is a terpus.' / 'Every terpus is a brimpus.' / 'p0 > c3.' -> (parent, child)."""
    m = re.fullmatch(r"(?:Every )?(\w+) is a (\w+)\.|(\w+) > (\w+)\.", sentence)
    assert m, f"not a ProsQA fact: {sentence!r}"
    return (m[1], m[2]) if m[1] else (m[3], m[4])


def parse_prosqa(ex):
    """The graph and the query as the text states them (not the metadata), so the text itself is
    checked."""
    sentences = re.split(r"(?<=[.?])\s+", ex["question"])
    *facts, query = sentences
    m = re.fullmatch(r"Is (\w+) a (\w+) or (\w+)\?|(\w+) > (\w+) or (\w+)\?", query)
    assert m, f"bad query {query!r}"
    entity, c1, c2 = (m[1], m[2], m[3]) if m[1] else (m[4], m[5], m[6])
    return [parse_fact(f) for f in facts], entity, {c1, c2}


def reachable(edges, src):
    children = {}
    for u, v in edges:
        children.setdefault(u, []).append(v)
    seen, stack = {src}, [src]
    while stack:
        for v in children.get(stack.pop(), []):
            if v not in seen:
                seen.add(v)
                stack.append(v)
    return seen


def check_prosqa_example(ex):
    """Every invariant one example must satisfy; returns (nodes, edges, hops, persons) for the
    statistics."""
    edges, entity, pair = parse_prosqa(ex)
    assert len(set(edges)) == len(edges), "a fact is stated twice"
    # the metadata describes the same graph as the text
    name = ex["idx_to_symbol"]
    assert sorted((name[u], name[v]) for u, v in ex["edges"]) == sorted(edges)
    target, neg = name[ex["target"]], name[ex["neg_target"]]
    assert name[ex["root"]] == entity and pair == {target, neg}
    # the gold path: a chain of stated facts from the entity to A, one step per hop, and it is a
    # shortest one
    path = [parse_fact(s) for s in ex["steps"]]
    assert path[0][0] == entity and path[-1][1] == target
    assert all(a[1] == b[0] for a, b in zip(path, path[1:])), "steps do not form a path"
    assert all(e in edges for e in path), "a step is not a fact of the question"
    assert ex["answer"] in (f"{entity} is a {target}.", f"{entity} > {target}.")
    frontier = {entity}
    for _ in range(len(path) - 1):   # A must not be reachable in fewer hops
        frontier = {v for u, v in edges if u in frontier}
        assert target not in frontier, "the gold path is not a shortest path"
    # the distractor B is unreachable from the entity but reachable from another person
    assert target in reachable(edges, entity) and neg not in reachable(edges, entity)
    nodes = {u for e in edges for u in e}
    persons = nodes - {v for _, v in edges}
    assert any(neg in reachable(edges, p) for p in persons - {entity})
    return len(nodes), len(edges), len(path), len(persons)


def test_prosqa_matches_released_statistics():
    # Released (spec/tasks.md): 14-28 nodes, mean 23.0; 16-54 edges, mean 36.0; 3-6 hops with test
    # counts 3:202 4:217 5:69 6:12; 2-6 persons. 300 examples: the means' standard errors are ~0.2
    # nodes, ~0.4 edges.
    examples = data.load_task("prosqa", "train", n=300)
    stats = [check_prosqa_example(ex) for ex in examples]
    nodes, edges, hops, persons = zip(*stats)
    assert abs(sum(nodes) / len(nodes) - 23.0) < 1.5
    assert abs(sum(edges) / len(edges) - 36.0) < 3.0
    assert set(hops) == {3, 4, 5, 6}
    released = {3: 202, 4: 217, 5: 69, 6: 12}
    counts = Counter(hops)
    # within ~3.5 standard errors of the released shares (40%, 43%, 14%, 2%)
    for h, c in released.items():
        assert abs(counts[h] / len(hops) - c / 500) < 0.1, (h, counts)
    assert min(persons) >= 2 and max(persons) <= 6
    assert max(nodes) <= 28
    assert all(ex["idx_to_symbol"][0] in tasks.PERSONS for ex in examples)
    # the whole example survives a JSON round trip (the release is JSON) and loads back as it was
    assert json.loads(json.dumps(examples[0])) == examples[0]


@pytest.mark.parametrize("kwargs", [{}, {"symbolic": True},
                                    {"min_nodes": 8, "max_nodes": 9, "max_hops": 3}])
def test_prosqa_small_knobs(kwargs):
    examples = data.load_task("prosqa_small", "train", n=60, **kwargs)
    hops = Counter(check_prosqa_example(ex)[2] for ex in examples)
    assert set(hops) <= set(range(2, kwargs.get("max_hops", 4) + 1)) and len(hops) >= 2
    if kwargs.get("symbolic"):
        assert all(re.fullmatch(r"p\d+ > c\d+\.", s) for ex in examples for s in ex["steps"][:1])
    assert max(len(ex["idx_to_symbol"]) for ex in examples) <= kwargs.get("max_nodes", 12)


def test_prosqa_bad_knob_is_an_error():
    with pytest.raises(UserError, match="hop_weights"):
        data.load_task("prosqa", "val", n=2, hop_weights=(1, 2))
    message = "task 'prosqa' has no option nodes; its options: hop_weights"
    with pytest.raises(UserError, match=message):
        data.load_task("prosqa", "val", n=2, nodes=5)  # a typo must not be ignored
    # prosqa_small passes make_prosqa's options through, so those are known to it
    assert len(data.load_task("prosqa_small", "val", n=1, symbolic=True)) == 1

# -----------------------------------------------------------------------------
# the other generators


def test_multiplication_icot_example_exact():
    ex = tasks.multiplication_example(3719, 3349, 4)
    assert ex["question"] == "9 1 7 3 * 9 4 3 3"
    assert " ".join(ex["steps"]) == ("1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) + 0 0 7 5 1 1 1 "
                                     "( 1 3 9 7 9 2 1 ) + 0 0 0 7 5 1 1 1")
    assert ex["answer"] == "1 3 9 4 5 4 2 1"
    assert len(ex["steps"]) == 4


def from_reversed(digits):
    return int("".join(digits.split())[::-1])


@pytest.mark.parametrize("k", [3, 4, 5])
def test_multiplication_arithmetic(k):
    for ex in data.load_task("multiplication", "train", n=50, digits=k):
        a_text, b_text = ex["question"].split(" * ")
        a, b = from_reversed(a_text), from_reversed(b_text)
        assert (len(a_text.split()) == len(b_text.split()) == k and a >= 10 ** (k - 1)
                and b >= 10 ** (k - 1))
        partials = [from_reversed(re.sub(r"\(.*\)|\+", "", s)) for s in ex["steps"]]
        assert partials == [a * int(d) * 10**i for i, d in enumerate(str(b)[::-1])]
        assert from_reversed(ex["answer"]) == a * b and len(ex["answer"].split()) == 2 * k


def test_modsum_arithmetic():
    for ex in data.load_task("modsum", "train", n=200):
        q = ex["question"]
        assert q.endswith(" mod 5?")
        tokens = q[: -len(" mod 5?")].split()
        value = int(tokens[0])
        assert len(tokens) == 11 and len(ex["steps"]) == 5
        for i, step in enumerate(ex["steps"]):
            op, d = tokens[1 + 2 * i], int(tokens[2 + 2 * i])
            new = (value + d if op == "+" else value - d) % 5
            assert step == f"{value} {op} {d} = {new}"
            value = new
        assert ex["answer"] == str(value)


def test_prontoqa_proof_is_consistent():
    for ex in data.load_task("prontoqa", "train", n=100):
        q, steps = ex["question"], ex["steps"]
        context, query = q.split(" True or false: ")
        facts = set(re.split(r"(?<=\.)\s+", context))
        assert len(steps) == 6
        entity = steps[0].split()[0]
        proof = [s for step in steps for s in re.split(r"(?<=\.)\s+", step)]
        # rules used by the proof are stated in the question; "X is a C" sentences are derived
        # (except the first)
        assert proof[0] in facts and all(s in facts for s in proof[1::2])
        m = re.fullmatch(rf"{entity} is (not )?(\w+)\.", query)
        assert m and proof[-1] in (f"{entity} is {m[2]}.", f"{entity} is not {m[2]}.")
        proved_not = proof[-1].startswith(f"{entity} is not ")
        assert ex["answer"] == ("True" if proved_not == bool(m[1]) else "False")
        # the property word also occurs with the other polarity, so it does not give the answer away
        assert sum(m[2] in f.split(" ")[-1] for f in facts) >= 2


def test_prontoqa_answers_balanced():
    answers = Counter(ex["answer"] for ex in data.load_task("prontoqa", "val", n=200))
    assert 60 < answers["True"] < 140

# -----------------------------------------------------------------------------
# determinism and splits

GENERATED = [("prosqa", {}), ("prosqa_small", {}), ("prontoqa", {}),
             ("multiplication", {"digits": 3}), ("modsum", {})]


@pytest.mark.parametrize("task,kwargs", GENERATED)
def test_generation_is_deterministic_by_seed(task, kwargs):
    a = data.load_task(task, "val", n=20, seed=1, **kwargs)
    b = data.load_task(task, "val", n=20, seed=1, **kwargs)
    c = data.load_task(task, "val", n=20, seed=2, **kwargs)
    assert a == b and a != c


@pytest.mark.parametrize("task,kwargs", GENERATED)
def test_splits_are_disjoint_and_deduplicated(task, kwargs):
    keys = {}
    for split, n in [("train", 200), ("val", 40), ("test", 40)]:
        examples = data.load_task(task, split, n=n, **kwargs)
        assert len(examples) == n
        keys[split] = [tasks.canonical_question(ex["question"]) for ex in examples]
        assert len(set(keys[split])) == n, f"duplicate question within {split}"
    # a different seed gives other questions, but never ones from another split
    other_seed = data.load_task(task, "test", n=40, seed=7, **kwargs)
    keys["test"] += [tasks.canonical_question(ex["question"]) for ex in other_seed]
    assert not set(keys["train"]) & set(keys["val"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["val"]) & set(keys["test"])


def test_reordered_facts_are_the_same_question():
    assert (tasks.canonical_question("B is c. A is b. Is A c?")
            == tasks.canonical_question("A is b. B is c. Is A c?"))


def test_too_small_task_space_is_a_clear_error():
    # 1-digit multiplication has 81 questions; the test bucket holds ~10% of them
    with pytest.raises(UserError, match="too small"):
        data.load_task("multiplication", "test", n=80, digits=1)

# -----------------------------------------------------------------------------
# text formats


def test_coconut_and_latro_text_formats():
    ex = {"question": "Q?", "steps": ["s1", "s2"], "answer": "Tom is a lempus."}
    text = (formats.question_text(ex) + "".join(formats.step_text(s) for s in ex["steps"])
            + formats.answer_text(ex))
    assert text == "Q?\ns1\ns2\n### Tom is a lempus."
    assert formats.latro_prompt(ex, "gsm8k") == "Q? Let's think step by step."
    assert formats.latro_answer("18") == "The answer is 18."
    # one period, not two
    assert formats.latro_answer("Tom is a lempus.") == "The answer is Tom is a lempus."
    arc = {"question": "Which?", "steps": [], "answer": "wind",
           "options": [("A", "heat"), ("B", "wind")]}
    assert formats.latro_prompt(arc, "arc") == ("Question: Which?\nOptions: ['heat', 'wind']\n"
                                             "Let's think step by step first then print your "
                                             "answer like 'The answer is (one of the options)'.")
    assert "Options: (A) heat (B) wind\n" in formats.latro_prompt(arc, "arc",
                                                                  arc_options="lettered")

# -----------------------------------------------------------------------------
# tokenizers


@pytest.mark.parametrize("task,kwargs", GENERATED + [("prosqa_small", {"symbolic": True})])
def test_word_tokenizer_round_trip(task, kwargs):
    examples = data.load_task(task, "train", n=50, **kwargs)
    tok = vocab.build_tokenizer("words", examples)
    for ex in examples:
        coconut = (formats.question_text(ex) + "".join(map(formats.step_text, ex["steps"]))
                   + formats.answer_text(ex))
        latro = formats.latro_prompt(ex, task) + " " + formats.latro_answer(ex["answer"])
        for text in [coconut, latro, formats.latro_rationale(ex)]:
            assert tok.decode(tok.encode(text)) == text


def test_word_pieces():
    # a word-final period is its own token, an inner one is not; "\n" is a token
    assert vocab.split_words("Tom is a terpus.\nLet's 3.5 x?") == ["Tom", "is", "a", "terpus", ".",
                                                                 "\n", "Let's", "3.5", "x", "?"]
    assert vocab.join_words(["a", "b", ".", "\n", "c", "?"]) == "a b.\nc?"


def test_word_tokenizer_special_tokens_and_save_load(tmp_path):
    tok = vocab.Tokenizer.from_words(["Tom is a terpus.", "Every terpus is a brimpus."])
    n = len(tok)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.end_of_turn_id == tok.eos_id
    ids = tok.add_special_tokens(formats.COCONUT_SPECIAL_TOKENS)
    assert ids == list(range(n, n + 3)) and len(tok) == n + 3
    assert [tok.token_id(t) for t in formats.COCONUT_SPECIAL_TOKENS] == ids
    # special tokens are single ids wherever they appear, and decode drops them unless asked
    text = "Tom is a<|start-latent|><|latent|><|latent|><|end-latent|> terpus."
    enc = tok.encode(text)
    assert enc.count(ids[2]) == 2 and ids[0] in enc and ids[1] in enc
    assert tok.decode(enc) == "Tom is a terpus."
    assert "<|latent|>" in tok.decode(enc, skip_special_tokens=False)
    assert tok.chat_prompt("Tom is a terpus.") == [tok.bos_id] + tok.encode("Tom is a terpus.")
    with pytest.raises(ValueError, match="Wren"):
        # a closed vocabulary does not map unknown words to <unk> silently
        tok.encode("Wren is a terpus.")
    with pytest.raises(KeyError):
        tok.token_id("<nope>")
    tok.save_pretrained(tmp_path)
    back = vocab.Tokenizer.from_pretrained(str(tmp_path))
    assert back.is_words and len(back) == len(tok) and back.token_id("<|latent|>") == ids[2]
    assert back.encode(text) == enc and back.decode(enc) == "Tom is a terpus."


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                 "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_hf_tokenizer(tmp_path, template):
    """A small HF tokenizer that is not word-level (WordPiece model), with a chat template we set
    ourselves, built offline and saved with save_pretrained: the path users take with a hub
    tokenizer."""
    from tokenizers import Tokenizer as RustTokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = "<s> </s> <unk> hello world 2 + 3 ? user assistant".split()
    rust = RustTokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    hf.add_tokens(["<|user|>", "<|assistant|>", "<|end|>"], special_tokens=True)
    hf.chat_template = template
    hf.save_pretrained(tmp_path)
    return vocab.Tokenizer.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, CHAT_TEMPLATE.replace("{{ bos_token }}", "")])
def test_pretrained_tokenizer_chat_prompt(tmp_path, template):
    # this tokenizer adds no BOS itself: the prompt has the template's BOS or none
    # (tests/test_tokenizers.py has the layouts of the paper's models)
    tok = make_hf_tokenizer(tmp_path, template)
    assert not tok.is_words
    ids = tok.chat_prompt("hello world")
    bos = "<s>" if "bos_token" in template else ""
    assert ids.count(tok.bos_id) == len(bos) // 3
    assert (tok.decode(ids, skip_special_tokens=False).replace(" ", "")
            == bos + "<|user|>helloworld<|end|><|assistant|>")
    assert tok.end_of_turn_id == tok.token_id("<|end|>") != tok.eos_id
    # no pad token: the released LaTRO rule pads with the unknown token (Mistral's), else eos
    assert tok.pad_id == tok.hf.unk_token_id != tok.eos_id
    ids = tok.add_special_tokens(formats.COCONUT_SPECIAL_TOKENS)
    assert tok.encode("hello<|latent|>world")[1] == ids[2]


def test_build_tokenizer_by_name(tmp_path):
    make_hf_tokenizer(tmp_path, CHAT_TEMPLATE)
    tok = vocab.build_tokenizer(str(tmp_path), examples=[])
    assert tok.encode("hello world") == [tok.token_id("hello"), tok.token_id("world")]

# -----------------------------------------------------------------------------
# loaders


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_json_list_and_jsonl_load_with_extra_keys(tmp_path):
    rows = [{"question": "Is Tom a a or b?", "steps": ["Tom is a a."], "answer": "Tom is a a.",
             "idx_to_symbol": ["Tom", "a", "b"], "edges": [[0, 1]], "root": 0, "target": 1,
             "neg_target": 2},
            {"question": "q2", "answer": "4"}]  # steps may be absent (no-CoT data)
    p1 = write(tmp_path / "d_train.json", json.dumps(rows))
    p2 = write(tmp_path / "d_train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    write(tmp_path / "prosqa_test.json", json.dumps(rows))
    for path in (p1, p2):
        exs = data.load_task("json", "train", path=path)
        assert [ex["question"] for ex in exs] == ["Is Tom a a or b?", "q2"]
        assert exs[0]["edges"] == [[0, 1]] and exs[1]["steps"] == []
    assert len(data.load_task("json", "train", path=p1, n=1)) == 1
    # a generated task name with a path loads the file (the official prosqa_*.json)
    template = str(tmp_path / "prosqa_{split}.json")
    assert data.load_task("prosqa", "test", path=template)[0]["answer"] == "Tom is a a."


@pytest.mark.parametrize("row,problem", [
    ({"steps": [], "answer": "1"}, "missing field 'question'"),
    ({"question": "q", "steps": []}, "missing field 'answer'"),
    ({"question": "q", "steps": [], "answer": 4}, "field 'answer' must be a string, got int"),
    ({"question": "  ", "steps": [], "answer": "4"}, "empty question"),
    ({"question": "q", "steps": "s1", "answer": "4"}, "field 'steps' must be a list of strings"),
    ({"question": "q", "steps": ["s1", 2], "answer": "4"},
     "field 'steps' must be a list of strings"),
    (["q", "a"], "expected an object"),
])
@pytest.mark.parametrize("ext", ["json", "jsonl"])
def test_bad_rows_name_file_row_and_problem(tmp_path, row, problem, ext):
    good = {"question": "q", "steps": [], "answer": "1"}
    rows = [good, good, row]
    text = json.dumps(rows) if ext == "json" else "\n".join(json.dumps(r) for r in rows)
    path = write(tmp_path / f"bad_train.{ext}", text)
    with pytest.raises(UserError) as e:
        data.load_task("json", "train", path=path)
    assert f"bad_train.{ext}: row 3: {problem}" in str(e.value)


def test_bad_json_syntax_and_missing_file(tmp_path):
    path = write(tmp_path / "bad_train.jsonl", '{"question": "q", "answer": "1"}\n{"question": \n')
    with pytest.raises(UserError, match=r"bad_train.jsonl: row 2: invalid JSON"):
        data.load_task("json", "train", path=path)
    with pytest.raises(UserError, match="expected a JSON list"):
        data.load_task("json", "train",
                       path=write(tmp_path / "obj_train.json", '{"question": "q"}'))
    with pytest.raises(FileNotFoundError, match="nope_train.json"):
        data.load_task("json", "train", path=str(tmp_path / "nope_train.json"))
    with pytest.raises(UserError, match="needs path"):
        data.load_task("json", "train")


def test_gsm8k_local_jsonl(tmp_path):
    rows = [{"question": "Tom has 3 apples and buys 4. How many?",
             "answer": "He has 3+4=<<3+4=7>>7.\n#### 7"},
            {"question": "Big?",
             "answer": "Total 1000*2=<<1000*2=2000>>2,000.\nThen add.\n#### 2,000"}]
    path = write(tmp_path / "gsm8k_test.jsonl", "\n".join(json.dumps(r) for r in rows))
    exs = data.load_task("gsm8k", "test", path=path)
    assert exs[0] == {"question": rows[0]["question"], "steps": ["He has 3+4=<<3+4=7>>7."],
                      "answer": "7"}
    assert (exs[1]["steps"] == ["Total 1000*2=<<1000*2=2000>>2,000.", "Then add."]
            and exs[1]["answer"] == "2,000")  # as written: the released y keeps the commas
    bad = write(tmp_path / "g2_test.jsonl",
                json.dumps(rows[0]) + "\n" + json.dumps({"question": "q", "answer": "7"}))
    with pytest.raises(UserError, match=r"g2_test.jsonl: row 2: answer has no '#### <number>'"):
        data.load_task("gsm8k", "test", path=bad)


# iCoT GSM8k-Aug lines, and what the released preprocessing/gsm_icot.py makes of each: question =
# the text before '||' as it is, steps = the text between '||' and the first '##' split on single
# spaces ([''] without an equation), answer = the text after the last '##', commas kept
AUG_LINES = ["Tom has 4 and gives 2 ... ?||<<4-2=2>> <<2/.5=4>> #### 300",
             "No equations here?||#### 1,200",
             "",
             "Q with spaces? || <<1+1=2>> ####  2 ",
             " Lead space.||<<5*1000=5000>> #### 5,000"]
AUG_EXAMPLES = [
    {"question": "Tom has 4 and gives 2 ... ?", "steps": ["<<4-2=2>>", "<<2/.5=4>>"],
     "answer": "300"},
    {"question": "No equations here?", "steps": [""], "answer": "1,200"},
    {"question": "Q with spaces? ", "steps": ["<<1+1=2>>"], "answer": "2"},
    {"question": " Lead space.", "steps": ["<<5*1000=5000>>"], "answer": "5,000"}]


def test_gsm8k_aug_lines_as_the_released_conversion(tmp_path):
    path = write(tmp_path / "train.txt", "\n".join(AUG_LINES) + "\n")
    assert data.load_task("gsm8k_aug", "train", path=path) == AUG_EXAMPLES
    # an empty step is one line of Coconut text, "\n", as the released dataset.py encodes it
    assert formats.step_text("") == "\n"
    bad = write(tmp_path / "bad_train.txt", AUG_LINES[0] + "\nno separator #### 3\n")
    with pytest.raises(UserError, match=r"bad_train.txt: row 2: no '\|\|'"):
        data.load_task("gsm8k_aug", "train", path=bad)
    bad = write(tmp_path / "noanswer_train.txt", "q?||<<1+1=2>>\n")
    with pytest.raises(UserError, match=r"noanswer_train.txt: row 1: no '#### <answer>'"):
        data.load_task("gsm8k_aug", "train", path=bad)
    # lines end where the released text-mode readlines() ends them: \r\n and \r too, but not
    # at the other characters str.splitlines() breaks on (here U+2028 inside a question)
    crlf = write(tmp_path / "crlf_train.txt", "\r\n".join(AUG_LINES) + "\r\n")
    assert data.load_task("gsm8k_aug", "train", path=crlf) == AUG_EXAMPLES
    odd = write(tmp_path / "odd_train.txt", "a\u2028b?||<<1+1=2>> #### 2\n")
    rows = data.load_task("gsm8k_aug", "train", path=odd)
    assert [ex["question"] for ex in rows] == ["a\u2028b?"]


def test_prepare_gsm8k_aug_writes_the_unified_json_the_presets_read(tmp_path, capsys):
    raw = write(tmp_path / "valid.txt", "\n".join(AUG_LINES) + "\n")
    out = tmp_path / "data" / "gsm_valid.json"
    data.main(["prepare", "gsm8k_aug", raw, str(out)])
    assert f"wrote {out}: 4 examples" in capsys.readouterr().out
    # the released json.dump format, and what the GSM8k presets (task=json) load from it
    assert out.read_text() == json.dumps(AUG_EXAMPLES)
    loaded = data.load_task("json", "val", path=str(tmp_path / "data" / "gsm_{split}.json"))
    assert loaded == AUG_EXAMPLES
    with pytest.raises(UserError, match=r"--sizes is for prontoqa"):
        data.main(["prepare", "gsm8k_aug", raw, str(out), "--sizes=2,1"])


def prontoqa_raw(n):
    """A raw ProntoQA file's object (asaparov/prontoqa run_experiment.py, 0-shot): example1 ..
    exampleN in order, each a test_example with 1 to 5 proof sentences."""
    raw = {}
    for i in range(1, n + 1):
        cot = [f"S{i}.{j} is a wumpus." for j in range(1 + i % 5)]
        raw[f"example{i}"] = {"test_example": {
            "question": f"Rex{i} is a wumpus. Wumpuses are hot.",
            "query": f"True or false: Rex{i} is hot.", "chain_of_thought": cot,
            "answer": "True" if i % 2 else "False"}}
    return raw


def test_prepare_prontoqa_as_the_released_conversion(tmp_path, capsys):
    raw = prontoqa_raw(12)
    raw["example3"]["test_example"]["chain_of_thought"][1] += "\n"   # kept as written
    raw_path = write(tmp_path / "5hop_0shot_random.json", json.dumps(raw, indent=1))
    data.main(["prepare", "prontoqa", raw_path, str(tmp_path / "data"), "--sizes", "6,3"])
    assert capsys.readouterr().out.count("wrote ") == 3
    # example 3 by hand: question + " " + query; sentences two at a time, an odd last one alone
    assert data.prontoqa_from_raw(raw_path)[2] == {
        "question": "Rex3 is a wumpus. Wumpuses are hot. True or false: Rex3 is hot.",
        "steps": ["S3.0 is a wumpus. S3.1 is a wumpus.\n", "S3.2 is a wumpus. S3.3 is a wumpus."],
        "answer": "True"}
    expected = []
    for value in raw.values():
        ex = value["test_example"]
        cot = ex["chain_of_thought"]
        expected.append({"question": ex["question"] + " " + ex["query"],
                         "steps": [" ".join(cot[i:i + 2]) for i in range(0, len(cot), 2)],
                         "answer": ex["answer"]})
    # file order, no shuffle: train = the first 6, valid the next 3, test the rest
    for split, part in (("train", expected[:6]), ("valid", expected[6:9]), ("test", expected[9:])):
        text = (tmp_path / "data" / f"prontoqa_{split}.json").read_text()
        assert text == json.dumps(part)                            # the released json.dump format
    # what config/coconut_prontoqa.py reads (data_path=data/prontoqa_{split}.json)
    template = str(tmp_path / "data" / "prontoqa_{split}.json")
    assert data.load_splits("prontoqa", (0, 0, 0), path=template)["test"] == expected[9:]
    assert data.PRONTOQA_SIZES == (9000, 200)                      # released: [:9000], [9000:9200]
    with pytest.raises(UserError, match=r"12 examples, too few for 10 train \+ 2 valid"):
        data.prepare_prontoqa(raw_path, str(tmp_path / "x"), (10, 2))
    with pytest.raises(UserError, match=r"example2: test_example needs 'chain_of_thought'"):
        del raw["example2"]["test_example"]["chain_of_thought"]
        data.prontoqa_from_raw(write(tmp_path / "bad.json", json.dumps(raw)))


def test_prepare_prontoqa_prints_a_question_in_two_splits(tmp_path, capsys):
    raw = prontoqa_raw(12)
    raw["example12"] = raw["example1"]                             # a test question in train
    raw_path = write(tmp_path / "raw.json", json.dumps(raw))
    data.prepare_prontoqa(raw_path, str(tmp_path), (6, 3))
    out = capsys.readouterr().out
    assert "warning: questions found in two splits (train/test 1)" in out
    assert "unless --allow_split_overlap=True" in out


def test_the_quick_look_still_prints_examples(capsys):
    data.main(["modsum", "val", "2"])
    assert capsys.readouterr().out.count('"question"') == 2
    with pytest.raises(UserError, match=r"^usage: python data.py TASK"):
        data.main([])


def test_arc_local_jsonl(tmp_path):
    row = {"id": "x1", "question": "Which form of energy does a fire give off?",
           "choices": {"text": ["heat", "heat and light", "sound", "wind"],
                       "label": ["A", "B", "C", "D"]},
           "answerKey": "B"}
    path = write(tmp_path / "arc_test.jsonl",
                 json.dumps(row) + "\n"
                 + json.dumps({**row, "answerKey": "3",
                               "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}}))
    exs = data.load_task("arc", "test", path=path)
    assert (exs[0]["answer"] == "heat and light" and exs[0]["answer_label"] == "B"
            and exs[0]["steps"] == [])
    assert exs[0]["options"] == [("A", "heat"), ("B", "heat and light"), ("C", "sound"),
                                 ("D", "wind")]
    assert exs[1]["answer"] == "z"
    bad = write(tmp_path / "arc_bad_test.jsonl", json.dumps({**row, "answerKey": "E"}))
    with pytest.raises(UserError, match=r"arc_bad_test.jsonl: row 1: answerKey 'E' is not "
                                        r"one of the labels"):
        data.load_task("arc", "test", path=bad)


def test_load_task_argument_errors():
    with pytest.raises(UserError, match="split"):
        data.load_task("modsum", "dev")
    with pytest.raises(UserError, match="task 'gsm9k' is unknown; did you mean gsm8k?"):
        data.load_task("gsm9k", "train")
    # the task is checked before its options: a typo is not reported as "takes no task options"
    message = "task 'prosqa_smal' is unknown; did you mean prosqa_small?"
    with pytest.raises(UserError, match=message):
        data.load_task("prosqa_smal", "train", symbolic=True)
    with pytest.raises(UserError, match="takes no task options"):
        data.load_task("json", "train", path="x.json", digits=3)
    with pytest.raises(UserError, match=r"n=-5 for the train split: give a count >= 0"):
        data.load_task("modsum", "train", n=-5)


def test_hub_loaders_through_a_fake_datasets_module(monkeypatch, capsys):
    # `datasets` is imported lazily inside the loaders (the GPU machine has none); a stand-in module
    # checks the hub code path here: split names, GSM8K's val carved from the end of train, ARC's
    # validation split.
    import types
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "openai/gsm8k":
            n = 600 if split == "train" else 3
            return [{"question": f"q{i}?",
                     "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(n)]
        return [{"question": "Which?", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                 "answerKey": "B"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    train, val, test = (data.load_task("gsm8k", s) for s in data.SPLITS)
    assert (len(train), len(val), len(test)) == (100, 500, 3)
    assert (train[-1]["question"] == "q99?" and val[0]["question"] == "q100?"
            and test[0]["answer"] == "1")
    assert "no val split" in capsys.readouterr().out  # the carve-out is announced, not silent
    assert data.load_task("arc", "val")[0]["answer"] == "y"
    assert calls[-1] == ("allenai/ai2_arc", "ARC-Challenge", "validation")
    assert [c[2] for c in calls[:3]] == ["train", "train", "test"]

# -----------------------------------------------------------------------------
# no split leakage: which local file serves which split, and the overlap check


def unified_rows(k, prefix="q"):
    return [{"question": f"{prefix}{i}?", "steps": [], "answer": str(i)} for i in range(k)]


def test_one_file_for_every_split_is_refused_unless_a_layout_is_named(tmp_path, capsys):
    path = write(tmp_path / "mydata.jsonl", "\n".join(json.dumps(r) for r in unified_rows(10)))
    for split in data.SPLITS:
        message = (r"mydata.jsonl names no split, and one file for train, val and test would leak "
                   r".*\{split\}.*split_layout='tail:VAL,TEST'")
        with pytest.raises(UserError, match=message):
            data.load_task("json", split, path=path)
    # a file that names another split is refused too (latro passes one data_path for all splits)
    train_file = write(tmp_path / "gsm8k_train.jsonl", "")
    with pytest.raises(UserError, match=r"names the train split, not test"):
        data.load_task("gsm8k", "test", path=train_file)
    # the explicit layout: test = the last 3 rows, val = the 2 before, train = the rest; printed
    got = {s: data.load_task("json", s, path=path, split_layout="tail:2,3") for s in data.SPLITS}
    assert [[ex["question"] for ex in got[s]] for s in data.SPLITS] == [
        ["q0?", "q1?", "q2?", "q3?", "q4?"], ["q5?", "q6?"], ["q7?", "q8?", "q9?"]]
    out = capsys.readouterr().out
    assert "split_layout='tail:2,3': val = rows 6-7 of 10" in out
    assert data.check_split_overlap(got) == {}
    with pytest.raises(UserError, match=r"10 rows, too few for split_layout='tail:4,6'"):
        data.load_task("json", "train", path=path, split_layout="tail:4,6")
    with pytest.raises(UserError, match=r"split_layout='last:5' is not understood"):
        data.load_task("json", "train", path=path, split_layout="last:5")
    with pytest.raises(UserError, match=r"split_layout='tail:1,1' cuts one local file"):
        data.load_task("modsum", "train", split_layout="tail:1,1")


def test_split_template_is_filled_here_and_val_may_be_named_valid(tmp_path):
    for split, name in [("train", "train"), ("val", "valid"), ("test", "test")]:
        write(tmp_path / f"prosqa_{name}.json", json.dumps(unified_rows(2, prefix=split)))
    template = str(tmp_path / "prosqa_{split}.json")
    for split in data.SPLITS:
        # the template, and the path a script filled in itself, give the same file
        name = {"val": "valid"}.get(split, split)
        filled = str(tmp_path / f"prosqa_{name}.json")
        from_template = data.load_task("json", split, path=template)
        assert from_template == data.load_task("json", split, path=filled)
        assert data.load_task("json", split, path=template)[0]["question"] == f"{split}0?"
    with pytest.raises(FileNotFoundError, match=r"val split: tried .*x_valid.json, .*x_val.json"):
        data.load_task("json", "val", path=str(tmp_path / "x_{split}.json"))
    message = r"one file per split \(\{split\}\), so split_layout='tail:1,1'"
    with pytest.raises(UserError, match=message):
        data.load_task("json", "val", path=template, split_layout="tail:1,1")


def test_local_gsm8k_without_a_val_file_gets_the_hubs_rule(tmp_path, capsys):
    def gsm(i):
        return json.dumps({"question": f"q{i}?", "answer": f"#### {i}"})
    write(tmp_path / "gsm8k_train.jsonl", "\n".join(gsm(i) for i in range(520)))
    write(tmp_path / "gsm8k_test.jsonl", "\n".join(gsm(i) for i in range(1000, 1003)))
    template = str(tmp_path / "gsm8k_{split}.jsonl")
    got = {s: data.load_task("gsm8k", s, path=template) for s in data.SPLITS}
    assert [len(got[s]) for s in data.SPLITS] == [20, 500, 3]
    assert got["train"][-1]["answer"] == "19" and got["val"][0]["answer"] == "20"
    assert "no val split in" in capsys.readouterr().out  # announced, not silent
    assert data.check_split_overlap(got) == {}


def test_split_overlap_is_counted_per_pair_and_refused(tmp_path, capsys):
    rows = unified_rows(6)
    # 'B is c. A is b.' is the same question as 'A is b. B is c.': facts in another order
    q1 = {"question": "A is b. B is c. Is A c?", "steps": [], "answer": "yes"}
    q2 = {**q1, "question": "B is c. A is b. Is A c?"}
    splits = {"train": rows[:4] + [q1], "val": rows[3:5], "test": rows[:1] + [q2]}
    message = r"questions found in two splits \(train/val 1, train/test 2\), e.g. 'q3\?'"
    with pytest.raises(UserError, match=message):
        data.check_split_overlap(splits)
    assert data.check_split_overlap(splits, allow_overlap=True) == {("train", "val"): 1,
                                                                   ("train", "test"): 2}
    assert "warning: questions found in two splits" in capsys.readouterr().out
    # ARC: the same question with other options is another question
    a = {"question": "Which?", "steps": [], "answer": "x", "options": [("A", "x"), ("B", "y")]}
    b = {**a, "options": [("A", "x"), ("B", "z")]}
    assert data.check_split_overlap({"train": [a], "test": [b]}) == {}
    # generated tasks are disjoint by construction
    gen = {s: data.load_task("modsum", s, n=50) for s in data.SPLITS}
    assert data.check_split_overlap(gen) == {}


# -----------------------------------------------------------------------------
# kgraph: the held-out heads never start a trained multi-hop question, answers follow the graph

def kgraph_facts(train):
    """(head, relation) -> tail, read from the one-hop facts of the train split only."""
    facts = {}
    for ex in train:
        words = ex["question"].split()
        if len(words) == 3:
            key = (words[0], words[1])
            assert facts.setdefault(key, ex["answer"]) == ex["answer"]  # a function: one tail
    return facts


@pytest.mark.parametrize("kwargs", [{}, {"hops": (2, 3), "entities": 30, "relations": 3,
                                         "held_out": 6, "fact_steps": False, "fact_repeat": 1}])
def test_kgraph_held_out_heads_and_answers(kwargs):
    splits = {s: data.load_task("kgraph", s, **kwargs) for s in data.SPLITS}
    entities, relations = kwargs.get("entities", 200), kwargs.get("relations", 4)
    held_out, hops = kwargs.get("held_out", 40), kwargs.get("hops", (2,))
    facts = kgraph_facts(splits["train"])
    assert len(facts) == entities * relations  # every fact is trained as a one-hop question
    multi = [ex for ex in splits["train"] if len(ex["question"].split()) > 3]
    seen = {ex["question"].split()[0] for ex in multi}
    assert len(seen) == entities - held_out
    held = set()
    for split in ("val", "test"):
        for ex in splits[split]:
            words = ex["question"].split()
            assert words[0] not in seen  # a held-out head
            held.add(words[0])
            # the answer and the steps, composed from the trained facts
            path = [words[0]]
            for r in words[1:-1]:
                path.append(facts[(path[-1], r)])
            assert ex["steps"] == path[1:-1] and ex["answer"] == path[-1]
            assert len(words) - 2 in hops
    assert len(held) == held_out
    # every multi-hop relation sequence of every held-out head, each in exactly one of val / test
    questions = [ex["question"] for s in ("val", "test") for ex in splits[s]]
    assert len(questions) == len(set(questions)) == held_out * sum(relations ** h for h in hops)
    assert not set(questions) & {ex["question"] for ex in splits["train"]}
    for ex in multi:  # the trained multi-hop questions are composed from the same facts
        words = ex["question"].split()
        path = [words[0]]
        for r in words[1:-1]:
            path.append(facts[(path[-1], r)])
        assert ex["steps"] == path[1:-1] and ex["answer"] == path[-1]
    one_hop = [ex for ex in splits["train"] if len(ex["question"].split()) == 3]
    assert len(one_hop) == entities * relations * kwargs.get("fact_repeat", 3)
    fact_steps = kwargs.get("fact_steps", True)
    assert all(ex["steps"] == ([ex["answer"]] if fact_steps else []) for ex in one_hop)
    if len(hops) > 1:  # hop counts interleaved: the first questions of a split mix them
        assert {len(ex["question"].split()) - 2 for ex in splits["test"][:4]} == set(hops)


def test_kgraph_default_sizes_and_seed_independence():
    train, val, test = (data.load_task("kgraph", s) for s in data.SPLITS)
    # 200 entities x 4 relations x 3 repeats + 160 seen heads x 16 two-hop questions; 40 x 16 held
    assert (len(train), len(val), len(test)) == (2400 + 2560, 128, 512)
    assert data.load_task("kgraph", "test", seed=7) == test
    assert data.load_task("kgraph", "test", n=10) == test[:10]
    # no entity is its own neighbour, and the graph does not depend on the held-out count
    f, held = tasks.kgraph_graph()
    assert all(f[r][e] != e for r in range(4) for e in range(200)) and len(held) == 40
    assert tasks.kgraph_graph(held_out=10)[0] == f

"""
Data for nanolatent: every task as one example format, the text each method trains on, and the
tokenizers.

An example is a dict {"question": str, "steps": [str, ...], "answer": str} plus optional metadata.
Coconut trains on question + steps + answer, LaTRO sees only question + answer (its rationales are
latent), and SFT baselines use the steps as the gold rationale.

    examples = load_task("prosqa", "train")   # generated here, no download, deterministic by seed
    examples = load_task("gsm8k", "test")     # hub `openai/gsm8k` through `datasets`
                                              # (imported lazily)
    examples = load_task("json", "train", path="prosqa_{split}.json")  # the official Coconut files
    tok = build_tokenizer("words", examples)  # closed word-level vocabulary, fast for tiny models

Generated tasks (Coconut's ProsQA and ProntoQA, iCoT's multiplication, and "modsum", a toy for
LaTRO) keep their splits disjoint by construction: a question belongs to train, val or test
according to a stable hash of its canonical text, and each split's generator keeps only the
questions of its own bucket. The split a question lands in therefore never depends on the seed or on
the requested sizes.

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
import hashlib
import inspect
import itertools
import json
import math
import os
import random
import re
import sys
import time
import unicodedata
from functools import cached_property

from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as _RustTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from configurator import UserError

# Coconut's three markers by role: <bot> opens the continuous thoughts, <latent> holds one, <eot>
# closes them
COCONUT_MARKERS = {"bot": "<|start-latent|>", "latent": "<|latent|>", "eot": "<|end-latent|>"}
# the order they join a vocabulary, as released (start, end, latent): the ids (GPT-2: 50257, 50258,
# 50259) and the marker rows of existing checkpoints stay as they are
COCONUT_SPECIAL_TOKENS = [COCONUT_MARKERS["bot"], COCONUT_MARKERS["eot"], COCONUT_MARKERS["latent"]]
STEP_BY_STEP = " Let's think step by step."
ARC_INSTRUCTION = ("Let's think step by step first then print your answer like "
                   "'The answer is (one of the options)'.")
# the released SFT baseline's ARC prompts: the training instruction, and the format block its
# evaluation script puts before the question of an SFT checkpoint (prompt texts, kept verbatim so
# the numbers are comparable)
ARC_SFT_INSTRUCTION = ("Choose one from available options and return your answer like "
                       "`The answer is {final_answer}`.")
ARC_SFT_EVAL_FORMAT = """
The output MUST strictly follow the structure and format described below:

1. The answer should be strictly one of the options given in the question
2. Do not include any text after you choose an option.
**Example:**
Question: (question here)
Options: [option1, option2, option3]
The answer is: (one of the options).
"""
PROMPT_STYLES = ("cot", "sft", "sft_eval", "8shot")
# GSM8K's 8-shot evaluation prompt, in the released framing (its own eight examples are not ours):
# "Q: <question>" / "A: <rationale> The answer is <N>." blocks, a blank line between them, then the
# question and the CoT cue
GSM8K_SHOTS = [  # (question, rationale, answer): GSM8K training problems (rows of the first
    # 6,973, never the held-out val tail), the annotations <<...>> removed, one line each
    ('Sally sews 4 shirts on Monday, 3 shirts on Tuesday, and 2 shirts on Wednesday. Each shirt '
     'has 5 buttons. How many buttons does Sally need to sew all the shirts?',
     'Total number of shirts Sally sews is 4 + 3 + 2 = 9 shirts. The total number of buttons she '
     'needs is 9 x 5 = 45 buttons.',
     '45'),
    ('If 3 crows eat 30 worms in one hour, how many worms will 5 crows eat in 2 hours?',
     'If 3 crows eat 30 worms in one hour, then each crow eats 30/3=10 worms per hour. 5 crows '
     'will eat 5*10=50 worms per hour. Over two hours, 5 crows will eat 2*50=100 worms.',
     '100'),
    ('Bill is trying to count the toddlers at his daycare, but they keep running around. He '
     'double-counts 8 toddlers and misses 3 who are hiding. If Bill thinks he counted 26 '
     'toddlers, how many are there really?',
     'First subtract the 8 toddlers Bill double-counted from his count: 26 toddlers - 8 toddlers '
     '= 18 toddlers. Then add the 3 toddlers he missed to find the real count: 18 toddlers + 3 '
     'toddlers = 21 toddlers.',
     '21'),
    ('James buys 6 t-shirts for 50% off. They each cost $20. How much did he pay?',
     'Each shirt cost 20*.5=$10 with the sale. So he paid 10*6=$60.',
     '60'),
    ('Arthur has 3 dogs. They eat an average of 15 pounds of food a week. One dog eats 13 pounds '
     'a week. The second eats double this. How much does the third dog eat a week?',
     'The second dog eats 26 pounds a week because 13 x 2 = 26. In total they eat 45 pounds '
     'because 3 x 15 = 45. The third dog eats 6 pounds a week because 45 - 13 - 26 = 6.',
     '6'),
    ('How many portions of 200 ml milk can Jasmine pour from a full 2-liter container of milk?',
     'Since there are 1000 ml in 1 liter, then 2 liters is equal to 1000 x 2 = 2000 ml. Thus, '
     'Jasmine can pour 2000/200 = 10 portions of 200 ml milk.',
     '10'),
    ('The perimeter of a triangle is 160 cm. If two of the sides are 40 cm and 50 cm, calculate '
     'the length of the third side?',
     'To get the perimeter, you add all the sides o the triangles, so the first two sides add up '
     'to 40+50 = 90 cm. If the perimeter of the triangle is 160, the remaining side is 160-90 = '
     '70 cm.',
     '70'),
    ('An unusual bicycle has 20 spokes on the front wheel and twice as many spokes on the back '
     'wheel. How many spokes does the bicycle have?',
     'The back wheel has double the spokes the front wheel has, which means the back wheel has '
     '20*2=40 spokes. In total, the bicycle has 20+40=60 spokes.',
     '60'),
]
GSM8K_FEW_SHOT = "\n" + "\n\n".join(f"Q: {q}\nA: {r} The answer is {a}."
                                     for q, r, a in GSM8K_SHOTS) + "\n"
SPLITS = ("train", "val", "test")

# -----------------------------------------------------------------------------
# text formats

def question_text(ex):
    """Coconut: the question line, `Q\\n`."""
    return ex["question"] + "\n"


def step_text(step):
    """Coconut: one language reasoning step per line."""
    return step + "\n"


def answer_text(ex):
    """Coconut: `### A` (the script appends eos as a token id, so no tokenizer ever has to spell
    it)."""
    return "### " + ex["answer"]


def arc_options_text(options, style="released"):
    """ARC options in the prompt. released: the Python list of the option texts, as the released
    prompt prints it (`['heat', 'wind']`); lettered: `(A) heat (B) wind` (lets the strict checker
    accept a letter answer)."""
    if style == "released":
        return str([text for _, text in options])
    if style == "lettered":
        return " ".join(f"({label}) {text}" for label, text in options)
    raise ValueError(f"arc_options={style!r}: use 'released' or 'lettered'")


def latro_prompt(ex, task, arc_options="released", style="cot", chat=True):
    """LaTRO: the user turn. style cot: the CoT prompt (ARC: the released multiple-choice template;
    every other task: question + the CoT suffix). sft: the released SFT baseline's training prompt
    (GSM8K: the bare question; ARC: the direct-answer instruction). sft_eval: the prompt the
    released evaluation gives an SFT checkpoint (GSM8K: the CoT prompt; ARC: the output-format
    block, then question and options). 8shot (GSM8K evaluation): eight worked examples first, as
    the released gsm8k_8shot lays them out in a chat turn (chat) or as plain text."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style {style!r}: use one of {PROMPT_STYLES}")
    if style == "8shot":
        cue = STEP_BY_STEP if chat else "\n" + STEP_BY_STEP.strip()
        return GSM8K_FEW_SHOT + "\n" + ex["question"] + cue
    if task == "arc":
        options = arc_options_text(ex["options"], arc_options)
        if style == "sft":
            return f"{ex['question']}\nOptions: {options}\n{ARC_SFT_INSTRUCTION}"
        if style == "sft_eval":
            return f"{ARC_SFT_EVAL_FORMAT}\nQuestion: {ex['question']}\nOptions: {options}\n"
        return f"Question: {ex['question']}\nOptions: {options}\n{ARC_INSTRUCTION}"
    if style == "sft":
        return ex["question"]
    return ex["question"] + STEP_BY_STEP


def sft_target(ex, task):
    """The released SFT baseline's assistant turn (the script appends the end-of-turn id). GSM8K:
    the solution with '####' read as 'The answer is' (no final period); ARC: the direct answer;
    other tasks: the gold steps, then the LaTRO answer sentence."""
    if task == "arc":
        return latro_answer(ex["answer"], task)
    if task == "gsm8k":
        return "\n".join(ex["steps"] + [f"The answer is {ex['answer']}"])
    return "\n".join(ex["steps"] + [latro_answer(ex["answer"])])


def latro_answer(gold, task="", text="released"):
    """LaTRO: the answer y whose likelihood is the reward (the script appends the end-of-turn token
    id). As released for GSM8K and ARC: the gold as written (GSM8K's thousands commas kept, an ARC
    option ending in '.' followed by a second one); text='clean' drops those commas and periods.
    Other tasks: a gold answer that is a sentence ("Tom is a lempus.") keeps one final period."""
    if task in ("gsm8k", "arc") and text == "released":
        return f"The answer is {gold}."
    if task == "gsm8k":
        gold = gold.replace(",", "")
    return f"The answer is {gold.rstrip('.')}."


# LaTRO: the released stop strings (trainer_config.stop_seqs), lowercase and tool-call phrasings.
# They are found in the decoded text: SentencePiece spells "The" after a newline as another piece
# than at the start of an encoded string, so matching the ids of encode(stop) misses it.
RELEASED_STOP_STRINGS = [
    "Answer:", " Answer:", "\nAnswer:",
    "The answer is", " The answer is", "\nThe answer is",
    "The answer is:", " The answer is:", "\nThe answer is:",
    " the answer is", "so the final answer is", "So, the answer is", "Therefore, the answer is",
    "The function call is:", "\nThe function call is:", "The function call is",
    "\nThe function call is", "the function call is",
]


def parse_stop_strings(spec):
    """'released' -> RELEASED_STOP_STRINGS; otherwise '|'-separated strings ('' = stop ids only)."""
    if spec == "released":
        return list(RELEASED_STOP_STRINGS)
    return [s for s in spec.split("|") if s]


def encode_prompts(tok, examples, task, arc_options, style):
    """LaTRO: the prompts x of examples, as token lists in the chat template (if the tokenizer
    has one)."""
    chat = bool(tok.hf.chat_template)
    return [tok.chat_prompt(latro_prompt(ex, task, arc_options, style, chat)) for ex in examples]


def encode_answers(tok, examples, task="", text="released"):
    """The answers y of examples: the tokens of "The answer is {gold}." (data.latro_answer) then
    end-of-turn."""
    return [tok.encode(latro_answer(ex["answer"], task, text)) + [tok.end_of_turn_id]
            for ex in examples]


def gold_rows(tok, examples, task, arc_options, style, answer_y="released"):
    """The warm-up's rows [x, z*, y] as token lists (xs, zs, ys): the prompt, the gold rationale
    (one step per line) and the answer y. The released SFT baseline (style 'sft') trains one target
    text, then end-of-turn."""
    xs = encode_prompts(tok, examples, task, arc_options, style)
    if style == "sft":
        return xs, [tok.encode(sft_target(ex, task)) for ex in examples], [[tok.end_of_turn_id]
                                                                           for _ in examples]
    zs = [tok.encode(latro_rationale(ex)) for ex in examples]
    return xs, zs, encode_answers(tok, examples, task, answer_y)


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


def latro_rationale(ex):
    """SFT warm-up / baseline: the gold rationale, one step per line."""
    return "\n".join(ex["steps"])

# -----------------------------------------------------------------------------
# tokenizers

# Word-level pre-tokenization: "\n" is a token; . , ? ! : ; are tokens when they end a word
# ("terpus." -> "terpus" "."), but stay inside a word ("3.5", "Let's"); everything else splits on
# whitespace.
_WORD_PUNCT = ".,?!:;"
_WORD_PATTERN = r"\n|[.,?!:;](?=[.,?!:;]*(?:\s|$))|[^\s]+?(?=[.,?!:;]*(?:\s|$))"
_WORD_RE = re.compile(_WORD_PATTERN)
_WORD_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def split_words(text):
    """The word tokenizer's pieces, in Python (same regex as the tokenizers pre-tokenizer)."""
    return _WORD_RE.findall(text)


def join_words(words):
    """Inverse of split_words for normally spaced text: no space before punctuation, none around
    newlines."""
    out = []
    for w in words:
        glue = not out or out[-1] == "\n" or w == "\n" or all(c in _WORD_PUNCT for c in w)
        out.append(w if glue else " " + w)
    return "".join(out)


class Tokenizer:
    """One small interface over any Hugging Face tokenizer, the offline word-level one included.

    The word-level tokenizer is a PreTrainedTokenizerFast around a `tokenizers` WordLevel model, so
    it saves and loads with save_pretrained / from_pretrained like any other; only decoding is done
    here (HF would put a space between every pair of words), so that decode(encode(t)) == t for the
    generated task texts.
    """

    def __init__(self, hf):
        self.hf = hf
        self.is_words = isinstance(hf.backend_tokenizer.model, models.WordLevel)

    @classmethod
    def from_pretrained(cls, name_or_path):
        return cls(AutoTokenizer.from_pretrained(name_or_path))

    @classmethod
    def from_words(cls, texts):
        """A closed vocabulary over the words of `texts` (sorted, so the ids do not depend on the
        text order)."""
        words = sorted({w for t in texts for w in split_words(t)})
        vocab = {w: i for i, w in enumerate(
            _WORD_SPECIALS + [w for w in words if w not in _WORD_SPECIALS])}
        rust = _RustTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        # invert=True + "removed": the regex describes the pieces to keep, the whitespace between
        # them is dropped
        rust.pre_tokenizer = pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed",
                                                  invert=True)
        hf = PreTrainedTokenizerFast(tokenizer_object=rust, pad_token="<pad>", bos_token="<bos>",
                                     eos_token="<eos>", unk_token="<unk>")
        return cls(hf)

    def __len__(self):
        return len(self.hf)

    def encode(self, text, add_special_tokens=False):
        # True: BOS etc. as the tokenizer adds
        ids = self.hf.encode(text, add_special_tokens=add_special_tokens)
        if self.is_words and self.hf.unk_token_id in ids:
            # a closed vocabulary must not silently map words to <unk>: say which words are missing
            missing = sorted({w for w in split_words(text) if w not in self.hf.get_vocab()})
            raise ValueError(f"words not in the word-level vocabulary: {missing[:10]}")
        return ids

    def decode(self, ids, skip_special_tokens=True, cleanup=False):
        """The text of ids. cleanup=True (the text an answer checker reads): the clean-up of spaces
        before punctuation that transformers 4.x applied when the tokenizer's config asks for it
        (Llama-3.x's does) and 5.x skips for BPE tokenizers."""
        ids = [int(i) for i in ids]
        if not self.is_words:
            text = self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
            if cleanup and self.hf.init_kwargs.get("clean_up_tokenization_spaces"):
                text = self.hf.clean_up_tokenization(text)
            return text
        special = self.special_ids()
        tokens = self.hf.convert_ids_to_tokens([i for i in ids
                                                if not (skip_special_tokens and i in special)])
        return join_words(tokens)

    def special_ids(self):
        """Ids of all special tokens, including ones added later with add_special_tokens."""
        ids = set(self.hf.all_special_ids)
        ids.update(i for i, t in self.hf.added_tokens_decoder.items() if t.special)
        return ids

    @property
    def eos_id(self):
        return self.hf.eos_token_id

    @cached_property
    def pad_id(self):
        """The tokenizer's pad; without one, what the released LaTRO code set: Llama-3.x's
        <|end_of_text|>, else the unknown token (Mistral's <unk>), else eos."""
        if self.hf.pad_token_id is not None:
            return self.hf.pad_token_id
        end_of_text = self.hf.get_vocab().get("<|end_of_text|>")
        if end_of_text is not None:
            return end_of_text
        if self.hf.unk_token_id is not None:
            return self.hf.unk_token_id
        return self.hf.eos_token_id

    @property
    def bos_id(self):
        return self.hf.bos_token_id

    @cached_property
    def end_of_turn_id(self):
        """The token that closes an assistant turn in the chat template (<|eot_id|>, <|end|>,
        <|im_end|>, ...)."""
        if not self.hf.chat_template:
            return self.eos_id
        marker = "XyzzyReplyMarker"
        text = self.hf.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False)
        tail = text.split(marker, 1)[1] if marker in text else ""
        special = self.special_ids()
        for i in self.hf.encode(tail, add_special_tokens=False):
            if i in special:
                return i
        return self.eos_id

    def add_special_tokens(self, tokens):
        self.hf.add_tokens(list(tokens), special_tokens=True)
        return [self.token_id(t) for t in tokens]

    def token_id(self, token):
        i = self.hf.convert_tokens_to_ids(token)
        if i is None or (i == self.hf.unk_token_id and token != self.hf.unk_token):
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def chat_prompt(self, text):
        """Token ids of a user turn plus the generation prompt, with the BOS tokens the model's own
        chat template and tokenizer give together: the rendered template, encoded with what the
        tokenizer puts before any text (a BOS for Llama and Mistral tokenizers, nothing for those
        without one), and no second BOS when the template wrote one itself (Llama 3.1 and Mistral
        templates do; the released code fed both to the model). Something a tokenizer appends (an
        eos) is not kept: the assistant's turn follows. Word-level vocabularies (scratch models)
        start every prompt with their BOS."""
        if self.is_words:
            return [self.bos_id] + self.encode(text)
        if self.hf.chat_template:
            turn = [{"role": "user", "content": text}]
            text = self.hf.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        ids = self.hf.encode(text, add_special_tokens=False)
        full = self.hf.encode(text, add_special_tokens=True)
        # what the tokenizer put before the text (a BOS or nothing)
        at = next((i for i in range(len(full) - len(ids) + 1) if full[i:i + len(ids)] == ids), 0)
        prefix = full[:at]
        if self.bos_id is not None and prefix[-1:] == [self.bos_id] and ids[:1] == [self.bos_id]:
            prefix = prefix[:-1]
        return prefix + ids

    def save_pretrained(self, path):
        self.hf.save_pretrained(path)


def example_texts(ex):
    """Every string of an example a tokenizer must cover."""
    texts = [ex["question"], ex["answer"], *ex["steps"]]
    if "options" in ex:
        texts += [text for _, text in ex["options"]]
    return texts


def marker_ids(tok):
    """Add the three markers to the tokenizer (in the released vocabulary order); returns their ids
    by role, (<bot>, <latent>, <eot>): the order layout() takes."""
    tok.add_special_tokens(COCONUT_SPECIAL_TOKENS)
    return tuple(tok.token_id(COCONUT_MARKERS[role]) for role in ("bot", "latent", "eot"))


# Coconut: the examples as token pieces, and the three markers' embedding rows

def encode_example(tok, ex):
    """(question, steps, answer + eos) token lists. The question is encoded as the tokenizer encodes
    a text on its own (add_special_tokens=True), as released: GPT-2 and the word vocabulary add no
    BOS, Llama adds one."""
    q = tok.encode(question_text(ex), add_special_tokens=True)
    steps = [tok.encode(step_text(st)) for st in ex["steps"]]
    return q, steps, tok.encode(answer_text(ex)) + [tok.eos_id]


def markers_present(tok, ckpt):
    """Do the weights to load already have marker rows? A checkpoint of coconut.py says so (older
    ones always had them); a save_pretrained export of coconut.py (init_from=out/.../hf) has them
    when its tokenizer does."""
    if ckpt is not None:
        return ckpt.get("markers", True)
    vocab = tok.hf.get_vocab()
    return all(t in vocab for t in COCONUT_SPECIAL_TOKENS)


def marker_source(tok, marker_init, base):
    """The id of the token whose embedding the new markers copy, or None for fresh random rows.
    'auto': '<<' as released (one token in GPT-2's vocabulary), else '<', for pretrained weights;
    None for a model from scratch, whose rows are all random anyway. Fails, naming the key, unless
    the text is one token."""
    texts = [marker_init] if marker_init else []
    if marker_init == "auto":
        texts = [] if base == "scratch" else ["<<", "<"]
    for text in texts:
        try:
            ids = tok.encode(text)
        except ValueError:  # the word vocabulary refuses words it does not have
            ids = []
        if len(ids) == 1:
            return ids[0]
    if texts:
        tried = " / ".join(map(repr, texts))
        raise UserError(f"marker_init={marker_init!r}: {tried} is not exactly one token in this "
                        f"vocabulary; set --marker_init to a text that is one token, or '' for "
                        f"fresh rows")
    return None


def tokenizer_name(name, model, saved=""):
    """The tokenizer a run uses: `name` when set, else the one its checkpoint saved, else the word
    vocabulary for a model from scratch, else the Hugging Face model's own (a hub name or a local
    directory: offline works)."""
    return name or saved or ("words" if model == "scratch" else model)


def build_tokenizer(name, examples):
    """'words': a closed word-level vocabulary over the examples and the fixed templates; else a HF
    tokenizer."""
    if name != "words":
        try:
            return Tokenizer.from_pretrained(name)
        except OSError as e:  # no such directory, not on the hub, or offline and not cached
            raise UserError(f"tokenizer {name!r} cannot be loaded ({str(e).splitlines()[0]}): give "
                            f"a directory with its files, a hub name (offline: one in the cache) "
                            f"or 'words'") from None
    texts = [t for ex in examples for t in example_texts(ex)]
    # the templates the scripts wrap around examples must be in the vocabulary too
    # (LaTRO also stops rationales at "Answer:", so it must be encodable)
    texts += ["\n", "###", STEP_BY_STEP, latro_answer("0"), "Answer:", ARC_INSTRUCTION,
              "Question: Options: (A) (B) (C) (D) (E)"]
    # ARC prompts print the options as a Python list: its pieces ("['heat',") are words too
    texts += [latro_prompt(ex, "arc") for ex in examples if "options" in ex]
    # LaTRO's answer_y='clean' writes GSM8K golds without their thousands commas
    texts += [ex["answer"].replace(",", "") for ex in examples if "," in ex["answer"]]
    return Tokenizer.from_words(texts)

# -----------------------------------------------------------------------------
# disjoint splits for generated tasks

_SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def same_question(question):
    """What two questions have in common when a model sees the same question: the text in Unicode
    NFKC form, case-folded, its white space collapsed, its sentences sorted (canonical_question)."""
    text = unicodedata.normalize("NFKC", question).casefold()
    return canonical_question(" ".join(text.split()))


def canonical_question(question):
    """The question with its sentences sorted: two shufflings of the same facts are the same
    question."""
    return " ".join(sorted(re.split(r"(?<=[.?!])\s+", question.strip())))


def split_of(question):
    """Which split a question belongs to, by a stable hash (independent of seed, sizes and
    PYTHONHASHSEED)."""
    h = int(hashlib.sha1(canonical_question(question).encode()).hexdigest()[:8], 16) / 16**8
    if h < _SPLIT_FRACTIONS["train"]:
        return "train"
    return "val" if h < _SPLIT_FRACTIONS["train"] + _SPLIT_FRACTIONS["val"] else "test"


def generate_split(make_example, task, split, n, seed, **task_kwargs):
    """n distinct examples of one split; `make_example(rng, **task_kwargs)` returns an example or
    None (rejected)."""
    # str seeds are hashed with sha512: stable across runs
    rng = random.Random(f"{task}/{split}/{seed}")
    out, seen, tries, failed = [], set(), 0, 0
    max_tries = 200 * n + 10_000
    t0 = last_print = time.time()
    while len(out) < n:
        # progress only when it takes a while (release-size ProsQA: ~30 s)
        if time.time() - last_print > 2:
            last_print = time.time()
            print(f"\rgenerating {task} {split}: {len(out)}/{n}", end="", file=sys.stderr,
                  flush=True)
        tries += 1
        if tries > max_tries:
            raise UserError(f"{task}: found only {len(out)} of {n} distinct {split} examples in "
                            f"{max_tries} tries; the task is too small for this size "
                            f"({task_kwargs}), ask for fewer")
        ex = make_example(rng, **task_kwargs)
        # a generator gives up after many tries (ProsQA: 1,000 graphs); the default and preset
        # tasks never fail twice in a row, so 50 failures in a row mean impossible options
        failed = failed + 1 if ex is None else 0
        if failed == 50:
            raise UserError(f"{task}: 50 examples in a row could not be generated with "
                            f"{task_kwargs or 'the default options'} (e.g. more hops than the "
                            f"graphs allow): change the task options")
        if ex is None:
            continue
        key = canonical_question(ex["question"])
        if key in seen or split_of(ex["question"]) != split:
            continue
        seen.add(key)
        out.append(ex)
    if last_print > t0:
        print(f"\rgenerated {task} {split}: {n} examples in {time.time() - t0:.0f}s",
              file=sys.stderr)
    return out

# -----------------------------------------------------------------------------
# ProsQA (Coconut, Hao et al. 2024, Appendix: Algorithm 1)

PERSONS = ("Alex Bob Carol Davis Eva Fae Gabriel Jack Max Oliver Polly Rex "
           "Sally Sam Stella Tom Wren").split()
CONCEPTS = ("bompus boompus brimpus chorpus dumpus felpus fompus gerpus gorpus grimpus gwompus "
            "hilpus impus jelpus jompus kerpus lempus lorpus numpus quimpus rempus rompus rorpus "
            "scrompus shumpus sterpus storpus terpus timpus tumpus vumpus worpus wumpus yerpus "
            "yimpus yumpus zhorpus zumpus").split()


def poisson(rng, lam):
    """Knuth's sampler: count uniform draws until their product falls below exp(-lam)."""
    k, p, limit = 0, rng.random(), math.exp(-lam)
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def weighted_sample(rng, items, weights, k):
    """k distinct items, drawn one at a time with probability proportional to weight (numpy's
    choice, replace=False)."""
    items, weights, chosen = list(items), list(weights), []
    for _ in range(k):
        x, i = rng.random() * sum(weights), 0
        while i < len(items) - 1 and x >= weights[i]:
            x -= weights[i]
            i += 1
        chosen.append(items.pop(i))
        weights.pop(i)
    return chosen


def prosqa_dag(rng, n_nodes, lam=1.5, p_side=0.35, depth_weight=1.5):
    """Algorithm 1: a random DAG whose labels say which of the two roots (nodes 0 and 1) reach each
    node.

    label bit 1 = descendant of node 0, bit 2 = descendant of node 1 (3 = both, 0 = neither). A new
    node draws k ~ Poisson(lam) parents: with p_side only from nodes node 1 does not reach, with
    p_side only from nodes node 0 does not reach, else from all, preferring deep parents (weight
    depth_weight * depth + 1). Returns the list of parent lists and the labels.
    """
    parents, labels, depth = [[], []], [1, 2], [0, 0]
    groups = {0: [], 1: [0], 2: [1], 3: []}  # nodes by label
    for idx in range(2, n_nodes):
        r = rng.random()
        if r < p_side:
            candidates = groups[0] + groups[1]  # node 1 does not reach these
        elif r < 2 * p_side:
            candidates = groups[0] + groups[2]  # node 0 does not reach these
        else:
            candidates = list(range(idx))
        k = min(poisson(rng, lam), len(candidates))
        chosen = weighted_sample(rng, candidates,
                                 [depth_weight * depth[c] + 1 for c in candidates], k)
        label = 0
        for c in chosen:
            label |= labels[c]
        parents.append(sorted(chosen))
        labels.append(label)
        groups[label].append(idx)
        depth.append(1 + max(depth[c] for c in chosen) if chosen else 0)
    return parents, labels


def shortest_path(children, src, dst):
    """BFS path src -> dst as a node list (None if unreachable); ties broken by child order
    (deterministic)."""
    prev, frontier = {src: None}, [src]
    while frontier and dst not in prev:
        nxt = []
        for u in frontier:
            for v in children[u]:
                if v not in prev:
                    prev[v] = u
                    nxt.append(v)
        frontier = nxt
    if dst not in prev:
        return None
    path = [dst]
    while prev[path[-1]] is not None:
        path.append(prev[path[-1]])
    return path[::-1]


def hop_distances(children, src):
    dist, frontier = {src: 0}, [src]
    while frontier:
        nxt = []
        for u in frontier:
            for v in children[u]:
                if v not in dist:
                    dist[v] = dist[u] + 1
                    nxt.append(v)
        frontier = nxt
    return dist


def make_prosqa(rng, min_nodes=25, max_nodes=28, min_hops=3, max_hops=6,
                hop_weights=(202, 217, 69, 12), max_persons=6, symbolic=False, max_tries=1000):
    """One ProsQA example: "<shuffled facts> Is <entity> a <A> or <B>?", steps = the path,
    "<entity> is a <A>."

    The hop count is drawn first from hop_weights (the release's test histogram by default; None =
    whatever the graphs give), then graphs are drawn until one has a suitable A: drawing graphs
    first and keeping the lucky ones would skew the histogram towards short paths.
    """
    if hop_weights:
        if len(hop_weights) != max_hops - min_hops + 1:
            raise UserError(f"hop_weights needs one weight per hop count {min_hops}..{max_hops}, "
                            f"got {hop_weights}")
        hops = rng.choices(range(min_hops, max_hops + 1), weights=hop_weights)[0]
        min_hops = max_hops = hops
    for _ in range(max_tries):
        ex = prosqa_try(rng, rng.randint(min_nodes, max_nodes), min_hops, max_hops, max_persons,
                        symbolic)
        if ex is not None:
            return ex
    return None


def make_prosqa_small(rng, min_nodes=10, max_nodes=12, min_hops=2, max_hops=4, hop_weights=None,
                      **kw):
    """The CPU-sized variant: smaller graphs, shorter paths, hop counts uniform unless hop_weights
    says otherwise. Every make_prosqa knob passes through
    (load_task("prosqa_small", ..., symbolic=True, max_nodes=9))."""
    hop_weights = hop_weights or (1,) * (max_hops - min_hops + 1)
    return make_prosqa(rng, min_nodes=min_nodes, max_nodes=max_nodes, min_hops=min_hops,
                       max_hops=max_hops, hop_weights=hop_weights, **kw)


def prosqa_try(rng, n_nodes, min_hops, max_hops, max_persons, symbolic):
    """One graph, and a question on it if it has one, else None.

    The asked entity is node 0; A is reachable from node 0 only (label 1) at min_hops..max_hops; B
    is reachable from node 1 only (label 2), so never from the entity. Parentless nodes are persons,
    the others concepts. Only nodes that occur in some edge are named (a parentless node nobody
    points to is not in the question). symbolic=True names nodes p0.. / c0.. and writes facts as
    "p3 > c7." (shorter, same graph).
    """
    parents, labels = prosqa_dag(rng, n_nodes)
    children = [[] for _ in range(n_nodes)]
    for v, ps in enumerate(parents):
        for u in ps:
            children[u].append(v)
    dist = hop_distances(children, 0)
    targets = [v for v in range(2, n_nodes)
               if labels[v] == 1 and min_hops <= dist.get(v, -1) <= max_hops]
    distractors = [v for v in range(2, n_nodes) if labels[v] == 2]
    if not targets or not distractors:
        return None
    target, neg_target = rng.choice(targets), rng.choice(distractors)

    used = sorted({u for v, ps in enumerate(parents) for u in ps}
                  | {v for v, ps in enumerate(parents) if ps})
    persons = [v for v in used if not parents[v]]
    concepts = [v for v in used if parents[v]]
    pool_p, pool_c = (([f"p{i}" for i in range(len(PERSONS))],
                       [f"c{i}" for i in range(len(CONCEPTS))])
                      if symbolic else (PERSONS, CONCEPTS))
    if len(persons) > min(max_persons, len(pool_p)) or len(concepts) > len(pool_c):
        return None
    name = dict(zip(persons, rng.sample(pool_p, len(persons))))
    name.update(zip(concepts, rng.sample(pool_c, len(concepts))))

    def fact(u, v):
        if symbolic:
            return f"{name[u]} > {name[v]}."
        return (f"{name[u]} is a {name[v]}." if not parents[u]
                else f"Every {name[u]} is a {name[v]}.")

    edges = [(u, v) for v, ps in enumerate(parents) for u in ps]
    facts = [fact(u, v) for u, v in edges]
    rng.shuffle(facts)
    pair = [name[target], name[neg_target]]
    rng.shuffle(pair)
    query = (f"{name[0]} > {pair[0]} or {pair[1]}?" if symbolic
             else f"Is {name[0]} a {pair[0]} or {pair[1]}?")
    path = shortest_path(children, 0, target)
    # a step states the entity's membership at each hop: "Tom is a terpus.",
    # "Every terpus is a brimpus.", ...
    steps = [fact(u, v) for u, v in zip(path, path[1:])]
    answer = f"{name[0]} > {name[target]}." if symbolic else f"{name[0]} is a {name[target]}."
    # the release's metadata keys, over the named nodes renumbered 0..n-1 (nodes 0 and 1 keep their
    # ids)
    idx = {v: i for i, v in enumerate(used)}
    return {"question": " ".join(facts + [query]), "steps": steps, "answer": answer,
            "idx_to_symbol": [name[v] for v in used], "edges": [[idx[u], idx[v]] for u, v in edges],
            "root": 0, "target": idx[target], "neg_target": idx[neg_target]}

# -----------------------------------------------------------------------------
# ProntoQA-style deduction (Saparov & He 2023, as converted by Coconut)

PRONTO_CONCEPTS = ("brimpus dumpus gorpus grimpus impus jompus lempus lorpus numpus rompus shumpus "
                   "sterpus tumpus vumpus wumpus yumpus zumpus").split()
ADJECTIVES = ("aggressive amenable angry blue bright brown bitter cold dull feisty floral fruity "
              "happy hot kind large liquid luminous mean metallic muffled nervous opaque orange "
              "red sad shy small sour spicy sweet transparent wooden").split()


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _plural(concept, capital=False):
    word = concept + "es"
    return word.capitalize() if capital else word


def make_prontoqa(rng, hops=5):
    """Entity in C1, C1 ⊂ C2 ⊂ ... ⊂ C_hops, C_hops is (not) P;
    query "True or false: <entity> is [not] P."

    Distractors: other properties along the chain, and a separate two-concept chain that ends in the
    opposite of P, so the property word alone does not give the answer away. Steps pair the proof
    sentences, hops + 1 steps.
    """
    concepts = rng.sample(PRONTO_CONCEPTS, hops + 2)
    chain, distract = concepts[:hops], concepts[hops:]
    adjectives = rng.sample(ADJECTIVES, hops)
    prop, other_props = adjectives[0], adjectives[1:]
    entity = rng.choice(PERSONS)
    positive = rng.random() < 0.5      # C_hops are P (else: are not P)
    negated = rng.random() < 0.5       # the query asks "is not P"

    def is_prop(positive_, adj):
        return f"are {adj}" if positive_ else f"are not {adj}"

    first = f"{entity} is {_article(chain[0])} {chain[0]}."
    rules = [f"{_plural(a, True)} are {_plural(b)}." for a, b in zip(chain, chain[1:])]
    prop_rule = f"{_plural(chain[-1], True)} {is_prop(positive, prop)}."
    extra = [f"{_plural(c, True)} {is_prop(rng.random() < 0.5, adj)}."
             for c, adj in zip(chain, other_props)]
    extra += [f"{_plural(distract[0], True)} are {_plural(distract[1])}.",
              f"{_plural(distract[1], True)} {is_prop(not positive, prop)}."]
    facts = [first] + rules + [prop_rule] + extra
    rng.shuffle(facts)
    query = f"True or false: {entity} is {'not ' if negated else ''}{prop}."

    proof = [first]
    for a, rule in zip(chain[1:], rules):
        proof += [rule, f"{entity} is {_article(a)} {a}."]
    proof += [prop_rule, f"{entity} is {'' if positive else 'not '}{prop}."]
    steps = [" ".join(proof[i:i + 2]) for i in range(0, len(proof), 2)]
    return {"question": " ".join(facts) + " " + query, "steps": steps,
            "answer": "True" if positive != negated else "False"}

# -----------------------------------------------------------------------------
# k x k multiplication (implicit CoT, Deng et al. 2023): digits least-significant first,
# space-separated

def reversed_digits(x, width):
    """x written least-significant digit first, zero-padded to `width` digits, space-separated."""
    s = str(x)[::-1]
    return " ".join(s + "0" * (width - len(s)))


def multiplication_example(a, b, k):
    """The iCoT layout: partial products A*b_i*10^i, with the running sum after p_1 .. p_(k-2) in
    parentheses."""
    b_digits = [int(c) for c in str(b)[::-1]]
    steps, total = [], 0
    for i, d in enumerate(b_digits):
        p = a * d * 10**i
        total += p
        step = reversed_digits(p, k + 1 + i)
        if 1 <= i <= k - 2:
            step += f" ( {reversed_digits(total, k + 1 + i)} )"
        steps.append(step if i == 0 else "+ " + step)
    question = f"{reversed_digits(a, k)} * {reversed_digits(b, k)}"
    return {"question": question, "steps": steps, "answer": reversed_digits(a * b, 2 * k)}


def make_multiplication(rng, digits=4):
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    return multiplication_example(rng.randint(lo, hi), rng.randint(lo, hi), digits)

# -----------------------------------------------------------------------------
# modsum: the LaTRO toy (notes/feasibility.md). Signed running sum mod m; each step is
# self-contained.

def make_modsum(rng, terms=5, modulus=5):
    """'2 + 4 - 1 + 0 - 2 + 3 mod 5?' -> steps '2 + 4 = 1', '1 - 1 = 0', ... -> answer '1'."""
    value = rng.randrange(modulus)
    parts, steps = [str(value)], []
    for _ in range(terms):
        op, d = rng.choice("+-"), rng.randrange(modulus)
        new = (value + d if op == "+" else value - d) % modulus
        parts += [op, str(d)]
        steps.append(f"{value} {op} {d} = {new}")
        value = new
    return {"question": " ".join(parts) + f" mod {modulus}?", "steps": steps, "answer": str(value)}


# -----------------------------------------------------------------------------
# kgraph: multi-hop composition over facts held in the weights (a fixed random knowledge graph).
# Small transformers answer two-hop questions over held-out combinations badly in one pass (Wang et
# al. 2024, arXiv 2405.15071); writing (CoT) or thinking (Coconut) the bridge entity first lets the
# same layers answer each hop as a one-hop query.

def kgraph_graph(entities=200, relations=4, held_out=40, graph_seed=0):
    """The fixed graph: f[r][e] = the entity relation r leads to from entity e (a random function,
    never e itself), and the held-out head entities (no multi-hop question starts at one in
    training). Depends on these arguments only, never on a run's seed or on the split."""
    if not (2 <= entities and 1 <= relations and 1 <= held_out < entities):
        raise UserError(f"kgraph: needs entities >= 2, relations >= 1 and 1 <= held_out < "
                        f"entities, got {entities}, {relations}, {held_out}")
    rng = random.Random(f"kgraph/graph/{graph_seed}/{entities}/{relations}")
    f = [[rng.choice([b for b in range(entities) if b != e]) for e in range(entities)]
         for _ in range(relations)]
    held = sorted(rng.sample(range(entities), held_out))
    return f, held


def kgraph_example(f, head, rels, fact_steps=False):
    """One question `e17 r2 r0 ?` (r2 first, then r0): steps = the bridge entities, one per step
    (none for a one-hop fact, or with fact_steps its answer as its one step), answer = the last
    entity."""
    path = [head]
    for r in rels:
        path.append(f[r][path[-1]])
    steps = path[1:-1] if len(rels) > 1 or not fact_steps else path[1:]
    return {"question": " ".join([f"e{head}"] + [f"r{r}" for r in rels] + ["?"]),
            "steps": [f"e{b}" for b in steps], "answer": f"e{path[-1]}",
            "head": head, "relations": list(rels)}


def kgraph_split(split, entities=200, relations=4, held_out=40, hops=(2,), fact_repeat=3,
                 fact_steps=True, val_share=0.2, graph_seed=0):
    """Every example of one split of the fixed graph (kgraph_graph). train = every one-hop fact
    `e r ?` (each fact_repeat times: its share of the batches) + every multi-hop question of each
    hop count in `hops` whose head is a seen entity; val / test = the multi-hop questions whose head
    is held out, cut once in a fixed order (val_share of them to val), the hop counts interleaved so
    that any first n of a split mixes them evenly. Every fact of a held-out question was trained as
    a one-hop fact; no multi-hop question with a held-out head is ever trained. fact_steps: a fact
    is a one-step chain (`e r ?` -> step `b` -> `### b`), so that from Coconut's stage 1 on every
    fact, held-out heads' included, passes its answer through a thought: that trains the thought
    to hold the first hop, which a held-out question needs (docs/coconut_default_search.md).
    Independent of the run's seed: every seed trains and tests on the same questions."""
    hops = (hops,) if isinstance(hops, int) else tuple(hops)
    if not hops or min(hops) < 2 or not 0 < val_share < 1 or fact_repeat < 1:
        raise UserError(f"kgraph: hops must be counts >= 2, 0 < val_share < 1 and fact_repeat "
                        f">= 1, got hops={hops}, val_share={val_share}, fact_repeat={fact_repeat}")
    f, held = kgraph_graph(entities, relations, held_out, graph_seed)
    held_set = set(held)
    rng = random.Random(f"kgraph/split/{graph_seed}/{entities}/{relations}/{held_out}/{hops}")
    if split == "train":
        out = [kgraph_example(f, e, (r,), fact_steps) for e in range(entities)
               for r in range(relations)]
        out *= fact_repeat
        for h in hops:
            out += [kgraph_example(f, e, rels) for e in range(entities) if e not in held_set
                    for rels in itertools.product(range(relations), repeat=h)]
        rng.shuffle(out)
        return out
    per_hop = []
    for h in hops:
        qs = [kgraph_example(f, e, rels) for e in held
              for rels in itertools.product(range(relations), repeat=h)]
        rng.shuffle(qs)
        n_val = round(val_share * len(qs))
        per_hop.append(qs[:n_val] if split == "val" else qs[n_val:])
    # round-robin over the hop counts
    return [ex for group in itertools.zip_longest(*per_hop) for ex in group if ex is not None]

# -----------------------------------------------------------------------------
# loaders for real data

class DataFileNotFound(UserError, FileNotFoundError):
    """A data file that is not there (a UserError that `except FileNotFoundError` also catches)."""


def _fail(path, row, problem):
    raise UserError(f"{path}: row {row}: {problem}")


def _require_file(path):
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "not found"
        raise DataFileNotFound(f"data file {what}: {path}")


def read_text(path):
    """A data file's text, refused in one line unless it is UTF-8 text (a gzipped file, UTF-16)."""
    _require_file(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raise UserError(f"{path} is gzip-compressed: decompress it (gunzip) and give the text file")
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise UserError(f"{path} is UTF-16 text: save it as UTF-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None


def read_rows(path):
    """Rows of a .json list or a .jsonl file, each with its 1-based row number (line number for
    jsonl)."""
    text = read_text(path)
    if path.endswith(".jsonl"):
        rows = []
        for i, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    _fail(path, i, f"invalid JSON ({e.msg})")
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        lines = [l for l in text.split("\n") if l.strip()]
        if e.msg == "Extra data" and all(l.lstrip().startswith("{") for l in lines):
            raise UserError(f"{path} holds JSON Lines (one object per line), not a JSON list: "
                            f"rename it to .jsonl") from None
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of examples, got {type(data).__name__}")
    return list(enumerate(data, 1))


def validate_example(ex, path, row):
    """The unified format, strictly: a non-empty question, a string answer, steps a list of
    strings."""
    if not isinstance(ex, dict):
        _fail(path, row, f"expected an object, got {type(ex).__name__}")
    for key in ("question", "answer"):
        if key not in ex:
            _fail(path, row, f"missing field '{key}'")
        if not isinstance(ex[key], str):
            _fail(path, row, f"field '{key}' must be a string, got {type(ex[key]).__name__}")
    if not ex["question"].strip():
        _fail(path, row, "empty question")
    steps = ex.get("steps", [])
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        _fail(path, row, "field 'steps' must be a list of strings")
    check_texts(ex, path, row)
    return ex


def check_texts(ex, where, row):
    """What no loader may pass on: an empty answer (every output would end with it and score), the
    text of Coconut's markers (it would become a thought), a lone surrogate (no tokenizer encodes
    it)."""
    if not ex["answer"].strip():
        _fail(where, row, "empty answer: every output would match it")
    for text in [ex["question"], ex["answer"], *ex.get("steps", [])]:
        marker = next((m for m in COCONUT_SPECIAL_TOKENS if m in text), None)
        if marker:
            _fail(where, row, f"holds {marker!r}, the text of a Coconut marker: remove it")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            _fail(where, row, "holds a lone surrogate (\\ud800-\\udfff), not valid text: fix "
                              "the file's escapes")


def load_json(path):
    """Unified-format .json list or .jsonl; extra keys (the release's idx_to_symbol, edges, ...) are
    kept."""
    out = []
    for row, ex in read_rows(path):
        ex = validate_example(ex, path, row)
        out.append({**ex, "steps": list(ex.get("steps", []))})
    return out


def gsm8k_example(question, solution, where="", row=0):
    """Original GSM8K: the solution lines before '#### N' are the steps, N (as written: '1,080') is
    the answer."""
    if "####" not in solution:
        _fail(where, row, "answer has no '#### <number>' line")
    body, answer = solution.rsplit("####", 1)
    answer = answer.strip()  # as written: the released answer text keeps thousands commas
    if not question.strip() or not answer:
        _fail(where, row, "empty question" if not question.strip() else "empty answer after '####'")
    if not re.fullmatch(r"-?[\d,]*\.?\d+", answer):
        _fail(where, row, f"answer {answer!r} after '####' is not a number, as every GSM8K answer "
                          f"is: fix the row, or load other answers with task=json")
    steps = [line.strip() for line in body.strip().split("\n") if line.strip()]
    ex = {"question": question.strip(), "steps": steps, "answer": answer}
    check_texts(ex, where, row)
    return ex


def _check_fields(row_dict, fields, path, row):
    if not isinstance(row_dict, dict):
        _fail(path, row, f"expected an object, got {type(row_dict).__name__}")
    for key in fields:
        if key not in row_dict:
            _fail(path, row, f"missing field '{key}'")
        if not isinstance(row_dict[key], str):
            _fail(path, row, f"field '{key}' must be a string, got {type(row_dict[key]).__name__}")


GSM8K_VAL_TAIL = 500  # GSM8K has no val split: val = the last 500 training problems


def _hub_datasets(name):
    """The `datasets` library, imported only when a hub dataset is asked for."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"loading {name} from the hub needs `pip install datasets`; or give "
                        f"--data_path= local files") from None
    return datasets


def gsm8k_val_rule(rows, split, where):
    """The hub's rule for GSM8K's missing val split, applied to the training rows (printed)."""
    if len(rows) <= GSM8K_VAL_TAIL:
        raise UserError(f"{where}: {len(rows)} training problems, too few to hold out the last "
                        f"{GSM8K_VAL_TAIL} as val; give a val file too")
    part = f"the last {GSM8K_VAL_TAIL}" if split == "val" else f"all but the last {GSM8K_VAL_TAIL}"
    print(f"gsm8k: no val split in {where}; {split} = {part} of its {len(rows)} training problems")
    return rows[-GSM8K_VAL_TAIL:] if split == "val" else rows[:-GSM8K_VAL_TAIL]


def load_gsm8k(split, path=""):
    """GSM8K from a local jsonl ({"question", "answer"}) or the hub. The hub has no val split: val
    is the last 500 training problems, and train the rest, so model selection never looks at the
    test set."""
    if path:
        rows = read_rows(path)
        for row, r in rows:
            _check_fields(r, ("question", "answer"), path, row)
        return [gsm8k_example(r["question"], r["answer"], path, row) for row, r in rows]
    datasets = _hub_datasets("gsm8k")
    hub = datasets.load_dataset("openai/gsm8k", "main",
                                split="test" if split == "test" else "train")
    rows = list(enumerate(hub, 1))
    if split != "test":
        rows = gsm8k_val_rule(rows, split, "the hub (openai/gsm8k)")
    return [gsm8k_example(r["question"], r["answer"], "openai/gsm8k", row) for row, r in rows]


def gsm8k_aug_example(line, path, row):
    """One iCoT GSM8k-Aug line `question||<<eq1>> <<eq2>> #### answer` read as the released
    conversion (`preprocessing/gsm_icot.py`) reads it: the question is the text before the first
    '||', unstripped; the steps are the text between '||' and the first '##', stripped and split
    on single spaces (a line with no equation gives one empty step, ['']); the answer is the text
    after the last '##', stripped, commas kept."""
    parts = line.split("||")
    if len(parts) == 1:
        _fail(path, row, "no '||' between question and rationale")
    if "####" not in line[len(parts[0]) + 2:]:
        _fail(path, row, "no '#### <answer>' after the rationale")
    question = parts[0]
    if not question.strip():
        _fail(path, row, "empty question")
    ex = {"question": question, "steps": parts[1].split("##")[0].strip().split(" "),
          "answer": line.rsplit("##", 1)[-1].strip()}
    check_texts(ex, path, row)
    return ex


def load_gsm8k_aug(path):
    """GSM8k-Aug (iCoT) text lines, one example per line (gsm8k_aug_example); blank lines are
    skipped."""
    if not path:
        raise UserError("gsm8k_aug needs path= a local iCoT text file "
                        "(train.txt / valid.txt / test.txt)")
    # lines as the released text-mode f.readlines() cuts them: at \n, \r\n and \r only
    lines = read_text(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [gsm8k_aug_example(line, path, row) for row, line in enumerate(lines, 1)
            if line.strip()]


def arc_example(r, where, row):
    """ARC row (question, choices {text, label}, answerKey) -> answer = the text of the keyed
    option."""
    _check_fields(r, ("question", "answerKey"), where, row)
    choices = r.get("choices")
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) \
            or not isinstance(choices.get("label"), list) \
            or len(choices["text"]) != len(choices["label"]):
        _fail(where, row, "field 'choices' must be {'text': [...], 'label': [...]} of equal length")
    options = list(zip(choices["label"], choices["text"]))
    gold = [text for label, text in options if label == r["answerKey"]]
    if len(gold) != 1:
        _fail(where, row,
              f"answerKey {r['answerKey']!r} is not one of the labels {choices['label']}")
    if not r["question"].strip():
        _fail(where, row, "empty question")
    ex = {"question": r["question"].strip(), "steps": [], "answer": gold[0], "options": options,
          "answer_label": r["answerKey"]}
    check_texts(ex, where, row)
    return ex


def load_arc(split, path=""):
    """ARC-Challenge from a local jsonl or the hub (`allenai/ai2_arc`, config ARC-Challenge)."""
    if path:
        return [arc_example(r, path, row) for row, r in read_rows(path)]
    datasets = _hub_datasets("arc")
    hub_split = {"train": "train", "val": "validation", "test": "test"}[split]
    hub = datasets.load_dataset("allenai/ai2_arc", "ARC-Challenge", split=hub_split)
    return [arc_example(dict(r), "allenai/ai2_arc", row) for row, r in enumerate(hub, 1)]

# -----------------------------------------------------------------------------
# one entry point

GENERATORS = {
    "prosqa": make_prosqa,
    "prosqa_small": make_prosqa_small,
    "prontoqa": make_prontoqa,
    "multiplication": make_multiplication,
    "modsum": make_modsum,
    "kgraph": kgraph_split,
}
# the generators that build a whole split at once (their own split rule), not one example per call
SPLIT_GENERATORS = {"kgraph"}

# default sizes (train, val, test): ProsQA / ProntoQA as released; multiplication and modsum sized
# for a CPU demo
DEFAULT_SIZES = {
    "prosqa": (17886, 300, 500),
    "prosqa_small": (3000, 200, 500),
    "prontoqa": (9000, 200, 800),
    "multiplication": (20000, 1000, 1000),
    "modsum": (10000, 500, 500),
    "kgraph": (0, 0, 0),  # 0: every example of the split (the graph fixes the sizes)
}
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

# -----------------------------------------------------------------------------
# one entry point


def task_options(task):
    """The option names a generated task accepts (prosqa_small passes make_prosqa's through)."""
    params = inspect.signature(GENERATORS[task]).parameters
    names = {p for p in params
             if p not in ("rng", "split") and params[p].kind != inspect.Parameter.VAR_KEYWORD}
    if task == "prosqa_small":
        names |= task_options("prosqa")
    return names


def check_task_options(task, options):
    """A generator's options must have their defaults' types, and every min_X at most its max_X:
    refused here, before a generator fails deep inside or tries for an hour."""
    defaults = {}
    for make in (GENERATORS[task], make_prosqa if task == "prosqa_small" else None):
        if make is not None:
            for name, p in inspect.signature(make).parameters.items():
                defaults.setdefault(name, p.default)
    for key, value in options.items():
        default = defaults.get(key)
        if default is None or isinstance(default, (tuple, list)):
            ok = default is None or isinstance(value, (int, tuple, list))
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and (isinstance(value, int) or isinstance(default, float))
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise UserError(f"task_options {key}={value!r}: task {task!r} expects "
                            f"{type(default).__name__} there (default {default!r})")
    merged = {**defaults, **options}
    for key in merged:
        if key.startswith("min_") and "max_" + key[4:] in merged:
            low, high = merged[key], merged["max_" + key[4:]]
            if low > high:
                raise UserError(f"task_options: {key}={low} is more than max_{key[4:]}={high}: "
                                f"give min <= max")


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
        return generate_split(GENERATORS[task], task, split, size, seed, **task_kwargs)
    if task in ("json", "gsm8k_aug"):
        example = f"data/{task}_{{split}}.jsonl" if task == "json" else "data/{split}.txt"
        raise UserError(f"task {task!r} needs path= local files, one per split (e.g. {example})")
    if task == "gsm8k":
        return _first(load_gsm8k(split), n, split)
    return _first(load_arc(split), n, split)


def load_splits(task, sizes, *, path="", seed=0, split_layout="", allow_overlap=False,
                **task_kwargs):
    """{split: examples} of train, val and test (sizes: their counts, 0 = the task's default),
    refused when a question is in two of them, or with allow_overlap=True printed as a warning
    (check_split_overlap)."""
    splits = {split: load_task(task, split, path=path, n=n, seed=seed, split_layout=split_layout,
                               **task_kwargs)
              for split, n in zip(SPLITS, sizes)}
    for split, examples in splits.items():
        if not examples:
            source = split_file(path, split) if path else f"task {task}"
            raise UserError(f"the {split} split is empty ({source}): give it examples")
    check_split_overlap(splits, allow_overlap)
    return splits


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
    try:
        raw = json.loads(read_text(path))  # (read_text: UTF-8 text, not gzip or UTF-16)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
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
    """A list of examples as the released conversions write it (json.dump, its default format)."""
    try:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(examples, f)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror})") from None


def prepare_prontoqa(raw_path, out_dir, sizes=PRONTOQA_SIZES):
    """The released ProntoQA conversion: out_dir/prontoqa_train.json = the first sizes[0]
    examples of the raw file, prontoqa_valid.json the next sizes[1], prontoqa_test.json the rest
    (file order, no shuffle, no dedup). A question in two splits is printed (the runs refuse such
    files unless allow_split_overlap=True). Returns {path: examples written}."""
    n_train, n_val = sizes
    examples = prontoqa_from_raw(raw_path)
    if len(examples) <= n_train + n_val:
        raise UserError(f"{raw_path}: {len(examples)} examples, too few for {n_train} train + "
                        f"{n_val} valid and a test split (the rest): give --sizes=TRAIN,VALID "
                        f"that leave some")
    parts = {"train": examples[:n_train], "valid": examples[n_train:n_train + n_val],
             "test": examples[n_train + n_val:]}
    if check_split_overlap(parts, allow_overlap=True):
        print("note: runs on these files stop at the overlap unless --allow_split_overlap=True")
    written = {}
    for split, part in parts.items():
        path = os.path.join(out_dir, f"prontoqa_{split}.json")
        write_json(part, path)
        written[path] = len(part)
    return written


def prepare_gsm8k_aug(raw_path, out_path):
    """The released iCoT conversion (`preprocessing/gsm_icot.py`) of one split's text file to the
    unified JSON the GSM8k presets read (data/gsm_{split}.json). Returns {path: examples}."""
    examples = load_gsm8k_aug(raw_path)
    write_json(examples, out_path)
    return {out_path: len(examples)}


USAGE = ("usage: python data.py TASK [SPLIT] [N] (a look at N examples) | python data.py prepare "
         "prontoqa RAW.json OUT_DIR [--sizes=TRAIN,VALID] | python data.py prepare gsm8k_aug "
         "RAW.txt OUT.json")


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
    prepare (prepare_main)."""
    if argv[:1] == ["prepare"]:
        return prepare_main(argv[1:])
    if not 1 <= len(argv) <= 3 or argv[0].startswith("-"):
        raise UserError(USAGE)
    split = argv[1] if len(argv) > 1 else "train"
    if len(argv) > 2 and not argv[2].isdigit():
        raise UserError(f"N={argv[2]!r} is not a count; {USAGE}")
    n = int(argv[2]) if len(argv) > 2 else 3
    for ex in load_task(argv[0], split, n=n):
        print(json.dumps({k: ex[k] for k in ("question", "steps", "answer")}, indent=1))


if __name__ == "__main__":
    from configurator import exit_cleanly_on_user_error
    exit_cleanly_on_user_error()
    main(sys.argv[1:])

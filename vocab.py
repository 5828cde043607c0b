"""
The tokenizers: one small interface (Tokenizer) over any Hugging Face tokenizer and over a
closed word-level vocabulary built from the examples (offline, fast for tiny models), and what
Coconut needs of a vocabulary: its three markers added as special tokens, the rows their embeddings
start from, and an example encoded as question, steps and answer.

    tok = build_tokenizer("words", examples)  # closed word-level vocabulary, fast for tiny models
"""

import dataclasses
import os
import re
from functools import cached_property

from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as _RustTokenizer
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

from configurator import UserError
from formats import (ARC_INSTRUCTION, COCONUT_MARKERS, COCONUT_SPECIAL_TOKENS, STEP_BY_STEP,
                     WORD_SPECIALS, answer_text, example_fields, latro_answer, latro_prompt,
                     question_text, step_text)

# Word-level pre-tokenization: "\n" is a token; . , ? ! : ; are tokens when they end a word
# ("terpus." -> "terpus" "."), but stay inside a word ("3.5", "Let's"); everything else splits on
# whitespace.
_WORD_PUNCT = ".,?!:;"
_WORD_PATTERN = r"\n|[.,?!:;](?=[.,?!:;]*(?:\s|$))|[^\s]+?(?=[.,?!:;]*(?:\s|$))"
_WORD_RE = re.compile(_WORD_PATTERN)
_WORD_SPECIALS = list(WORD_SPECIALS)


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
        """A Hugging Face tokenizer: a hub name, a directory, or the one inside a .gguf file (read
        by transformers, which needs the `gguf` package)."""
        if is_gguf(name_or_path):
            return cls(gguf_tokenizer(name_or_path))
        return cls(AutoTokenizer.from_pretrained(name_or_path))

    @classmethod
    def from_words(cls, texts):
        """A closed vocabulary over the words of `texts` (sorted, so the ids do not depend on the
        text order)."""
        words = sorted({w for t in texts for w in split_words(t)})
        return cls.from_word_list(_WORD_SPECIALS + [w for w in words if w not in _WORD_SPECIALS])

    @classmethod
    def from_word_list(cls, words):
        """The word-level vocabulary whose token i is words[i] (what word_list() returns): a
        checkpoint's own vocabulary, rebuilt exactly."""
        vocab = {w: i for i, w in enumerate(words)}
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

    def word_list(self):
        """A word-level vocabulary's words by id, without tokens added later (Coconut's markers):
        what a checkpoint keeps so that its ids mean the same words when it is loaded again. None
        for other tokenizers (their name says it all)."""
        if not self.is_words:
            return None
        vocab = self.hf.backend_tokenizer.get_vocab(with_added_tokens=False)
        return sorted(vocab, key=vocab.get)

    def encode(self, text, add_special_tokens=False):
        # True: BOS etc. as the tokenizer adds
        ids = self.hf.encode(text, add_special_tokens=add_special_tokens)
        if self.is_words and self.hf.unk_token_id in ids:
            # a closed vocabulary must not silently map words to <unk>: say which words are missing
            missing = sorted({w for w in split_words(text) if w not in self.hf.get_vocab()})
            raise UserError(f"words not in the word-level vocabulary: {missing[:10]}: a model "
                            f"from scratch knows only the words of the data it was built on (a "
                            f"checkpoint keeps its own vocabulary); give data with its words")
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


def special_texts(tok):
    """The texts `tok` reads as special tokens, longest first: its named ones (bos, eos, unk, pad,
    additional) and every token added as special (Llama-3's <|eot_id|>, Qwen's <|im_end|>, ...)."""
    texts = set(tok.hf.all_special_tokens)
    texts.update(t.content for t in tok.hf.added_tokens_decoder.values() if t.special)
    return sorted((t for t in texts if t.strip()), key=lambda t: (-len(t), t))


def check_no_special_text(tok, examples):
    """Refuse data whose text holds one of the tokenizer's special tokens as plain text: encoding
    reads `<|im_end|>` or `</s>` in a question as that token (an end of turn, an eos in the
    middle of the prompt). examples: a list, or {split: examples}; the one line names the token,
    the first example holding it (split, number, field) and its tokenizer. Call it after
    build_tokenizer, before Coconut's markers are added (loaders refuse their text already)."""
    texts = special_texts(tok)
    if not texts:
        return
    pattern = re.compile("|".join(map(re.escape, texts)))
    groups = examples.items() if isinstance(examples, dict) else [("", examples)]
    for split, exs in groups:
        for i, ex in enumerate(exs, 1):
            for field, text in example_fields(ex):
                found = pattern.search(text)
                if found:
                    where = f"the {split} split's example {i}" if split else f"example {i}"
                    raise UserError(
                        f"{where} holds {found[0]!r} in its {field} ({text[:60]!r}), a special "
                        f"token of tokenizer {tok.hf.name_or_path or 'words'!r}: it would be "
                        f"read as that token; remove it from the data")


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


@dataclasses.dataclass
class Markers:
    """Coconut's three markers in one run: what coconut_markers() decided, once."""
    ids: tuple        # (<bot>, <latent>, <eot>), or (None, None, None) for the methods without them
    new: bool         # rows to add now: the weights to load have none (scratch, HF, a CoT stage)
    source_id: int    # the token whose embedding row the new rows copy; None: fresh random rows
    n_rows: int       # the embedding rows of the weights to load (with the markers' when they have)

    def describe(self, tok):
        """Where the new rows come from, for the log."""
        if self.source_id is None:
            return "fresh random rows"
        return f"copies of {tok.decode([self.source_id])!r}"


def coconut_markers(tok, used, ckpt, marker_init, base):
    """The markers of a run, added to `tok` when the method uses them (`used`) or the weights to
    load have them already: a checkpoint of coconut.py keeps its trained rows (resume, or a run
    from its best.pt); weights without them (a model from scratch, a Hugging Face model, the GSM8k
    CoT stage) get new rows, copies of marker_init's token (marker_source). ckpt: the checkpoint to
    load (None: scratch or a Hugging Face model); base: 'scratch' or the Hugging Face model."""
    had = markers_present(tok, ckpt)
    new = used and not had
    source_id = marker_source(tok, marker_init, base) if new else None
    n_real = len(tok)                                   # the vocabulary without the markers
    ids = marker_ids(tok) if used or had else (None, None, None)
    # a checkpoint of this script without markers (the CoT stage) has the vocabulary's rows only
    n_rows = n_real if ckpt is not None and not had else len(tok)
    return Markers(ids, new, source_id, n_rows)


def tokenizer_name(name, model, saved=""):
    """The tokenizer a run uses: `name` when set, else the one its checkpoint saved, else the word
    vocabulary for a model from scratch, else the Hugging Face model's own (a hub name or a local
    directory: offline works)."""
    return name or saved or ("words" if model == "scratch" else model)


def is_gguf(name):
    """Does a tokenizer name (or init_from) name a GGUF file? (model.is_gguf, for the model)"""
    return isinstance(name, str) and name.lower().endswith(".gguf")


def gguf_tokenizer(path):
    """The Hugging Face tokenizer inside a .gguf file, with the special tokens the file names.
    transformers 5.17 misreads them in a Llama file with a BPE vocabulary: eos := bos and no pad
    (SmolLM2 would end its turns with <|im_start|>); 5.24 reads them right. When the tokenizer
    shows that sign (eos == bos, or no pad), bos/eos/pad/unk are set from the file's config, which
    both versions read right (one more pass over the file's header, a few seconds)."""
    folder, name = os.path.split(os.path.abspath(path))
    hf = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if hf.eos_token_id != hf.bos_token_id and hf.pad_token_id is not None:
        return hf
    cfg = AutoConfig.from_pretrained(folder, gguf_file=name)
    for role in ("bos", "eos", "pad", "unk"):
        i = getattr(cfg, f"{role}_token_id", None)
        if isinstance(i, int) and getattr(hf, f"{role}_token_id") != i:
            setattr(hf, f"{role}_token", hf.convert_ids_to_tokens(i))
    return hf


def build_tokenizer(name, examples, saved_words=None):
    """'words': a closed word-level vocabulary over the examples and the fixed templates (or,
    saved_words given, the one a checkpoint saved: Tokenizer.word_list); else a HF tokenizer (a
    hub name, a directory or a .gguf file)."""
    if name == "words" and saved_words:
        return Tokenizer.from_word_list(saved_words)
    if name != "words":
        if is_gguf(name) and not os.path.isfile(name):
            raise UserError(f"tokenizer {name!r}: no such .gguf file; give the path of a GGUF "
                            f"file, a directory with the tokenizer's files, a hub name or 'words'")
        try:
            return Tokenizer.from_pretrained(name)
        # OSError: no such directory, not on the hub, or offline and not cached; ValueError: a
        # .gguf file that is not one (or is truncated); ImportError: no gguf package
        except (OSError, ValueError, ImportError) as e:
            raise UserError(f"tokenizer {name!r} cannot be loaded ({str(e).splitlines()[0]}): give "
                            f"a directory with its files, a whole .gguf file, a hub name (offline: "
                            f"one in the cache) or 'words'") from None
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

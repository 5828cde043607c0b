"""
Speed, memory and MFU of both methods, each measured against the naive way of doing the same work.

    python bench.py                 # CPU preset: minutes on 2 cores
    python bench.py --preset=gpu    # one CUDA GPU: GPT-2-small shapes, bf16 (about a minute)
    python bench.py --sections=coconut_train --sizes=tiny --repeats=5

Every comparison runs both sides in the same process, alternating, after warm-up, and reports the
median of `repeats` timings and the ratio. Prints a Markdown table and writes the same figures to
`out_json`.
Rows:
  coconut_train  tokens/s of a coconut training step with n thoughts vs a CoT step over the same
                 tokens, and vs a naive latent forward that re-encodes the whole prefix on every
                 thought pass (what the KV cache saves); saved-for-backward activation memory (and
                 CUDA peak memory on a GPU); MFU.
  coconut_eval   examples/s of batched KV-cached latent generation vs batch-1 generation that
                 re-encodes the whole sequence for every new token (the released approach), on
                 the first `eval_naive_n` examples; how many answers are token-identical (all in
                 fp32; bf16 may flip a near-tie of a random model's logits).
  latro_step     step time split into rollout / scoring / update, rollout tokens/s, step tokens/s
                 and MFU, vs the released pipeline's shape (fixed-length rollouts, three separate
                 scoring passes, two grad forwards); growth with K and L.
  mfu            model FLOPs/s over the peak: on CPU the peak matmul throughput measured in this
                 run, on CUDA the device's dense bf16 peak (H100 / H200 SXM: 989 TFLOP/s; other
                 GPUs: a matmul measured in this run).
  memory         preflight.py's per-GPU memory plan for the papers' models on 8 x 80 GiB, DDP vs
                 FSDP: estimated from the published shapes, no GPU, no download
                 (--sections=memory).
The gpu preset needs CUDA; without it the run stops with one line `error: ...` and status 1, as
does any option it cannot use (a section or size that is not one, with the closest name; repeats <
1; an out_json that cannot be written), before any measuring. out_json is replaced whole at the end
(a temporary file, then a rename), never by an empty table.
"""

import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import transformers

from transformers import AutoConfig

from model import backbone, load_model, lm_head, token_logprobs, autocast_ctx
from model import Sampler, n_params_of_config, sample
from preflight import PLAN_PARTS, estimate_activation_bytes, estimate_kv_cache_bytes, memory_plan
from coconut import Coconut, generate_answers, naive_latent_forward
from latro import (SequenceScorer, build_batch, latro_loss, latro_rewards, rloo_advantages,
                   score_rows)

# -----------------------------------------------------------------------------
preset = "cpu"  # cpu: small shapes for a laptop; gpu: GPT-2-small at the paper's batch in bf16
sections = "coconut_train,coconut_eval,latro_step,mfu,memory"
sizes = ""      # model shapes to run, '' = the preset's (tiny: 2x128, gpt2: 12x768, vocab 50257)
device = "auto"
repeats = 3     # timed repetitions per side (median reported)
warmup = 1      # untimed repetitions per side first
seed = 0
out_json = "bench.json"

SHAPES = {"tiny": dict(n_layer=2, n_head=4, n_embd=128, vocab=128),
          "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab=50257)}
# batch, question length, rest (steps+answer) length, thought counts, examples of the evaluation
# (batched, and batch-1: its first eval_naive_n), LaTRO prompts / K / L
PRESETS = {
    "cpu": dict(sizes="tiny,gpt2", batch={"tiny": 32, "gpt2": 2}, prefix=48, rest=32,
                thoughts=(0, 2, 4, 6), eval_n={"tiny": 16, "gpt2": 4},
                eval_naive_n={"tiny": 16, "gpt2": 4}, eval_new=16,
                latro_prompts=4, latro_k=(2, 4, 8), latro_len=(16, 32, 64),
                latro_sizes=("tiny",)),  # a 50k-vocabulary LaTRO step is minutes on a CPU
    # one GPU in about a minute: the batch-1 side of the evaluation re-encodes every token, so it
    # runs on 8 of the 128 examples; one LaTRO step shape (8 prompts x K=16, L=256)
    "gpu": dict(sizes="gpt2", batch={"tiny": 128, "gpt2": 32}, prefix=128, rest=64,
                thoughts=(0, 6), eval_n={"tiny": 128, "gpt2": 128},
                eval_naive_n={"tiny": 8, "gpt2": 8}, eval_new=64,
                latro_prompts=8, latro_k=(16,), latro_len=(256,), latro_sizes=("gpt2",)),
}
# dense bf16 peaks from the spec sheets (the first name contained in the device's name); other
# GPUs: a matmul measured in this run
GPU_PEAKS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
             "A100": 312e12}

SECTIONS = ("coconut_train", "coconut_eval", "latro_step", "mfu", "memory")

def check_config(c):
    """The configuration's rules, before any work (c: {key: value}): the first one broken is a
    UserError saying what to do instead."""
    from configurator import UserError
    preset, device = c["preset"], c["device"]
    if preset not in PRESETS:
        raise UserError(f"preset={preset!r}: use one of {', '.join(PRESETS)}")
    todo = names_in("sections", c["sections"], SECTIONS)
    shapes = names_in("sizes", c["sizes"] or PRESETS[preset]["sizes"], tuple(SHAPES))
    if todo == ["latro_step"] and not set(shapes) & set(PRESETS[preset]["latro_sizes"]):
        raise UserError(f"sections=latro_step runs on the sizes {PRESETS[preset]['latro_sizes']} "
                        f"of preset={preset}, and sizes={c['sizes']!r} has none: nothing would be "
                        f"measured; add one or choose other sections")
    if c["repeats"] < 1:
        raise UserError(f"repeats={c['repeats']}: give 1 or more timed repetitions per side")
    if c["warmup"] < 0:
        raise UserError(f"warmup={c['warmup']}: give 0 or more untimed repetitions")
    check_out_json(c["out_json"])
    if preset == "gpu" and not torch.cuda.is_available():
        raise UserError("preset=gpu needs a CUDA GPU and this torch sees none; run `python "
                        "bench.py` (the CPU preset) here")
    if preset == "gpu" and not (device in ("auto", "cuda") or device.startswith("cuda:")):
        raise UserError(f"preset=gpu runs on a CUDA GPU: drop --device={device}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but this torch sees no CUDA GPU: use --device=cpu or "
                        f"'auto'")

def names_in(key, text, known):
    """A comma-separated list of known names, as a list; an unknown one (a typo) is a UserError
    with the closest known name."""
    from configurator import UserError, suggest
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError(f"{key}={text!r}: give one or more of {', '.join(known)}")
    for name in names:
        if name not in known:
            raise UserError(f"{key}={text!r}: {name!r} is unknown; {suggest(name, known)}")
    return names

def check_out_json(path):
    """out_json must be a file that can be written, found out before minutes of measuring: its
    directory exists and takes a new file (tried), and it is no directory itself."""
    from configurator import UserError
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"out_json={path!r} is a directory: give a file name (e.g. "
                        f"{os.path.join(path, 'bench.json')})")
    if not os.path.isdir(folder):
        raise UserError(f"out_json={path!r}: its directory {folder} does not exist: create it or "
                        f"give another path")
    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"out_json={path!r}: cannot write in {folder} ({e.strerror}): give a "
                        f"writable path") from None

def write_results(path, results):
    """The results as JSON, atomically (a temp file beside it, then os.replace): an interrupted
    write keeps the previous file."""
    temp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
    try:
        with open(temp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)

if __name__ == "__main__":
    from configurator import configure, exit_cleanly_on_user_error
    exit_cleanly_on_user_error()  # a wrong key or value: one line `error: ...`, exit 1
    config = configure(globals(), sys.argv[1:], verbose=False)
    check_config(config)

# -----------------------------------------------------------------------------
# timing and counting

def sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()

def alternate(fns, dev, repeats, warmup):
    """Median seconds of each function, run in turns (a, b, a, b, ...) so drift hits every side
    alike."""
    times = [[] for _ in fns]
    for r in range(warmup + repeats):
        for i, fn in enumerate(fns):
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            if r >= warmup:
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]

def saved_activation_bytes(fn):
    """Bytes of distinct tensors autograd saves for the backward of fn(): the activation memory of a
    training step, measurable on any device (CUDA's allocator peak is reported too when on a
    GPU)."""
    seen = {}
    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())

def peak_matmul_flops(dev, dtype, n=2048, iters=10):
    """Measured peak: FLOP/s of a large square matmul in this process (the CPU's denominator for
    MFU)."""
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(dev)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)

def forward_flops(model, n_tokens, n_head, ctx_len):
    """FLOPs of a forward over n_tokens: 2 per non-embedding weight per token, the LM head only at
    the n_head positions where it is applied, and attention scores/values at context length
    ctx_len."""
    cfg = model.config
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    emb = sum(p.numel() for n, p in model.named_parameters()
              if "wte" in n or "wpe" in n or "embed_tokens" in n)
    non_emb = sum(p.numel() for p in model.parameters()) - emb
    return 2 * non_emb * n_tokens + 2 * V * d * n_head + 2 * 2 * L * d * ctx_len * n_tokens

def train_flops(model, n_tokens, n_labelled, ctx_len):
    """FLOPs of forward+backward (3x forward), the LM head only at labelled positions (we never
    compute the others)."""
    return 3 * forward_flops(model, n_tokens, n_labelled, ctx_len)

# -----------------------------------------------------------------------------
# the naive ways, for comparison

@torch.no_grad()
def naive_latent_generate(model, prompt, latent_id, eos_id, max_new_tokens):
    """The released approach: batch 1, no KV cache. The thoughts are computed once
    (coconut.naive_latent_forward, which ends with a pass over the whole prompt), then every new
    token re-encodes the whole sequence (question, thoughts, answer so far) from its input
    embeddings."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    hidden, embeds = naive_latent_forward(model, ids, torch.ones_like(ids), latent_id)
    out = []
    for _ in range(max_new_tokens):
        nxt = lm_head(model)(hidden[:, -1]).argmax(-1)
        out.append(nxt.item())
        if out[-1] == eos_id:
            break
        embeds = torch.cat([embeds, model.get_input_embeddings()(nxt)[:, None]], 1)
        hidden = backbone(model)(inputs_embeds=embeds).last_hidden_state
    return out

# -----------------------------------------------------------------------------

def make_model(shape, dev):
    s = SHAPES[shape]
    torch.manual_seed(seed)
    m = load_model("scratch", s["vocab"], n_layer=s["n_layer"], n_head=s["n_head"],
                   n_embd=s["n_embd"], block_size=1024, eos_id=1, pad_id=0,
                   device_type=dev.split(":")[0])
    return m.to(dev)

def latent_batch(B, prefix, n, rest, vocab, latent_id, dev, g):
    """B rows: prefix tokens, n thought columns, rest tokens (labelled). Same total length for every
    n."""
    ids = torch.randint(3, vocab - 1, (B, prefix + n + rest), generator=g)
    ids[:, prefix:prefix + n] = latent_id
    labels = torch.full_like(ids, -100)
    labels[:, prefix + n:] = ids[:, prefix + n:]
    return ids.to(dev), torch.ones_like(ids).to(dev), labels.to(dev)

def bench_coconut_train(shape, P, dev, ctx, rows, peak):
    model = make_model(shape, dev)
    vocab, latent_id = SHAPES[shape]["vocab"], SHAPES[shape]["vocab"] - 1
    B, g = P["batch"][shape], torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    coconut, plain = Coconut(model, latent_id), Coconut(model, None)
    for n in P["thoughts"]:
        # the same B x T tokens: n thoughts cost n positions of the CoT row's steps
        batch = latent_batch(B, P["prefix"], n, P["rest"] + (P["thoughts"][-1] - n), vocab,
                             latent_id, dev, g)
        cot_batch = (batch[0].masked_fill(batch[0] == latent_id, 5), batch[1], batch[2])
        def step(loss_fn):  # one training step: forward, backward, AdamW update
            with ctx:
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        def naive_loss():
            h, _ = naive_latent_forward(model, batch[0], batch[1], latent_id)
            mask = batch[2][:, 1:] != -100
            return (-token_logprobs(model, h[:, :-1], batch[2][:, 1:].clamp(min=0), mask).sum()
                    / mask.sum())
        fns = [lambda: step(lambda: coconut(*batch)), lambda: step(lambda: plain(*cot_batch))]
        fns += [lambda: step(naive_loss)] if n else []
        t = alternate(fns, dev, repeats, warmup)
        T = batch[0].shape[1]
        mem = saved_activation_bytes(lambda: coconut(*batch))
        mem_cot = saved_activation_bytes(lambda: plain(*cot_batch))
        cuda_peak = None
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            step(lambda: coconut(*batch))
            cuda_peak = torch.cuda.max_memory_allocated() / 2**20
        flops = train_flops(model, B * T, int((batch[2] != -100).sum()), T)
        rows.append(dict(section="coconut_train", model=shape, thoughts=n, batch=B, seq=T,
                         coconut_tok_s=B * T / t[0], cot_tok_s=B * T / t[1],
                         overhead_vs_cot=t[0] / t[1], naive_tok_s=B * T / t[2] if n else None,
                         speedup_vs_naive=t[2] / t[0] if n else None,
                         act_mb=mem / 2**20, act_mb_cot=mem_cot / 2**20, cuda_peak_mb=cuda_peak,
                         mfu=flops / t[0] / peak))

def bench_coconut_eval(shape, P, dev, ctx, rows):
    model = make_model(shape, dev).eval()
    vocab, latent_id, n = SHAPES[shape]["vocab"], SHAPES[shape]["vocab"] - 1, P["thoughts"][-1]
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab - 1, (int(L),), generator=g).tolist() + [latent_id] * n
               for L in torch.randint(P["prefix"] // 2, P["prefix"], (P["eval_n"][shape],),
                                      generator=g)]
    n_naive = min(P["eval_naive_n"][shape], len(prompts))  # batch 1 on the first n_naive
    out = {}
    def batched():
        with ctx:
            out["b"] = generate_answers(model, prompts, latent_id, 1, 0, P["eval_new"], dev)
    def batch1():
        with ctx:
            out["1"] = [naive_latent_generate(model, p, latent_id, 1, P["eval_new"])
                        for p in prompts[:n_naive]]
    t = alternate([batched, batch1], dev, repeats, warmup)
    tokens, n_gen = out["b"]
    same = sum(tokens[i, :n_gen[i]].tolist() == out["1"][i] for i in range(n_naive))
    batched_ex_s, batch1_ex_s = len(prompts) / t[0], n_naive / t[1]
    rows.append(dict(section="coconut_eval", model=shape, examples=len(prompts), thoughts=n,
                     new_tokens=P["eval_new"], batched_ex_s=batched_ex_s,
                     batch1_examples=n_naive, batch1_ex_s=batch1_ex_s,
                     speedup=batched_ex_s / batch1_ex_s, identical_answers=f"{same}/{n_naive}"))

def released_step(model, ref, prompts, K, L, dev, ctx, g):
    """The released pipeline's shape: L tokens always (no early stop), three full-vocabulary scoring
    passes, and two grad forwards per micro-batch (answer branch back-propagated even at weight
    0)."""
    x = [p for p in prompts for _ in range(K)]
    t0 = time.perf_counter()
    z, _, _ = sample(model, x, L, Sampler(None, set(), [], 0, len(x), ctx), g, temperature=1.0)
    sync(dev); t1 = time.perf_counter()
    y = [[7, 8, 9, 1]] * len(x)
    ids = torch.tensor([a + b + c for a, b, c in zip(x, z, y)], device=dev)
    xz = ids[:, :-len(y[0])]
    ones = lambda t: torch.ones_like(t)  # every row has length L: no padding to mask
    with torch.no_grad(), ctx:
        for m, inp in ((model, ids), (model, xz), (ref, xz)):
            m(inp, attention_mask=ones(inp)).logits.float().log_softmax(-1)
    sync(dev); t2 = time.perf_counter()
    with ctx:
        lz = model(xz, attention_mask=ones(xz)).logits.float().log_softmax(-1).mean()
        ly = model(ids, attention_mask=ones(ids)).logits.float().log_softmax(-1).mean()
    (lz + 0.0 * ly).backward()
    model.zero_grad(set_to_none=True)
    sync(dev)
    return t1 - t0, t2 - t1, time.perf_counter() - t2, len(x) * L

def our_step(model, ref, prompts, K, L, dev, ctx, g):
    """latro.py's step: early-stopped rollouts, one policy + one reference no-grad pass, one grad
    forward. A random model has no eos habit, so a stop set of vocab/L tokens gives each token a
    ~1/L stop chance. Returns the three times, the decoded positions, the tokens of the scored
    rows and the step's model FLOPs."""
    x = [p for p in prompts for _ in range(K)]
    stops = set(range(2, 2 + max(1, SHAPES_VOCAB[0] // L)))  # stop ids only: no tokenizer needed
    t0 = time.perf_counter()
    z, stopped, n_tok = sample(model, x, L, Sampler(None, stops, [], 0, len(x), ctx), g,
                               temperature=1.0)  # n_tok: decoded positions
    sync(dev); t1 = time.perf_counter()
    y = [[7, 8, 9, 1]] * len(x)
    logp_z, logp_y = score_rows(SequenceScorer(model), x, z, y, 0, len(x), ctx)
    ref_z, _ = score_rows(SequenceScorer(ref), x, z, [[]] * len(x), 0, len(x), ctx)
    r, _ = latro_rewards(logp_y, logp_z, ref_z, stopped, K, 0.05, 2.0, "group")
    adv = rloo_advantages(r, K)
    sync(dev); t2 = time.perf_counter()
    with ctx:
        lz, ly = SequenceScorer(model)(*build_batch(x, z, y, 0, dev))
        latro_loss(lz, ly, adv, 0.0).backward()
    model.zero_grad(set_to_none=True)
    sync(dev)
    t3 = time.perf_counter()
    # FLOPs: the prefill (the head at each row's last position), every decoded position (the
    # finished rows' included: the batch decodes until all stop), two scoring forwards and one
    # forward + backward over [x, z, y], the head at the z and y positions
    n_x = sum(map(len, x))
    n_seq = n_x + sum(map(len, z)) + sum(map(len, y))
    n_scored = n_seq - n_x
    steps = n_tok // len(x)
    flops = (forward_flops(model, n_x, len(x), n_x / len(x))
             + forward_flops(model, n_tok, n_tok, n_x / len(x) + steps)
             + 5 * forward_flops(model, n_seq, n_scored, n_seq / len(x)))
    return t1 - t0, t2 - t1, t3 - t2, sum(map(len, z)), n_seq, flops

SHAPES_VOCAB = [0]  # the benched model's vocabulary size, for our_step's stop set

def bench_latro(shape, P, dev, ctx, rows, peak):
    model = make_model(shape, dev)
    ref = make_model(shape, dev).eval()
    vocab = SHAPES_VOCAB[0] = SHAPES[shape]["vocab"]
    g = torch.Generator(device=dev).manual_seed(seed)
    prompts = [torch.randint(3, vocab - 1, (24,)).tolist() for _ in range(P["latro_prompts"])]
    for K in P["latro_k"]:
        for L in P["latro_len"]:
            if K != P["latro_k"][-1] and L != P["latro_len"][-1]:
                continue  # vary K at the longest L, and L at the largest K
            res = {"ours": [], "released": []}
            for r in range(warmup + repeats):
                for name, fn in (("ours", our_step), ("released", released_step)):
                    out = fn(model, ref, prompts, K, L, dev, ctx, g)
                    if r >= warmup:
                        res[name].append(out)
            med = {k: [statistics.median(x) for x in zip(*v)] for k, v in res.items()}
            ours, rel = med["ours"], med["released"]
            step_s = sum(ours[:3])
            rows.append(dict(section="latro_step", model=shape, prompts=len(prompts), K=K, L=L,
                             rollout_s=ours[0], scoring_s=ours[1], update_s=ours[2],
                             step_s=step_s, rollout_tok_s=ours[3] / ours[0],
                             step_tok_s=ours[4] / step_s, mfu=ours[5] / step_s / peak,
                             mean_rationale=ours[3] / (len(prompts) * K),
                             released_step_s=sum(rel[:3]), released_rollout_s=rel[0],
                             released_scoring_s=rel[1], released_update_s=rel[2],
                             speedup=sum(rel[:3]) / sum(ours[:3])))

# -----------------------------------------------------------------------------
# memory: the per-GPU plan for the papers' models, from their shapes

# the fields of each model's published config.json that set parameter shapes (rope scaling and the
# like do not)
MODEL_CONFIGS = {
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12,
                 n_head=12),
    "Llama-3.2-1B": dict(model_type="llama", vocab_size=128256, hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "Phi-3.5-mini": dict(model_type="phi3", vocab_size=32064, hidden_size=3072,
                         intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, tie_word_embeddings=False),
    "Mistral-7B-v0.3": dict(model_type="mistral", vocab_size=32768, hidden_size=4096,
                            intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "Llama-3.1-8B": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
PUBLISHED_SIZES = {"gpt2": "124M", "Llama-3.2-1B": "1.24B", "Phi-3.5-mini": "3.82B",
                   "Mistral-7B-v0.3": "7.25B", "Llama-3.1-8B": "8.03B"}  # the model cards' counts
LATRO_MODELS = ("Phi-3.5-mini", "Mistral-7B-v0.3", "Llama-3.1-8B")
COCONUT_MODELS = ("gpt2", "Llama-3.2-1B")
GiB = 2 ** 30
GPUS, GPU_BYTES = 8, 80 * GiB
# per GPU, as released: 3 prompts x K=16 rollouts, micro-batches of 4, 12 accumulation steps
LATRO_RUN = dict(rollouts=48, prompt=200, rationale=500, answer=20, micro=4, accum=12)
# per GPU: the global batch of 128 over 8 GPUs; sequences of question + thoughts + steps + answer
COCONUT_RUN = dict(micro=16, seq=256, labelled=128, eval_rows=16, new=64)

def config_of(name):
    c = dict(MODEL_CONFIGS[name])
    return AutoConfig.for_model(c.pop("model_type"), **c)

def count_params(c):
    """Parameters from the shapes by hand: embeddings, per layer attention q/k/v/o + MLP + norms,
    final norm, LM head (none when tied). GPT-2: learned positions, 4x MLP, biases and LayerNorm
    biases everywhere."""
    if c["model_type"] == "gpt2":
        h = c["n_embd"]
        attn = (h * 3 * h + 3 * h) + (h * h + h)
        mlp = (h * 4 * h + 4 * h) + (4 * h * h + h)
        layer = 2 * 2 * h + attn + mlp
        return (c["vocab_size"] + c["n_positions"]) * h + c["n_layer"] * layer + 2 * h  # tied head
    h, inter, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    hd = c.get("head_dim", h // heads)
    attn = h * heads * hd + 2 * h * c["num_key_value_heads"] * hd + heads * hd * h
    # gated MLP (gate, up, down) and two RMSNorm weights, no biases
    layer = attn + 3 * h * inter + 2 * h
    head = 0 if c["tie_word_embeddings"] else c["vocab_size"] * h
    return c["vocab_size"] * h + c["num_hidden_layers"] * layer + h + head

def plan_row(name, method, mode, n, cfg, checkpointing=False):
    """One table row: the plan of `name` for LaTRO (policy + frozen reference + the rollouts' KV
    cache) or Coconut (no reference), bf16 compute on GPUS x GPU_BYTES."""
    if method == "latro":
        r = LATRO_RUN
        seq = r["prompt"] + r["rationale"] + r["answer"]
        kv = estimate_kv_cache_bytes(cfg, r["rollouts"], r["prompt"] + r["rationale"])
        scored = r["micro"] * (r["rationale"] + r["answer"])  # log-probs of z and y
        act = estimate_activation_bytes(cfg, r["micro"] * seq, logit_positions=scored,
                               checkpointing=checkpointing)
        reference, accum = ("sharded" if mode == "fsdp" else "full"), r["accum"]
    else:
        r = COCONUT_RUN
        kv = estimate_kv_cache_bytes(cfg, r["eval_rows"], r["seq"] + r["new"])
        scored = r["micro"] * r["labelled"]
        act = estimate_activation_bytes(cfg, r["micro"] * r["seq"], logit_positions=scored,
                               checkpointing=checkpointing)
        reference, accum = "none", 1
    p = memory_plan(n, mode=mode, world_size=GPUS, precision="bf16", reference=reference,
                    grad_accum=accum, kv_cache_bytes=kv, activations_bytes=act,
                    device_bytes=GPU_BYTES)
    if checkpointing:
        mode += "+ckpt"
    row = dict(section="memory", model=name, method=method, mode=mode, params=f"{n / 1e9:.2f}B",
               bytes_per_param=p["bytes_per_param"])
    for k in PLAN_PARTS + ("total",):
        row[k + "_GiB"] = round(p[k] / GiB, 1)
    row["fits_80GiB"] = "yes" if p["total"] <= GPU_BYTES else "no"
    return row

def bench_memory(rows):
    for name in COCONUT_MODELS + LATRO_MODELS:
        cfg = config_of(name)
        n = n_params_of_config(cfg)
        # the meta-device build agrees with the count from the shapes
        assert n == count_params(MODEL_CONFIGS[name]), name
        method = "latro" if name in LATRO_MODELS else "coconut"
        rows.append(plan_row(name, method, "ddp", n, cfg))
        rows.append(plan_row(name, method, "fsdp", n, cfg))
        # activation checkpointing would drop the KV cache Coconut's thought passes share
        # (parallel.py)
        if method == "latro":
            rows.append(plan_row(name, method, "fsdp", n, cfg, checkpointing=True))

# -----------------------------------------------------------------------------

def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "-" if v is None else str(v)

def table(rows):
    lines = []
    for sec in dict.fromkeys(r["section"] for r in rows):
        rs = [r for r in rows if r["section"] == sec]
        keys = [k for k in rs[0] if k != "section"]
        lines += [f"\n### {sec}", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rs]
    return "\n".join(lines)

if __name__ == "__main__":
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = device.split(":")[0]
    torch.manual_seed(seed)
    ctx = autocast_ctx(device_type)
    P = PRESETS[preset]
    shapes = names_in("sizes", sizes or P["sizes"], tuple(SHAPES))
    todo = names_in("sections", sections, SECTIONS)
    if "latro_step" in todo and not set(shapes) & set(P["latro_sizes"]):
        print(f"note: latro_step runs on the sizes {P['latro_sizes']} of preset={preset} only: "
              f"not measured here")
    print("config: " + " ".join(f"{k}={v}" for k, v in config.items()))
    spec = False
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_PEAKS.items() if k in name), None)
        spec = peak is not None
        if not spec:
            peak = peak_matmul_flops(device, torch.bfloat16)
    else:
        name = platform.processor() or platform.machine()
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), name)
        peak = peak_matmul_flops(device, torch.float32)
    header = (f"machine: {name} | cores {os.cpu_count()} | threads {torch.get_num_threads()} | "
              f"torch {torch.__version__} | transformers {transformers.__version__} | {device} "
              f"{'bf16 autocast' if device_type == 'cuda' else 'fp32'} | "
              f"peak {peak / 1e9:,.0f} GFLOP/s ("
              f"{'bf16 spec' if spec else 'measured matmul'})")
    print(header)
    rows = []
    t0 = time.time()
    for shape in shapes:
        if "coconut_train" in todo or "mfu" in todo:
            bench_coconut_train(shape, P, device, ctx, rows, peak)
            print(f"coconut_train {shape} done ({time.time() - t0:.0f}s)",
                  table(rows[-len(PRESETS[preset]["thoughts"]):]), flush=True)
        if "coconut_eval" in todo:
            bench_coconut_eval(shape, P, device, ctx, rows)
            print(f"coconut_eval {shape} done ({time.time() - t0:.0f}s)", flush=True)
        if "latro_step" in todo and shape in P["latro_sizes"]:
            bench_latro(shape, P, device, ctx, rows, peak)
            print(f"latro_step {shape} done ({time.time() - t0:.0f}s)", flush=True)
    if "memory" in todo:
        bench_memory(rows)
    if not rows:  # never an empty table over the results of an earlier run
        from configurator import UserError
        raise UserError(f"nothing was measured (sections={sections}, sizes={sizes!r}): "
                        f"{out_json} is left as it was")
    print(table(rows))
    print(f"\nbench time {time.time() - t0:.0f}s")
    write_results(out_json, {"header": header, "config": config, "rows": rows})

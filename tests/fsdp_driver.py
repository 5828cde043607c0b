"""
Driver for tests/test_fsdp.py (gloo, CPU):
    MALLOC_MMAP_THRESHOLD_=65536 torchrun --nproc_per_node=2 tests/fsdp_driver.py OUT_DIR
One launch runs every phase in turn, from the same initial weights and the same per-rank data, and
rank 0 writes OUT_DIR/results.json for the test to check:
  memory    peak RSS growth of a bigger model's FSDP step + gathered generation, and the plan
  ddp       DDP, gradient accumulation, saving a gathered checkpoint halfway
  fsdp      the same under FSDP2 (its checkpoint and save_pretrained export halfway)
  resume    FSDP resumed from the FSDP and from the DDP checkpoint; DDP from the FSDP one
  ckpt      FSDP + activation checkpointing; a Coconut-like forward with the KV cache across passes
  generate  greedy generation inside gathered() vs the unwrapped model
  reference a frozen model sharded on its own (LaTRO's reference) vs unsharded
  bf16      the mixed-precision policy used on CUDA: dtypes and loss against fp32
"""

import gc
import json
import os
import resource
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import DynamicCache

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import backbone, generate, left_pad, load_model, token_logprobs
from checkpoints import save_checkpoint
from parallel import (enable_activation_checkpointing, fsdp_wrap, gather_full, gathered,
                      hf_model_in, load_full_state_dicts, set_grad_sync)
from preflight import memory_plan

VOCAB, STEPS, ACCUM, B, T = 64, 4, 2, 2, 12

class Step(torch.nn.Module):
    """Mean next-token loss through backbone + LM head (as the scripts' wrappers do, so the wrapper
    is the FSDP root). passes > 1: a Coconut-like forward, the sequence in `passes` chunks, each
    seeing the earlier ones only through the KV cache, the first position of each later chunk
    replaced by the previous chunk's last hidden state."""
    def __init__(self, model, passes=1):
        super().__init__()
        self.model, self.passes = model, passes

    def forward(self, ids):
        emb = self.model.get_input_embeddings()(ids)  # (B, T, C)
        if self.passes == 1:
            hidden = backbone(self.model)(inputs_embeds=emb, use_cache=False).last_hidden_state
        else:
            cache, hs, cut = DynamicCache(), [], T // self.passes
            for p in range(self.passes):
                x = emb[:, p * cut:(p + 1) * cut]
                if hs:
                    x = torch.cat([hs[-1][:, -1:], x[:, 1:]], dim=1)  # the continuous thought
                pos = torch.arange(p * cut, p * cut + x.shape[1])[None].expand(ids.shape[0], -1)
                out = backbone(self.model)(inputs_embeds=x, position_ids=pos, past_key_values=cache,
                                           use_cache=True)
                hs.append(out.last_hidden_state)
            hidden = torch.cat(hs, dim=1)
        mask = torch.ones_like(ids[:, 1:], dtype=torch.bool)
        return -token_logprobs(self.model, hidden[:, :-1], ids[:, 1:], mask).mean()

def batch(step, micro, rank):
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randint(0, VOCAB, (B, T), generator=g)

def fresh_model(arch):
    torch.manual_seed(0)
    return load_model("scratch", VOCAB, arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=64)

def train(mode, arch="gpt2", start=0, ckpt=None, save_at=None, save_path=None, passes=1,
          checkpointing=False):
    """Steps start..STEPS-1; returns (per-step losses averaged over ranks, final full state
    dict)."""
    model = fresh_model(arch)
    if checkpointing:
        enable_activation_checkpointing(model)
    step_module = Step(model, passes)
    if mode == "fsdp":
        train_module = fsdp_wrap(step_module, "cpu")
    else:
        train_module = DDP(step_module)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if ckpt is not None:
        sd = torch.load(ckpt, weights_only=True)
        load_full_state_dicts(model, opt, sd["model"], sd["optimizer"])
    losses = []
    for step in range(start, STEPS):
        total = torch.zeros(())
        for micro in range(ACCUM):
            set_grad_sync(train_module, micro == ACCUM - 1)
            loss = train_module(batch(step, micro, dist.get_rank())) / ACCUM
            loss.backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(total)
        losses.append(total.item() / dist.get_world_size())
        if save_at == step + 1:
            model_sd, optim_sd = gather_full(model.state_dict()), gather_full(opt.state_dict())
            if dist.get_rank() == 0:
                ckpt_obj = {"model": model_sd, "optimizer": optim_sd, "step": step + 1}
                save_checkpoint(save_path, ckpt_obj)
                # and the Hugging Face export from the same gathered weights
                hf_model_in(model).save_pretrained(save_path.replace(".pt", "_hf"),
                                                   state_dict=model_sd)
            dist.barrier()
    model_sd = gather_full(model.state_dict())
    del train_module, step_module, model, opt
    gc.collect()
    return losses, model_sd

def max_abs_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)

def memory_phase(n_embd):
    """Peak RSS growth (bytes) of an FSDP step and a gathered generation on an 8-layer Llama, and
    the plan."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    model = load_model("scratch", 512, arch="llama", n_layer=8, n_head=4, n_embd=n_embd,
                       block_size=64)
    n_params = sum(p.numel() for p in model.parameters())
    step_module = fsdp_wrap(Step(model), "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 512, (2, 16))
    step_module(ids).backward()
    opt.step()
    with gathered(step_module):
        generate(model, ids, torch.ones_like(ids), 8, stop_sequences=[], pad_id=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    plan = memory_plan(n_params, mode="fsdp", world_size=dist.get_world_size(), precision="fp32")
    del step_module, model, opt
    gc.collect()
    return dict(n_params=n_params, measured=peak - base, planned=plan["total"])

def generate_phase():
    """Greedy tokens of the sharded model inside gathered() vs the same weights unwrapped."""
    plain, model = fresh_model("llama"), fresh_model("llama")
    # a random model with small weights repeats one token; sharpen it so decoding varies
    with torch.no_grad():
        for p in [*plain.parameters(), *model.parameters()]:
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    step_module = fsdp_wrap(Step(model), "cpu")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    ids, mask = left_pad(prompts, 0)
    kw = dict(stop_sequences=[[9]], pad_id=0)
    want, _ = generate(plain, ids, mask, 6, **kw)
    # count the all-gathers: one per FSDP unit for the whole call, not one per unit per token
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as pg
    calls, orig = [0], pg.foreach_all_gather
    def counting(*a, **k):
        calls[0] += 1
        return orig(*a, **k)
    pg.foreach_all_gather = counting
    with gathered(step_module):
        got, _ = generate(model, ids, mask, 6, **kw)
    pg.foreach_all_gather = orig
    # ranks may decode different numbers of tokens inside (evaluation stops early): no collectives
    with gathered(step_module):
        generate(model, ids, mask, 2 + 5 * dist.get_rank(), stop_sequences=[], pad_id=0)
    # outside gathered() the shards are back and training works again
    step_module(batch(0, 0, dist.get_rank())).backward()
    # 3 FSDP units: two layers and the root
    return dict(equal=torch.equal(want, got), tokens=got.tolist(), all_gathers=calls[0], n_units=3)

def bf16_phase():
    """The CUDA policy (bf16 compute, fp32 master weights and gradients) also runs on gloo/CPU: one
    step's loss against fp32, the dtypes of master weights, gradients and gathered weights."""
    losses, dtypes = [], {}
    for bf16 in (False, True):
        model = fresh_model("llama")
        step_module = fsdp_wrap(Step(model), "cpu", bf16=bf16)
        loss = step_module(batch(0, 0, dist.get_rank()))
        loss.backward()
        losses.append(loss.item())
        p = model.get_input_embeddings().weight
        with gathered(step_module):
            gathered_dtype = model.get_input_embeddings().weight.dtype
        dtypes[str(bf16)] = [str(p.dtype), str(p.grad.dtype), str(gathered_dtype)]
    return dict(fp32_loss=losses[0], bf16_loss=losses[1], dtypes=dtypes)

def reference_phase():
    """|score difference| of a frozen model (LaTRO's reference) sharded on its own vs unsharded."""
    plain, ref = fresh_model("gpt2"), fresh_model("gpt2")
    ref.requires_grad_(False)
    ref_step = fsdp_wrap(Step(ref), "cpu")
    ids = batch(0, 0, dist.get_rank())
    with torch.no_grad():
        return abs(ref_step(ids).item() - Step(plain)(ids).item())

if __name__ == "__main__":
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # the first run pays one-off costs (lazily imported modules, thread pools): measure the second
    memory_phase(n_embd=32)
    res = dict(memory=memory_phase(n_embd=256))
    ddp_losses, ddp_sd = train("ddp", save_at=2, save_path=os.path.join(out_dir, "ddp.pt"))
    fsdp_losses, fsdp_sd = train("fsdp", save_at=2, save_path=os.path.join(out_dir, "fsdp.pt"))
    res_losses, res_sd = train("fsdp", start=2, ckpt=os.path.join(out_dir, "fsdp.pt"))
    x_losses, x_sd = train("fsdp", start=2, ckpt=os.path.join(out_dir, "ddp.pt"))
    gc_losses, gc_sd = train("fsdp", checkpointing=True)
    torch.manual_seed(0)
    probe = load_model("scratch", VOCAB, arch="gpt2", n_layer=2, n_head=2, n_embd=32)
    enable_activation_checkpointing(fsdp_wrap(Step(probe), "cpu"))
    gc_active = probe.training and all(b.gradient_checkpointing for b in probe.transformer.h)
    ddp2_losses, ddp2_sd = train("ddp", arch="llama", passes=3)
    fsdp2_losses, fsdp2_sd = train("fsdp", arch="llama", passes=3)
    xd_losses, xd_sd = train("ddp", start=2, ckpt=os.path.join(out_dir, "fsdp.pt"))
    res.update(ddp_losses=ddp_losses, fsdp_losses=fsdp_losses, resume_losses=res_losses,
               cross_losses=x_losses, ddp_from_fsdp_losses=xd_losses, gc_losses=gc_losses,
               gc_active=gc_active, ddp_multipass_losses=ddp2_losses,
               fsdp_multipass_losses=fsdp2_losses, fsdp_vs_ddp=max_abs_diff(fsdp_sd, ddp_sd),
               resume_vs_fsdp=max_abs_diff(res_sd, fsdp_sd),
               cross_vs_fsdp=max_abs_diff(x_sd, fsdp_sd),
               ddp_from_fsdp_vs_ddp=max_abs_diff(xd_sd, ddp_sd),
               gc_vs_fsdp=max_abs_diff(gc_sd, fsdp_sd),
               multipass_fsdp_vs_ddp=max_abs_diff(fsdp2_sd, ddp2_sd),
               keys_equal=sorted(fsdp_sd) == sorted(ddp_sd), reference_diff=reference_phase(),
               bf16=bf16_phase(),
               generate=generate_phase())
    if rank == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(res, f)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()

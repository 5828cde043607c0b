# LaTRO on GSM8K: the paper's recipe (arXiv 2411.04282). 8 GPUs x 3 prompts x K=16 = 384 rollouts
# per optimizer step. The model is init_from; the paper's three (zero-shot accuracy %, greedy /
# maj@8, Table 1):
#   microsoft/Phi-3.5-mini-instruct     base 72.9 / 74.0   LaTRO 87.6 / 90.5   (the default below)
#   mistralai/Mistral-7B-Instruct-v0.3  base 47.8 / 58.2   LaTRO 67.3 / 73.8
#   meta-llama/Llama-3.1-8B-Instruct    base 76.8 / 79.7   LaTRO 80.1 / 87.0
#     torchrun --standalone --nproc_per_node=8 latro.py config/latro_gsm8k.py
#     torchrun --standalone --nproc_per_node=8 latro.py config/latro_gsm8k_8b.py  # Llama, FSDP
#     python latro.py config/latro_gsm8k.py --init_from=Qwen/Qwen2.5-1.5B-Instruct --batch_size=3
# (1 GPU). The released protocol trains on all 7,473 problems and selects on test:
# --val_split=test; the default holds out the last 500 as val. 8-shot evaluation of a model:
# --eval_prompt=8shot. Memory: plain DDP keeps fp32 weights + grads + AdamW state (16 B/param) and
# the frozen fp32 reference (4 B/param) on every GPU: ~76 GB for Phi-3.5's 3.8B before activations
# (141 GB GPUs such as the H200, or a <=3B model on 80 GB GPUs), ~145-160 GB for the 7-8B models.
# The paper sharded with DeepSpeed ZeRO-3; here --fsdp=True shards with PyTorch's FSDP2
# (config/latro_gsm8k_8b.py turns it on for the 7-8B models).
out_dir = "out/gsm8k_latro"
init_from = "microsoft/Phi-3.5-mini-instruct"
task = "gsm8k"
checker = "released"      # is_equiv_gsm8k as released, so the numbers compare with the paper's
n_train = 0
n_test = 0                # the whole test split
sft_steps = 0             # LaTRO straight from the instruct model (SFT baseline: own preset)
latro_steps = 117         # the released '6 epochs' (of rollouts): 117 x 24 = 2,808 prompts
beta = 0.05               # KL coefficient for GSM8K
n_val = 500               # loaders.py: the last 500 training problems (the hub has no val split)
batch_size = 24           # prompts per step, all GPUs
rloo_k = 16
micro_batch_size = 4      # 48 rollouts per GPU / 4 = 12 accumulation steps, as released
gen_batch_size = 48       # all of a GPU's rollouts in one generate call
max_rationale_tokens = 500
max_new_tokens = 500      # L = 500 (scripts/evaluation.sh, paper 5.1)
temperature = 1.0
top_p = 1.0
gamma = 2.0
penalty = "group"         # 'rank_mean' reproduces the released penalty
sft_coef = 0.0            # released recipe; 1.0 = the paper's Eq. 4
learning_rate = 5e-7
weight_decay = 0.0
eval_interval = 20
maj_k = 8
gradient_checkpointing = True

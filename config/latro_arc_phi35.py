# LaTRO on ARC-Challenge with Phi-3.5-mini (3.8B): the paper's setup (arXiv 2411.04282, Table 2: base 85.1 / 86.0, LaTRO 86.4 / 87.5
# zero-shot greedy / maj@8). 8 GPUs x 3 prompts x K=16 = 384 rollouts per optimizer step.
#   torchrun --standalone --nproc_per_node=8 latro.py config/latro_arc_phi35.py
# Memory: plain DDP keeps fp32 weights + grads + AdamW state (16 B/param) and the frozen fp32 reference
# (4 B/param) on every GPU: ~76 GB for 3.8B parameters before activations. Use 141 GB GPUs (H200), or on
# 80 GB GPUs the same recipe with a <=3B model (e.g. --init_from=Qwen/Qwen2.5-1.5B-Instruct).
out_dir = "out-latro-arc-phi35"
init_from = "microsoft/Phi-3.5-mini-instruct"
task = "arc"
n_train = 0
n_test = 0                # the whole test split
sft_steps = 0             # LaTRO straight from the instruct model (its SFT baseline is a separate run)
latro_steps = 18          # assumed: the GSM8K run's 6 epochs of rollouts, 6 x 1,119 / 384 (not stated for ARC)
beta = 0.25               # KL coefficient for ARC-Challenge
n_dev = 0                 # the hub's validation split (299 questions)
batch_size = 24           # prompts per step, all GPUs
rloo_k = 16
micro_batch_size = 4      # 48 rollouts per GPU / 4 = 12 accumulation steps, as released
gen_batch_size = 48       # all of a GPU's rollouts in one generate call
max_rationale_tokens = 500
eval_max_tokens = 512
temperature = 1.0
top_p = 1.0
gamma = 2.0
penalty = "group"         # 'rank_mean' reproduces the released penalty
sft_coef = 0.0            # released recipe; 1.0 = the paper's Eq. 4
lr = 5e-7
weight_decay = 0.0
eval_interval = 20
maj_k = 8
gradient_checkpointing = True

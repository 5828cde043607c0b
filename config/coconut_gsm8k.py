# GSM8k, stage 2 of 2: Coconut from the CoT checkpoint, c=2 thoughts per step, 3 stages of 3
# epochs, then all steps latent (6 thoughts) until epoch 25 of the released schedule (22 epochs
# here: the released schedule counts the CoT run as its epochs 0-2, resume 3).
#   torchrun --standalone --nproc_per_node=4 coconut.py config/coconut_gsm8k.py
# Start: the CoT run's weights after 6 epochs (paper: 6 epochs of stage 0). The released README
# picks a CoT checkpoint at ~40% val accuracy by hand: e.g. --init_from=out/gsm8k_cot/best.pt.
# Length: the paper trains the last stage until epoch 50 (the yaml with num_epochs 50):
# --num_epochs=47.
# Ablations from the same checkpoint: add config/coconut_no_curriculum.py, coconut_no_thoughts.py or
# coconut_pause_as_thought.py (and --out_dir=...). Baselines from GPT-2 (No-CoT, pause): add
# config/coconut_no_cot.py or coconut_pause.py to config/coconut_gsm8k_cot.py instead.
out_dir = "out/gsm8k_coconut"
task = "json"
data_path = "data/gsm_{split}.json"
task_options = "{}"
init_from = "out/gsm8k_cot/epoch_6.pt"  # after CoT epochs 0-5 (config/coconut_gsm8k_cot.py)
method = "coconut"
c_thought = 2
epochs_per_stage = 3
max_latent_stage = 3
start_stage = 1
pad_latent_to_max = True
num_epochs = 22                  # released (resume 3, num_epochs 25); paper: --num_epochs=47
batch_size = 128
micro_batch_size = 32
learning_rate = 1e-4
reset_optimizer = "epoch"        # released: a new AdamW every epoch (paper: at stage switches)
precision = "fp32"               # released: bf16 False
marker_init = "<<"               # released: copies of '<<' of the CoT model, added when loading it
max_new_tokens = 64
probe = 2

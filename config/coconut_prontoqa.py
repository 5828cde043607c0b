# ProntoQA (5 hops): Coconut from GPT-2, 1 thought per step, 6 stages of 5 epochs (stage 0 keeps
# the markers, 0 thoughts), 50 epochs, 6 thoughts at inference. Paper: Coconut 99.8%, CoT 98.8%.
#   torchrun --standalone --nproc_per_node=4 coconut.py config/coconut_prontoqa.py
# (4 GPUs as released; 1 works). Baselines and ablations: add
# config/coconut_{cot,no_cot,pause,pause_as_thought,no_thoughts,no_curriculum}.py
# data/prontoqa_{split}.json: the released conversion of ProntoQA's raw 5hop_0shot_random.json
# (asaparov/prontoqa's run_experiment.py, the command in docs/data.md):
#   python data.py prepare prontoqa 5hop_0shot_random.json data
# data_path="" generates a release-sized ProntoQA-style set locally instead of reading these files.
out_dir = "out/prontoqa_coconut"
task = "prontoqa"
data_path = "data/prontoqa_{split}.json"
task_options = "{}"
init_from = "openai-community/gpt2"
method = "coconut"
c_thought = 1
epochs_per_stage = 5
max_latent_stage = 6
num_epochs = 50
batch_size = 128
micro_batch_size = 32
learning_rate = 1e-4
reset_optimizer = "epoch"        # released: a new AdamW every epoch (paper: at stage switches)
precision = "fp32"               # released: bf16 False
marker_init = "<<"               # released: markers start as copies of '<<'
max_new_tokens = 128
probe = 4

# A small generated ProsQA-style task on a CPU (minutes): questions about 6-8 concept nodes,
# 2-3 hops, a 2-layer GPT-2 from scratch, 3 stages of 3 epochs then all-latent. It shows the
# mechanics of the curriculum on the paper's task, not the method working: at this size every
# method stays near chance (docs/defaults.md).
#   python coconut.py config/coconut_prosqa_small.py
#   python coconut.py config/coconut_prosqa_small.py config/coconut_no_cot.py --out_dir=out/n
out_dir = "out/prosqa_small_coconut"
task = "prosqa_small"
task_options = "{'min_nodes': 6, 'max_nodes': 8, 'min_hops': 2, 'max_hops': 3}"
c_thought = 1
epochs_per_stage = 3
max_latent_stage = 3
num_epochs = 15
batch_size = 32
micro_batch_size = 32
marker_init = "auto"
max_new_tokens = 48
probe = 2

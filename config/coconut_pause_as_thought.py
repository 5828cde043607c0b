# Overlay: the "pause_as_thought" method on top of a task preset (see the table in coconut.py's
# docstring), e.g.
#   torchrun --standalone --nproc_per_node=4 coconut.py config/coconut_prosqa.py \
#       config/coconut_pause_as_thought.py --out_dir=out/prosqa_pause_as_thought
#   python coconut.py --method=pause_as_thought                                        (the CPU \
#       demo)
method = "pause_as_thought"

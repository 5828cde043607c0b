# Overlay: the "pause" method on top of a task preset (see the table in coconut.py's docstring),
# e.g.
#   torchrun --standalone --nproc_per_node=4 coconut.py config/coconut_prosqa.py \
#       config/coconut_pause.py --out_dir=out/prosqa_pause
#   python coconut.py --method=pause                                        (the CPU demo)
method = "pause"

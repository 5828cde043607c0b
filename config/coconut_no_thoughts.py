# Overlay: the "no_thoughts" method on top of a task preset (see the table in coconut.py's
# docstring), e.g.
#   torchrun --standalone --nproc_per_node=4 coconut.py config/coconut_prosqa.py \
#       config/coconut_no_thoughts.py --out_dir=out/prosqa_no_thoughts
#   python coconut.py --method=no_thoughts                                        (the CPU demo)
method = "no_thoughts"

"""The suite's process layout. With pytest-xdist installed (requirements-test.txt),
`python -m pytest` runs in two worker processes, each test module whole on one worker (so that a
module's fixtures are computed once), one CPU thread per worker (two multi-threaded workers on two
cores slow each other down many times). `-n 0` (or a machine without pytest-xdist) runs everything
in this process."""
import os

WORKERS = 2


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return                                                 # a worker: the controller chose
    xdist = config.pluginmanager.hasplugin("xdist")
    if (xdist and config.getoption("numprocesses") is None and config.getoption("dist") == "no"
            and not config.getoption("collectonly")):
        # what `-n 2 --dist=loadscope` sets, read by xdist's own (later) pytest_configure
        config.option.numprocesses, config.option.dist = WORKERS, "loadscope"
        config.option.tx = ["popen"] * WORKERS
        os.environ["OMP_NUM_THREADS"] = "1"                    # the workers (and their children)


# the files that start second processes (torchrun, kills) and the real model's (a 135M model
# converted and run on the CPU) take most of the time: handing them out first lets the two workers
# finish together instead of one waiting for the other's last long file
LONG_FIRST = ("test_real_model.py", "test_latro_script.py", "test_coconut_script.py",
              "test_fsdp.py", "test_run.py", "test_bad_inputs.py", "test_loops.py",
              "test_faults.py", "test_invariants_latro.py")


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(LONG_FIRST)))  # stable in a file

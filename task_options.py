"""
The generated tasks by name, which data.load_task reads: GENERATORS (the make_* function of each
task in tasks.py), SPLIT_GENERATORS (those that build a whole split at once), DEFAULT_SIZES, the
options each accepts and their limits, checked before any example is drawn (an impossible option
is one line, never a generator failing deep inside or trying for an hour).
"""

import inspect
import math
import sys

from configurator import UserError
from tasks import (PRONTO_CONCEPTS, kgraph_split, make_modsum, make_multiplication, make_prontoqa,
                   make_prosqa, make_prosqa_small)

# -----------------------------------------------------------------------------
# the registry: every generator, its default sizes and the options it accepts

GENERATORS = {
    "prosqa": make_prosqa,
    "prosqa_small": make_prosqa_small,
    "prontoqa": make_prontoqa,
    "multiplication": make_multiplication,
    "modsum": make_modsum,
    "kgraph": kgraph_split,
}
# the generators that build a whole split at once (their own split rule), not one example per call
SPLIT_GENERATORS = {"kgraph"}

# default sizes (train, val, test): ProsQA / ProntoQA as released; multiplication and modsum sized
# for a CPU demo
DEFAULT_SIZES = {
    "prosqa": (17886, 300, 500),
    "prosqa_small": (3000, 200, 500),
    "prontoqa": (9000, 200, 800),
    "multiplication": (20000, 1000, 1000),
    "modsum": (10000, 500, 500),
    "kgraph": (0, 0, 0),  # 0: every example of the split (the graph fixes the sizes)
}


def task_options(task):
    """The option names a generated task accepts (prosqa_small passes make_prosqa's through)."""
    params = inspect.signature(GENERATORS[task]).parameters
    names = {p for p in params
             if p not in ("rng", "split") and params[p].kind != inspect.Parameter.VAR_KEYWORD}
    if task == "prosqa_small":
        names |= task_options("prosqa")
    return names


def generator_defaults(task):
    """{option: default} of a generated task (prosqa_small: its own, then make_prosqa's)."""
    defaults = {}
    for make in (GENERATORS[task], make_prosqa if task == "prosqa_small" else None):
        if make is not None:
            for name, p in inspect.signature(make).parameters.items():
                defaults.setdefault(name, p.default)
    return defaults


def check_option_type(task, key, value, default):
    """One option must have its default's type (an int for a float; an int, a sequence or None for
    a tuple: prosqa's hop_weights=None); a UserError naming it otherwise."""
    if default is None or isinstance(default, (tuple, list)):
        ok = default is None or value is None or isinstance(value, (int, tuple, list))
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (isinstance(value, int) or isinstance(default, float))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UserError(f"task_options {key}={value!r}: task {task!r} expects "
                        f"{type(default).__name__} there (default {default!r})")


def check_task_options(task, options):
    """A generator's options must have their defaults' types, every min_X at most its max_X, and
    values its generator can work with (OPTION_LIMITS): refused here, before a generator fails deep
    inside or tries for an hour."""
    defaults = generator_defaults(task)
    for key, value in options.items():
        check_option_type(task, key, value, defaults.get(key))
    merged = {**defaults, **options}
    for key in merged:
        if key.startswith("min_") and "max_" + key[4:] in merged:
            low, high = merged[key], merged["max_" + key[4:]]
            if low > high:
                raise UserError(f"task_options: {key}={low} is more than max_{key[4:]}={high}: "
                                f"give min <= max")
    problem = OPTION_LIMITS[task](merged) if task in OPTION_LIMITS else None
    if problem:
        raise UserError(f"task_options for {task}: {problem}")

# -----------------------------------------------------------------------------
# what each generator's options may hold: a function of the options (defaults filled in) that
# returns what is wrong, as text, or None


def is_number(x):
    """A finite int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def prosqa_limits(o):
    """prosqa / prosqa_small: graphs with the two roots, hop counts >= 1, hop_weights one share per
    hop count. (Options no graph can satisfy, such as more hops than nodes, end generation with
    its own message after 50 failed examples.)"""
    if o["min_nodes"] < 2:
        return f"min_nodes={o['min_nodes']}: a graph has two roots at least; give min_nodes >= 2"
    if o["min_hops"] < 1:
        return f"min_hops={o['min_hops']}: an answer is one hop away at least; give min_hops >= 1"
    return hop_weights_problem(o["hop_weights"], o["min_hops"], o["max_hops"])


def hop_weights_problem(weights, low, high):
    """hop_weights: None or empty (prosqa: whatever the graphs give; prosqa_small: uniform), else
    one finite weight >= 0 per hop count low..high, not all 0."""
    if weights is None or (isinstance(weights, (tuple, list)) and not weights):
        return None
    n = high - low + 1
    if not isinstance(weights, (tuple, list)) or not all(map(is_number, weights)):
        return (f"hop_weights={weights!r}: give a list of {n} numbers, the share of questions of "
                f"each hop count {low}..{high}")
    if len(weights) != n:
        return (f"hop_weights={weights!r} needs one weight per hop count {low}..{high} ({n}), "
                f"got {len(weights)}")
    if min(weights) < 0 or sum(weights) <= 0:
        return (f"hop_weights={weights!r}: weights are shares of the hop counts: give numbers "
                f">= 0, not all 0")
    return None


def prontoqa_limits(o):
    """prontoqa: a chain of `hops` concepts plus a two-concept distractor chain, drawn without
    repetition from PRONTO_CONCEPTS."""
    most = len(PRONTO_CONCEPTS) - 2
    if not 1 <= o["hops"] <= most:
        return (f"hops={o['hops']}: give 1 <= hops <= {most} (a chain of hops concepts and a "
                f"distractor chain of 2 use {len(PRONTO_CONCEPTS)} concepts at most)")
    return None


def multiplication_limits(o):
    """multiplication: digits >= 1, and a product Python can still write as text (its int-to-text
    limit, sys.get_int_max_str_digits(): 4300 digits by default)."""
    limit = sys.get_int_max_str_digits() // 2 if hasattr(sys, "get_int_max_str_digits") else 0
    if o["digits"] < 1:
        return f"digits={o['digits']}: give digits >= 1"
    if limit and o["digits"] > limit:
        return (f"digits={o['digits']}: products of more than {2 * limit} digits exceed Python's "
                f"int-to-text limit; give digits <= {limit}")
    return None


def modsum_limits(o):
    """modsum: a sum of one term at least, modulo 2 at least (mod 1 every answer is 0)."""
    if o["terms"] < 1:
        return f"terms={o['terms']}: give terms >= 1 (the number of terms added to the first)"
    if o["modulus"] < 2:
        return f"modulus={o['modulus']}: give modulus >= 2 (mod 1 every answer is 0)"
    return None


KGRAPH_MAX_QUESTIONS = 5_000_000  # a training split beyond this would not fit in memory


def kgraph_limits(o):
    """kgraph: the graph's shape (entities, relations, held-out heads), hop counts >= 2, val_share
    and fact_repeat, and a training split small enough to hold in memory."""
    hops = o["hops"] if isinstance(o["hops"], (tuple, list)) else (o["hops"],)
    if not (2 <= o["entities"] and 1 <= o["relations"] and 1 <= o["held_out"] < o["entities"]):
        return (f"needs entities >= 2, relations >= 1 and 1 <= held_out < entities, got "
                f"entities={o['entities']}, relations={o['relations']}, held_out={o['held_out']}")
    if not hops or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 2
                           for h in hops):
        return f"hops={o['hops']!r}: give hop counts >= 2 (an int or a list of ints)"
    if not 0 < o["val_share"] < 1 or o["fact_repeat"] < 1:
        return (f"needs 0 < val_share < 1 and fact_repeat >= 1, got val_share={o['val_share']}, "
                f"fact_repeat={o['fact_repeat']}")
    if kgraph_questions(o["entities"], o["relations"], hops, o["fact_repeat"]) is None:
        return (f"entities={o['entities']}, relations={o['relations']}, hops={o['hops']!r}, "
                f"fact_repeat={o['fact_repeat']} make more than {KGRAPH_MAX_QUESTIONS:,} "
                f"training questions: give fewer")
    return None


def kgraph_questions(entities, relations, hops, fact_repeat):
    """How many questions kgraph's training split holds (its facts fact_repeat times, and
    entities x relations**h questions of each hop count h, an upper bound), or None beyond
    KGRAPH_MAX_QUESTIONS (counted without building a number of a million digits)."""
    total = entities * relations * fact_repeat
    for h in hops:
        if relations > 1 and h * math.log10(relations) > math.log10(KGRAPH_MAX_QUESTIONS):
            return None
        total += entities * relations ** h
    return total if total <= KGRAPH_MAX_QUESTIONS else None


OPTION_LIMITS = {"prosqa": prosqa_limits, "prosqa_small": prosqa_limits,
                 "prontoqa": prontoqa_limits, "multiplication": multiplication_limits,
                 "modsum": modsum_limits, "kgraph": kgraph_limits}

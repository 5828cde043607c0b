"""
The generated tasks (no download, deterministic by seed): ProsQA, ProntoQA, multiplication,
modsum and kgraph, and the disjoint splits they are drawn into. Their registry (names, default
sizes, the options each accepts and their limits) is task_options.py.

Generated tasks (Coconut's ProsQA and ProntoQA, iCoT's multiplication, and "modsum", a toy for
LaTRO) keep their splits disjoint by construction: a question belongs to train, val or test
according to a stable hash of its canonical text, and each split's generator keeps only the
questions of its own bucket. The split a question lands in therefore never depends on the seed or on
the requested sizes. kgraph (two-hop questions over a fixed random knowledge graph) builds each
split whole, by its own rule (kgraph_split).
"""

import hashlib
import itertools
import math
import random
import re
import sys
import time
import unicodedata

from configurator import UserError

# -----------------------------------------------------------------------------
# disjoint splits for generated tasks

_SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def same_question(question):
    """What two questions have in common when a model sees the same question: the text in Unicode
    NFKC form, case-folded, its white space collapsed, its sentences sorted (canonical_question)."""
    text = unicodedata.normalize("NFKC", question).casefold()
    return canonical_question(" ".join(text.split()))


def canonical_question(question):
    """The question with its sentences sorted: two shufflings of the same facts are the same
    question."""
    return " ".join(sorted(re.split(r"(?<=[.?!])\s+", question.strip())))


def split_of(question):
    """Which split a question belongs to, by a stable hash (independent of seed, sizes and
    PYTHONHASHSEED)."""
    h = int(hashlib.sha1(canonical_question(question).encode()).hexdigest()[:8], 16) / 16**8
    if h < _SPLIT_FRACTIONS["train"]:
        return "train"
    return "val" if h < _SPLIT_FRACTIONS["train"] + _SPLIT_FRACTIONS["val"] else "test"


def generate_split(make_example, task, split, n, seed, **task_kwargs):
    """n distinct examples of one split; `make_example(rng, **task_kwargs)` returns an example or
    None (rejected). Progress goes to stderr when it takes a while (release-size ProsQA: ~30 s);
    an error or Ctrl-C ends that line first, so that its message starts a line of its own."""
    # str seeds are hashed with sha512: stable across runs
    rng = random.Random(f"{task}/{split}/{seed}")
    progress = Progress(f"{task} {split}", n)
    try:
        out = draw_distinct(make_example, rng, task, split, n, task_kwargs, progress)
    except BaseException:
        progress.end_line()
        raise
    progress.done()
    return out


class Progress:
    """'generating TASK SPLIT: i/n' on stderr, rewritten in place at most every 2 seconds, only
    once the work has taken that long."""

    def __init__(self, what, n):
        self.what, self.n = what, n
        self.t0 = self.last = time.time()

    def update(self, i):
        if time.time() - self.last > 2:
            self.last = time.time()
            print(f"\rgenerating {self.what}: {i}/{self.n}", end="", file=sys.stderr, flush=True)

    def shown(self):
        return self.last > self.t0

    def end_line(self):
        if self.shown():
            print(file=sys.stderr, flush=True)

    def done(self):
        if self.shown():
            print(f"\rgenerated {self.what}: {self.n} examples in {time.time() - self.t0:.0f}s",
                  file=sys.stderr)


def draw_distinct(make_example, rng, task, split, n, task_kwargs, progress):
    """Draw examples until n distinct ones of `split` are found; a UserError when the task is too
    small or its options give no example."""
    out, seen, tries, failed = [], set(), 0, 0
    max_tries = 200 * n + 10_000
    while len(out) < n:
        progress.update(len(out))
        tries += 1
        if tries > max_tries:
            raise UserError(f"{task}: found only {len(out)} of {n} distinct {split} examples in "
                            f"{max_tries} tries; the task is too small for this size "
                            f"({task_kwargs}), ask for fewer")
        ex = make_example(rng, **task_kwargs)
        # a generator gives up after many tries (ProsQA: 1,000 graphs); the default and preset
        # tasks never fail twice in a row, so 50 failures in a row mean impossible options
        failed = failed + 1 if ex is None else 0
        if failed == 50:
            raise UserError(f"{task}: 50 examples in a row could not be generated with "
                            f"{task_kwargs or 'the default options'} (e.g. more hops than the "
                            f"graphs allow): change the task options")
        if ex is None:
            continue
        key = canonical_question(ex["question"])
        if key in seen or split_of(ex["question"]) != split:
            continue
        seen.add(key)
        out.append(ex)
    return out

# -----------------------------------------------------------------------------
# ProsQA (Coconut, Hao et al. 2024, Appendix: Algorithm 1)

PERSONS = ("Alex Bob Carol Davis Eva Fae Gabriel Jack Max Oliver Polly Rex "
           "Sally Sam Stella Tom Wren").split()
CONCEPTS = ("bompus boompus brimpus chorpus dumpus felpus fompus gerpus gorpus grimpus gwompus "
            "hilpus impus jelpus jompus kerpus lempus lorpus numpus quimpus rempus rompus rorpus "
            "scrompus shumpus sterpus storpus terpus timpus tumpus vumpus worpus wumpus yerpus "
            "yimpus yumpus zhorpus zumpus").split()


def poisson(rng, lam):
    """Knuth's sampler: count uniform draws until their product falls below exp(-lam)."""
    k, p, limit = 0, rng.random(), math.exp(-lam)
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def weighted_sample(rng, items, weights, k):
    """k distinct items, drawn one at a time with probability proportional to weight (numpy's
    choice, replace=False)."""
    items, weights, chosen = list(items), list(weights), []
    for _ in range(k):
        x, i = rng.random() * sum(weights), 0
        while i < len(items) - 1 and x >= weights[i]:
            x -= weights[i]
            i += 1
        chosen.append(items.pop(i))
        weights.pop(i)
    return chosen


def prosqa_dag(rng, n_nodes, lam=1.5, p_side=0.35, depth_weight=1.5):
    """Algorithm 1: a random DAG whose labels say which of the two roots (nodes 0 and 1) reach each
    node.

    label bit 1 = descendant of node 0, bit 2 = descendant of node 1 (3 = both, 0 = neither). A new
    node draws k ~ Poisson(lam) parents: with p_side only from nodes node 1 does not reach, with
    p_side only from nodes node 0 does not reach, else from all, preferring deep parents (weight
    depth_weight * depth + 1). Returns the list of parent lists and the labels.
    """
    parents, labels, depth = [[], []], [1, 2], [0, 0]
    groups = {0: [], 1: [0], 2: [1], 3: []}  # nodes by label
    for idx in range(2, n_nodes):
        r = rng.random()
        if r < p_side:
            candidates = groups[0] + groups[1]  # node 1 does not reach these
        elif r < 2 * p_side:
            candidates = groups[0] + groups[2]  # node 0 does not reach these
        else:
            candidates = list(range(idx))
        k = min(poisson(rng, lam), len(candidates))
        chosen = weighted_sample(rng, candidates,
                                 [depth_weight * depth[c] + 1 for c in candidates], k)
        label = 0
        for c in chosen:
            label |= labels[c]
        parents.append(sorted(chosen))
        labels.append(label)
        groups[label].append(idx)
        depth.append(1 + max(depth[c] for c in chosen) if chosen else 0)
    return parents, labels


def shortest_path(children, src, dst):
    """BFS path src -> dst as a node list (None if unreachable); ties broken by child order
    (deterministic)."""
    prev, frontier = {src: None}, [src]
    while frontier and dst not in prev:
        nxt = []
        for u in frontier:
            for v in children[u]:
                if v not in prev:
                    prev[v] = u
                    nxt.append(v)
        frontier = nxt
    if dst not in prev:
        return None
    path = [dst]
    while prev[path[-1]] is not None:
        path.append(prev[path[-1]])
    return path[::-1]


def hop_distances(children, src):
    dist, frontier = {src: 0}, [src]
    while frontier:
        nxt = []
        for u in frontier:
            for v in children[u]:
                if v not in dist:
                    dist[v] = dist[u] + 1
                    nxt.append(v)
        frontier = nxt
    return dist


def make_prosqa(rng, min_nodes=25, max_nodes=28, min_hops=3, max_hops=6,
                hop_weights=(202, 217, 69, 12), max_persons=6, symbolic=False, max_tries=1000):
    """One ProsQA example: "<shuffled facts> Is <entity> a <A> or <B>?", steps = the path,
    "<entity> is a <A>."

    The hop count is drawn first from hop_weights (the release's test histogram by default; None =
    whatever the graphs give), then graphs are drawn until one has a suitable A: drawing graphs
    first and keeping the lucky ones would skew the histogram towards short paths.
    """
    if hop_weights:
        if len(hop_weights) != max_hops - min_hops + 1:
            raise UserError(f"hop_weights needs one weight per hop count {min_hops}..{max_hops}, "
                            f"got {hop_weights}")
        hops = rng.choices(range(min_hops, max_hops + 1), weights=hop_weights)[0]
        min_hops = max_hops = hops
    for _ in range(max_tries):
        ex = prosqa_try(rng, rng.randint(min_nodes, max_nodes), min_hops, max_hops, max_persons,
                        symbolic)
        if ex is not None:
            return ex
    return None


def make_prosqa_small(rng, min_nodes=10, max_nodes=12, min_hops=2, max_hops=4, hop_weights=None,
                      **kw):
    """The CPU-sized variant: smaller graphs, shorter paths, hop counts uniform unless hop_weights
    says otherwise. Every make_prosqa knob passes through
    (load_task("prosqa_small", ..., symbolic=True, max_nodes=9))."""
    hop_weights = hop_weights or (1,) * (max_hops - min_hops + 1)
    return make_prosqa(rng, min_nodes=min_nodes, max_nodes=max_nodes, min_hops=min_hops,
                       max_hops=max_hops, hop_weights=hop_weights, **kw)


def prosqa_try(rng, n_nodes, min_hops, max_hops, max_persons, symbolic):
    """One graph, and a question on it if it has one, else None.

    The asked entity is node 0; A is reachable from node 0 only (label 1) at min_hops..max_hops; B
    is reachable from node 1 only (label 2), so never from the entity. Parentless nodes are persons,
    the others concepts. Only nodes that occur in some edge are named (a parentless node nobody
    points to is not in the question). symbolic=True names nodes p0.. / c0.. and writes facts as
    "p3 > c7." (shorter, same graph).
    """
    parents, labels = prosqa_dag(rng, n_nodes)
    children = [[] for _ in range(n_nodes)]
    for v, ps in enumerate(parents):
        for u in ps:
            children[u].append(v)
    dist = hop_distances(children, 0)
    targets = [v for v in range(2, n_nodes)
               if labels[v] == 1 and min_hops <= dist.get(v, -1) <= max_hops]
    distractors = [v for v in range(2, n_nodes) if labels[v] == 2]
    if not targets or not distractors:
        return None
    target, neg_target = rng.choice(targets), rng.choice(distractors)

    used = sorted({u for v, ps in enumerate(parents) for u in ps}
                  | {v for v, ps in enumerate(parents) if ps})
    persons = [v for v in used if not parents[v]]
    concepts = [v for v in used if parents[v]]
    pool_p, pool_c = (([f"p{i}" for i in range(len(PERSONS))],
                       [f"c{i}" for i in range(len(CONCEPTS))])
                      if symbolic else (PERSONS, CONCEPTS))
    if len(persons) > min(max_persons, len(pool_p)) or len(concepts) > len(pool_c):
        return None
    name = dict(zip(persons, rng.sample(pool_p, len(persons))))
    name.update(zip(concepts, rng.sample(pool_c, len(concepts))))

    def fact(u, v):
        if symbolic:
            return f"{name[u]} > {name[v]}."
        return (f"{name[u]} is a {name[v]}." if not parents[u]
                else f"Every {name[u]} is a {name[v]}.")

    edges = [(u, v) for v, ps in enumerate(parents) for u in ps]
    facts = [fact(u, v) for u, v in edges]
    rng.shuffle(facts)
    pair = [name[target], name[neg_target]]
    rng.shuffle(pair)
    query = (f"{name[0]} > {pair[0]} or {pair[1]}?" if symbolic
             else f"Is {name[0]} a {pair[0]} or {pair[1]}?")
    path = shortest_path(children, 0, target)
    # a step states the entity's membership at each hop: "Tom is a terpus.",
    # "Every terpus is a brimpus.", ...
    steps = [fact(u, v) for u, v in zip(path, path[1:])]
    answer = f"{name[0]} > {name[target]}." if symbolic else f"{name[0]} is a {name[target]}."
    # the release's metadata keys, over the named nodes renumbered 0..n-1 (nodes 0 and 1 keep their
    # ids)
    idx = {v: i for i, v in enumerate(used)}
    return {"question": " ".join(facts + [query]), "steps": steps, "answer": answer,
            "idx_to_symbol": [name[v] for v in used], "edges": [[idx[u], idx[v]] for u, v in edges],
            "root": 0, "target": idx[target], "neg_target": idx[neg_target]}

# -----------------------------------------------------------------------------
# ProntoQA-style deduction (Saparov & He 2023, as converted by Coconut)

PRONTO_CONCEPTS = ("brimpus dumpus gorpus grimpus impus jompus lempus lorpus numpus rompus shumpus "
                   "sterpus tumpus vumpus wumpus yumpus zumpus").split()
ADJECTIVES = ("aggressive amenable angry blue bright brown bitter cold dull feisty floral fruity "
              "happy hot kind large liquid luminous mean metallic muffled nervous opaque orange "
              "red sad shy small sour spicy sweet transparent wooden").split()


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _plural(concept, capital=False):
    word = concept + "es"
    return word.capitalize() if capital else word


def make_prontoqa(rng, hops=5):
    """Entity in C1, C1 ⊂ C2 ⊂ ... ⊂ C_hops, C_hops is (not) P;
    query "True or false: <entity> is [not] P."

    Distractors: other properties along the chain, and a separate two-concept chain that ends in the
    opposite of P, so the property word alone does not give the answer away. Steps pair the proof
    sentences, hops + 1 steps.
    """
    concepts = rng.sample(PRONTO_CONCEPTS, hops + 2)
    chain, distract = concepts[:hops], concepts[hops:]
    adjectives = rng.sample(ADJECTIVES, hops)
    prop, other_props = adjectives[0], adjectives[1:]
    entity = rng.choice(PERSONS)
    positive = rng.random() < 0.5      # C_hops are P (else: are not P)
    negated = rng.random() < 0.5       # the query asks "is not P"

    def is_prop(positive_, adj):
        return f"are {adj}" if positive_ else f"are not {adj}"

    first = f"{entity} is {_article(chain[0])} {chain[0]}."
    rules = [f"{_plural(a, True)} are {_plural(b)}." for a, b in zip(chain, chain[1:])]
    prop_rule = f"{_plural(chain[-1], True)} {is_prop(positive, prop)}."
    extra = [f"{_plural(c, True)} {is_prop(rng.random() < 0.5, adj)}."
             for c, adj in zip(chain, other_props)]
    extra += [f"{_plural(distract[0], True)} are {_plural(distract[1])}.",
              f"{_plural(distract[1], True)} {is_prop(not positive, prop)}."]
    facts = [first] + rules + [prop_rule] + extra
    rng.shuffle(facts)
    query = f"True or false: {entity} is {'not ' if negated else ''}{prop}."

    proof = [first]
    for a, rule in zip(chain[1:], rules):
        proof += [rule, f"{entity} is {_article(a)} {a}."]
    proof += [prop_rule, f"{entity} is {'' if positive else 'not '}{prop}."]
    steps = [" ".join(proof[i:i + 2]) for i in range(0, len(proof), 2)]
    return {"question": " ".join(facts) + " " + query, "steps": steps,
            "answer": "True" if positive != negated else "False"}

# -----------------------------------------------------------------------------
# k x k multiplication (implicit CoT, Deng et al. 2023): digits least-significant first,
# space-separated

def reversed_digits(x, width):
    """x written least-significant digit first, zero-padded to `width` digits, space-separated."""
    s = str(x)[::-1]
    return " ".join(s + "0" * (width - len(s)))


def multiplication_example(a, b, k):
    """The iCoT layout: partial products A*b_i*10^i, with the running sum after p_1 .. p_(k-2) in
    parentheses."""
    b_digits = [int(c) for c in str(b)[::-1]]
    steps, total = [], 0
    for i, d in enumerate(b_digits):
        p = a * d * 10**i
        total += p
        step = reversed_digits(p, k + 1 + i)
        if 1 <= i <= k - 2:
            step += f" ( {reversed_digits(total, k + 1 + i)} )"
        steps.append(step if i == 0 else "+ " + step)
    question = f"{reversed_digits(a, k)} * {reversed_digits(b, k)}"
    return {"question": question, "steps": steps, "answer": reversed_digits(a * b, 2 * k)}


def make_multiplication(rng, digits=4):
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    return multiplication_example(rng.randint(lo, hi), rng.randint(lo, hi), digits)

# -----------------------------------------------------------------------------
# modsum: the LaTRO toy (notes/feasibility.md). Signed running sum mod m; each step is
# self-contained.

def make_modsum(rng, terms=5, modulus=5):
    """'2 + 4 - 1 + 0 - 2 + 3 mod 5?' -> steps '2 + 4 = 1', '1 - 1 = 0', ... -> answer '1'."""
    value = rng.randrange(modulus)
    parts, steps = [str(value)], []
    for _ in range(terms):
        op, d = rng.choice("+-"), rng.randrange(modulus)
        new = (value + d if op == "+" else value - d) % modulus
        parts += [op, str(d)]
        steps.append(f"{value} {op} {d} = {new}")
        value = new
    return {"question": " ".join(parts) + f" mod {modulus}?", "steps": steps, "answer": str(value)}


# -----------------------------------------------------------------------------
# kgraph: multi-hop composition over facts held in the weights (a fixed random knowledge graph).
# Small transformers answer two-hop questions over held-out combinations badly in one pass (Wang et
# al. 2024, arXiv 2405.15071); writing (CoT) or thinking (Coconut) the bridge entity first lets the
# same layers answer each hop as a one-hop query.

def kgraph_graph(entities=200, relations=4, held_out=40, graph_seed=0):
    """The fixed graph: f[r][e] = the entity relation r leads to from entity e (a random function,
    never e itself), and the held-out head entities (no multi-hop question starts at one in
    training). Depends on these arguments only, never on a run's seed or on the split."""
    if not (2 <= entities and 1 <= relations and 1 <= held_out < entities):
        raise UserError(f"kgraph: needs entities >= 2, relations >= 1 and 1 <= held_out < "
                        f"entities, got {entities}, {relations}, {held_out}")
    rng = random.Random(f"kgraph/graph/{graph_seed}/{entities}/{relations}")
    f = [[rng.choice([b for b in range(entities) if b != e]) for e in range(entities)]
         for _ in range(relations)]
    held = sorted(rng.sample(range(entities), held_out))
    return f, held


def kgraph_example(f, head, rels, fact_steps=False):
    """One question `e17 r2 r0 ?` (r2 first, then r0): steps = the bridge entities, one per step
    (none for a one-hop fact, or with fact_steps its answer as its one step), answer = the last
    entity."""
    path = [head]
    for r in rels:
        path.append(f[r][path[-1]])
    steps = path[1:-1] if len(rels) > 1 or not fact_steps else path[1:]
    return {"question": " ".join([f"e{head}"] + [f"r{r}" for r in rels] + ["?"]),
            "steps": [f"e{b}" for b in steps], "answer": f"e{path[-1]}",
            "head": head, "relations": list(rels)}


def kgraph_split(split, entities=200, relations=4, held_out=40, hops=(2,), fact_repeat=3,
                 fact_steps=True, val_share=0.2, graph_seed=0):
    """Every example of one split of the fixed graph (kgraph_graph). train = every one-hop fact
    `e r ?` (each fact_repeat times: its share of the batches) + every multi-hop question of each
    hop count in `hops` whose head is a seen entity; val / test = the multi-hop questions whose head
    is held out, cut once in a fixed order (val_share of them to val), the hop counts interleaved so
    that any first n of a split mixes them evenly. Every fact of a held-out question was trained as
    a one-hop fact; no multi-hop question with a held-out head is ever trained. fact_steps: a fact
    is a one-step chain (`e r ?` -> step `b` -> `### b`), so that from Coconut's stage 1 on every
    fact, held-out heads' included, passes its answer through a thought: that trains the thought
    to hold the first hop, which a held-out question needs (docs/coconut_default_search.md).
    Independent of the run's seed: every seed trains and tests on the same questions."""
    hops = (hops,) if isinstance(hops, int) else tuple(hops)
    if not hops or min(hops) < 2 or not 0 < val_share < 1 or fact_repeat < 1:
        raise UserError(f"kgraph: hops must be counts >= 2, 0 < val_share < 1 and fact_repeat "
                        f">= 1, got hops={hops}, val_share={val_share}, fact_repeat={fact_repeat}")
    f, held = kgraph_graph(entities, relations, held_out, graph_seed)
    held_set = set(held)
    rng = random.Random(f"kgraph/split/{graph_seed}/{entities}/{relations}/{held_out}/{hops}")
    if split == "train":
        out = [kgraph_example(f, e, (r,), fact_steps) for e in range(entities)
               for r in range(relations)]
        out *= fact_repeat
        for h in hops:
            out += [kgraph_example(f, e, rels) for e in range(entities) if e not in held_set
                    for rels in itertools.product(range(relations), repeat=h)]
        rng.shuffle(out)
        return out
    per_hop = []
    for h in hops:
        qs = [kgraph_example(f, e, rels) for e in held
              for rels in itertools.product(range(relations), repeat=h)]
        rng.shuffle(qs)
        n_val = round(val_share * len(qs))
        per_hop.append(qs[:n_val] if split == "val" else qs[n_val:])
    # round-robin over the hop counts
    return [ex for group in itertools.zip_longest(*per_hop) for ex in group if ex is not None]

"""
The texts both methods build around an example ({"question", "steps", "answer"}, data.py):
Coconut's three markers and its question / step / answer lines; LaTRO's prompts (the CoT prompt, the
released SFT baseline's prompts, GSM8K's 8-shot prompt, ARC's multiple-choice templates), the answer
sentence y whose likelihood is its reward, the released stop strings, and the token rows
[x, z*, y] of its SFT warm-up.
"""

# Coconut's three markers by role: <bot> opens the continuous thoughts, <latent> holds one, <eot>
# closes them
COCONUT_MARKERS = {"bot": "<|start-latent|>", "latent": "<|latent|>", "eot": "<|end-latent|>"}
# the order they join a vocabulary, as released (start, end, latent): the ids (GPT-2: 50257, 50258,
# 50259) and the marker rows of existing checkpoints stay as they are
COCONUT_SPECIAL_TOKENS = [COCONUT_MARKERS["bot"], COCONUT_MARKERS["eot"], COCONUT_MARKERS["latent"]]
# the word-level vocabulary's own special tokens (vocab.py): text holding one would be read as it
WORD_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
STEP_BY_STEP = " Let's think step by step."
ARC_INSTRUCTION = ("Let's think step by step first then print your answer like "
                   "'The answer is (one of the options)'.")
# the released SFT baseline's ARC prompts: the training instruction, and the format block its
# evaluation script puts before the question of an SFT checkpoint (prompt texts, kept verbatim so
# the numbers are comparable)
ARC_SFT_INSTRUCTION = ("Choose one from available options and return your answer like "
                       "`The answer is {final_answer}`.")
ARC_SFT_EVAL_FORMAT = """
The output MUST strictly follow the structure and format described below:

1. The answer should be strictly one of the options given in the question
2. Do not include any text after you choose an option.
**Example:**
Question: (question here)
Options: [option1, option2, option3]
The answer is: (one of the options).
"""
PROMPT_STYLES = ("cot", "sft", "sft_eval", "8shot")
# GSM8K's 8-shot evaluation prompt, in the released framing (its own eight examples are not ours):
# "Q: <question>" / "A: <rationale> The answer is <N>." blocks, a blank line between them, then the
# question and the CoT cue
GSM8K_SHOTS = [  # (question, rationale, answer): GSM8K training problems (rows of the first
    # 6,973, never the held-out val tail), the annotations <<...>> removed, one line each
    ('Sally sews 4 shirts on Monday, 3 shirts on Tuesday, and 2 shirts on Wednesday. Each shirt '
     'has 5 buttons. How many buttons does Sally need to sew all the shirts?',
     'Total number of shirts Sally sews is 4 + 3 + 2 = 9 shirts. The total number of buttons she '
     'needs is 9 x 5 = 45 buttons.',
     '45'),
    ('If 3 crows eat 30 worms in one hour, how many worms will 5 crows eat in 2 hours?',
     'If 3 crows eat 30 worms in one hour, then each crow eats 30/3=10 worms per hour. 5 crows '
     'will eat 5*10=50 worms per hour. Over two hours, 5 crows will eat 2*50=100 worms.',
     '100'),
    ('Bill is trying to count the toddlers at his daycare, but they keep running around. He '
     'double-counts 8 toddlers and misses 3 who are hiding. If Bill thinks he counted 26 '
     'toddlers, how many are there really?',
     'First subtract the 8 toddlers Bill double-counted from his count: 26 toddlers - 8 toddlers '
     '= 18 toddlers. Then add the 3 toddlers he missed to find the real count: 18 toddlers + 3 '
     'toddlers = 21 toddlers.',
     '21'),
    ('James buys 6 t-shirts for 50% off. They each cost $20. How much did he pay?',
     'Each shirt cost 20*.5=$10 with the sale. So he paid 10*6=$60.',
     '60'),
    ('Arthur has 3 dogs. They eat an average of 15 pounds of food a week. One dog eats 13 pounds '
     'a week. The second eats double this. How much does the third dog eat a week?',
     'The second dog eats 26 pounds a week because 13 x 2 = 26. In total they eat 45 pounds '
     'because 3 x 15 = 45. The third dog eats 6 pounds a week because 45 - 13 - 26 = 6.',
     '6'),
    ('How many portions of 200 ml milk can Jasmine pour from a full 2-liter container of milk?',
     'Since there are 1000 ml in 1 liter, then 2 liters is equal to 1000 x 2 = 2000 ml. Thus, '
     'Jasmine can pour 2000/200 = 10 portions of 200 ml milk.',
     '10'),
    ('The perimeter of a triangle is 160 cm. If two of the sides are 40 cm and 50 cm, calculate '
     'the length of the third side?',
     'To get the perimeter, you add all the sides o the triangles, so the first two sides add up '
     'to 40+50 = 90 cm. If the perimeter of the triangle is 160, the remaining side is 160-90 = '
     '70 cm.',
     '70'),
    ('An unusual bicycle has 20 spokes on the front wheel and twice as many spokes on the back '
     'wheel. How many spokes does the bicycle have?',
     'The back wheel has double the spokes the front wheel has, which means the back wheel has '
     '20*2=40 spokes. In total, the bicycle has 20+40=60 spokes.',
     '60'),
]
GSM8K_FEW_SHOT = "\n" + "\n\n".join(f"Q: {q}\nA: {r} The answer is {a}."
                                     for q, r, a in GSM8K_SHOTS) + "\n"

# -----------------------------------------------------------------------------
# text formats

def question_text(ex):
    """Coconut: the question line, `Q\\n`."""
    return ex["question"] + "\n"


def step_text(step):
    """Coconut: one language reasoning step per line."""
    return step + "\n"


def answer_text(ex):
    """Coconut: `### A` (the script appends eos as a token id, so no tokenizer ever has to spell
    it)."""
    return "### " + ex["answer"]


def arc_options_text(options, style="released"):
    """ARC options in the prompt. released: the Python list of the option texts, as the released
    prompt prints it (`['heat', 'wind']`); lettered: `(A) heat (B) wind` (lets the strict checker
    accept a letter answer)."""
    if style == "released":
        return str([text for _, text in options])
    if style == "lettered":
        return " ".join(f"({label}) {text}" for label, text in options)
    raise ValueError(f"arc_options={style!r}: use 'released' or 'lettered'")


def latro_prompt(ex, task, arc_options="released", style="cot", chat=True):
    """LaTRO: the user turn. style cot: the CoT prompt (ARC: the released multiple-choice template;
    every other task: question + the CoT suffix). sft: the released SFT baseline's training prompt
    (GSM8K: the bare question; ARC: the direct-answer instruction). sft_eval: the prompt the
    released evaluation gives an SFT checkpoint (GSM8K: the CoT prompt; ARC: the output-format
    block, then question and options). 8shot (GSM8K evaluation): eight worked examples first, as
    the released gsm8k_8shot lays them out in a chat turn (chat) or as plain text."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style {style!r}: use one of {PROMPT_STYLES}")
    if style == "8shot":
        cue = STEP_BY_STEP if chat else "\n" + STEP_BY_STEP.strip()
        return GSM8K_FEW_SHOT + "\n" + ex["question"] + cue
    if task == "arc":
        options = arc_options_text(ex["options"], arc_options)
        if style == "sft":
            return f"{ex['question']}\nOptions: {options}\n{ARC_SFT_INSTRUCTION}"
        if style == "sft_eval":
            return f"{ARC_SFT_EVAL_FORMAT}\nQuestion: {ex['question']}\nOptions: {options}\n"
        return f"Question: {ex['question']}\nOptions: {options}\n{ARC_INSTRUCTION}"
    if style == "sft":
        return ex["question"]
    return ex["question"] + STEP_BY_STEP


def sft_target(ex, task):
    """The released SFT baseline's assistant turn (the script appends the end-of-turn id). GSM8K:
    the solution with '####' read as 'The answer is' (no final period); ARC: the direct answer;
    other tasks: the gold steps, then the LaTRO answer sentence."""
    if task == "arc":
        return latro_answer(ex["answer"], task)
    if task == "gsm8k":
        return "\n".join(ex["steps"] + [f"The answer is {ex['answer']}"])
    return "\n".join(ex["steps"] + [latro_answer(ex["answer"])])


def latro_answer(gold, task="", text="released"):
    """LaTRO: the answer y whose likelihood is the reward (the script appends the end-of-turn token
    id). As released for GSM8K and ARC: the gold as written (GSM8K's thousands commas kept, an ARC
    option ending in '.' followed by a second one); text='clean' drops those commas and periods.
    Other tasks: a gold answer that is a sentence ("Tom is a lempus.") keeps one final period."""
    if task in ("gsm8k", "arc") and text == "released":
        return f"The answer is {gold}."
    if task == "gsm8k":
        gold = gold.replace(",", "")
    return f"The answer is {gold.rstrip('.')}."


# LaTRO: the released stop strings (trainer_config.stop_seqs), lowercase and tool-call phrasings.
# They are found in the decoded text: SentencePiece spells "The" after a newline as another piece
# than at the start of an encoded string, so matching the ids of encode(stop) misses it.
RELEASED_STOP_STRINGS = [
    "Answer:", " Answer:", "\nAnswer:",
    "The answer is", " The answer is", "\nThe answer is",
    "The answer is:", " The answer is:", "\nThe answer is:",
    " the answer is", "so the final answer is", "So, the answer is", "Therefore, the answer is",
    "The function call is:", "\nThe function call is:", "The function call is",
    "\nThe function call is", "the function call is",
]


def parse_stop_strings(spec):
    """'released' -> RELEASED_STOP_STRINGS; otherwise '|'-separated strings ('' = stop ids only)."""
    if spec == "released":
        return list(RELEASED_STOP_STRINGS)
    return [s for s in spec.split("|") if s]


def encode_prompts(tok, examples, task, arc_options, style):
    """LaTRO: the prompts x of examples, as token lists in the chat template (if the tokenizer
    has one)."""
    chat = bool(tok.hf.chat_template)
    return [tok.chat_prompt(latro_prompt(ex, task, arc_options, style, chat)) for ex in examples]


def encode_answers(tok, examples, task="", text="released"):
    """The answers y of examples: the tokens of "The answer is {gold}." (latro_answer) then
    end-of-turn."""
    return [tok.encode(latro_answer(ex["answer"], task, text)) + [tok.end_of_turn_id]
            for ex in examples]


def gold_rows(tok, examples, task, arc_options, style, answer_y="released"):
    """The warm-up's rows [x, z*, y] as token lists (xs, zs, ys): the prompt, the gold rationale
    (one step per line) and the answer y. The released SFT baseline (style 'sft') trains one target
    text, then end-of-turn."""
    xs = encode_prompts(tok, examples, task, arc_options, style)
    if style == "sft":
        return xs, [tok.encode(sft_target(ex, task)) for ex in examples], [[tok.end_of_turn_id]
                                                                           for _ in examples]
    zs = [tok.encode(latro_rationale(ex)) for ex in examples]
    return xs, zs, encode_answers(tok, examples, task, answer_y)




def latro_rationale(ex):
    """SFT warm-up / baseline: the gold rationale, one step per line."""
    return "\n".join(ex["steps"])


def example_fields(ex):
    """(field, text) of every text of an example a model reads: 'question', 'step 1', ...,
    'answer', and ARC's 'option A', ..."""
    yield "question", ex["question"]
    yield from ((f"step {i}", step) for i, step in enumerate(ex.get("steps", []), 1))
    yield "answer", ex["answer"]
    yield from ((f"option {label}", text) for label, text in ex.get("options", []))

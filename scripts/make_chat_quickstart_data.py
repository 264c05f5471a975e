"""Write the chat quickstart's data: sft_cli/assets/chat_quickstart/{train,val}.jsonl.

    python scripts/make_chat_quickstart_data.py          # deterministic: the same files every run

The task is a made-up answer format that SmolLM2-135M-Instruct does not use before fine-tuning (it answers
in prose): every reply is one JSON line, {"answer": "...", "confidence": "high"|"low"}. Questions with a
computable answer (arithmetic, the capital of a country from the table below, the day or month after
another) get the answer and "high"; questions nobody could answer from the prompt (the number I am thinking
of, tomorrow's weather) get "unknown" and "low". Format compliance is json.loads on the greedy reply.
val.jsonl holds prompts that train.jsonl does not: other numbers, other countries, other unknowable
questions, so it measures the format on new questions rather than recall.
"""

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "sft_cli" / "assets" / "chat_quickstart"

# ASCII spellings (Bogota, Brasilia) so the answers need no escapes; the last 10 are held out for val.jsonl
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("Ireland", "Dublin"), ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"), ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"), ("Cuba", "Havana"), ("Colombia", "Bogota"), ("the Czech Republic", "Prague"),
    ("Romania", "Bucharest"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"),
    ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"),
    # held out
    ("Portugal", "Lisbon"), ("India", "New Delhi"), ("Brazil", "Brasilia"), ("Chile", "Santiago"),
    ("Switzerland", "Bern"), ("Ukraine", "Kyiv"), ("Morocco", "Rabat"), ("New Zealand", "Wellington"),
    ("the United Kingdom", "London"), ("Nigeria", "Abuja"),
]
HELD_OUT = 10
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

ADD = ["What is {a} + {b}?", "Compute {a} + {b}.", "What is the sum of {a} and {b}?", "{a} plus {b} equals what?"]
SUB = ["What is {a} - {b}?", "Compute {a} minus {b}.", "What do you get if you subtract {b} from {a}?"]
MUL = ["What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}."]
CAPITAL = ["What is the capital of {country}?", "Which city is the capital of {country}?",
           "Name the capital city of {country}."]
NEXT_DAY = ["What day comes after {x}?", "If today is {x}, what day is tomorrow?"]
NEXT_MONTH = ["What month comes after {x}?", "Which month follows {x}?"]
# Unknowable: no answer can be computed from the prompt. The slot values differ between the files.
UNKNOWN = ["What number between 1 and {n} am I thinking of?", "What will the weather be in {city} on {day}?",
           "How many coins are in my pocket right now?", "What did I eat for breakfast on {day}?",
           "What will the price of {item} be next {month}?", "Who will knock on my door on {day}?",
           "What is the name of my {relative}?", "What card will I draw first from a shuffled deck?"]
CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Dublin", "Denver", "Leeds", "Porto", "Quito"]
ITEMS = ["bread", "gold", "coffee", "a used bicycle", "rice", "a train ticket", "apples", "petrol"]
RELATIVES = ["neighbour", "cousin", "dentist", "best friend", "grandmother", "landlord", "boss", "uncle"]


def reply(answer: str, confident: bool) -> str:
    return json.dumps({"answer": answer, "confidence": "high" if confident else "low"})


def example(question: str, answer: str, confident: bool = True) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": reply(answer, confident)}]}


def arithmetic(rng: random.Random, n_add: int, n_sub: int, n_mul: int) -> list[dict]:
    rows = []
    for _ in range(n_add):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        rows.append(example(rng.choice(ADD).format(a=a, b=b), str(a + b)))
    for _ in range(n_sub):
        a = rng.randint(10, 99)
        b = rng.randint(1, a)
        rows.append(example(rng.choice(SUB).format(a=a, b=b), str(a - b)))
    for _ in range(n_mul):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        rows.append(example(rng.choice(MUL).format(a=a, b=b), str(a * b)))
    return rows


def capitals(rng: random.Random, pairs: list[tuple[str, str]], per_country: int) -> list[dict]:
    return [example(template.format(country=country), capital)
            for country, capital in pairs for template in rng.sample(CAPITAL, per_country)]


def successors(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        names, templates = (DAYS, NEXT_DAY) if rng.random() < 0.5 else (MONTHS, NEXT_MONTH)
        i = rng.randrange(len(names))
        rows.append(example(rng.choice(templates).format(x=names[i]), names[(i + 1) % len(names)]))
    return rows


def unknowable(rng: random.Random, n: int, slots: dict[str, list], taken: set[str] = frozenset()) -> list[dict]:
    """n different questions (few slots: drawing n with repeats would leave few after unique())."""
    questions = []
    while len(questions) < n:
        values = {key: rng.choice(choices) for key, choices in slots.items()}
        question = rng.choice(UNKNOWN).format(**values)
        if question not in taken and question not in questions:
            questions.append(question)
    return [example(question, "unknown", confident=False) for question in questions]


def unique(rows: list[dict], taken: set[str] = frozenset()) -> list[dict]:
    """Drop repeated questions, and questions in `taken` (the training set's, for val)."""
    seen, out = set(taken), []
    for row in rows:
        question = row["messages"][0]["content"]
        if question not in seen:
            seen.add(question)
            out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    train_slots = {"n": [10, 20, 50, 100], "city": CITIES[:7], "day": DAYS[:5], "item": ITEMS[:5],
                   "month": MONTHS[:8], "relative": RELATIVES[:5]}
    val_slots = {"n": [30, 1000], "city": CITIES[7:], "day": DAYS[5:], "item": ITEMS[5:], "month": MONTHS[8:],
                 "relative": RELATIVES[5:]}
    train = unique(arithmetic(rng, 80, 40, 40) + capitals(rng, CAPITALS[:-HELD_OUT], 2) + successors(rng, 30)
                   + unknowable(rng, 60, train_slots))
    asked = {row["messages"][0]["content"] for row in train}
    val = unique(arithmetic(rng, 8, 4, 4) + capitals(rng, CAPITALS[-HELD_OUT:], 1) + successors(rng, 6)
                 + unknowable(rng, 12, val_slots, asked), taken=asked)
    rng.shuffle(train)
    rng.shuffle(val)

    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("val", val)):
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{path}: {len(rows)} conversations, {path.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()

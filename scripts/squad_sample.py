"""Write a small extractive-QA set in SQuAD v1.1 format, made from templates (a person, a city, a
job, a pet, a colour, a friend), for trying `method.objective=metric` on a causal LM offline: no
SQuAD files ship with the project, and the model's F1 on these short stories moves within minutes.

    python scripts/squad_sample.py /tmp/squad_sample          # train-v1.1.json (400), dev-v1.1.json (200)
    adazeta-train task=squad task.data_dir=/tmp/squad_sample method=mezo method.objective=metric

Every answer is a span of its context (answer_start is its offset), as in SQuAD.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Alice", "Bob", "Carmen", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Victor", "Wen", "Yusuf", "Zara"]
CITIES = ["Paris", "Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Cairo", "Toronto", "Hanoi", "Dublin", "Quito",
          "Krakow", "Perth", "Seville", "Tbilisi", "Bergen"]
JOBS = ["a baker", "a nurse", "a pilot", "an engineer", "a teacher", "a carpenter", "a chemist", "a lawyer",
        "a farmer", "a painter"]
PETS = ["a cat", "a parrot", "a dog", "a tortoise", "a rabbit", "a goldfish", "a hamster", "a horse"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]


def story(rng: random.Random, i: int) -> dict:
    """One SQuAD article: a three-sentence context and one question whose answer is a span of it."""
    person, friend = rng.sample(NAMES, 2)
    city, job, pet, colour = rng.choice(CITIES), rng.choice(JOBS), rng.choice(PETS), rng.choice(COLOURS)
    context = (f"{person} lives in {city} and works as {job}. {person} has {pet} and a {colour} bicycle. "
               f"On weekends, {person} visits {friend}, who lives nearby.")
    question, answer = rng.choice([
        (f"Where does {person} live?", city), (f"What is {person}'s job?", job),
        (f"What pet does {person} have?", pet), (f"What color is {person}'s bicycle?", colour),
        (f"Who does {person} visit on weekends?", friend),
    ])
    qa = {"id": f"s{i}", "question": question, "answers": [{"text": answer, "answer_start": context.find(answer)}]}
    return {"title": f"Story {i}", "paragraphs": [{"context": context, "qas": [qa]}]}


def write(out: Path, n_train: int = 400, n_dev: int = 200) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train-v1.1.json", n_train, 0), ("dev-v1.1.json", n_dev, 1)):
        rng = random.Random(seed)
        (out / name).write_text(json.dumps({"version": "1.1", "data": [story(rng, k) for k in range(n)]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder to write train-v1.1.json and dev-v1.1.json into")
    parser.add_argument("--train", type=int, default=400, help="questions in the train file")
    parser.add_argument("--dev", type=int, default=200, help="questions in the dev file")
    args = parser.parse_args()
    write(args.out, args.train, args.dev)
    print(f"wrote {args.out / 'train-v1.1.json'} ({args.train}) and {args.out / 'dev-v1.1.json'} ({args.dev})")


if __name__ == "__main__":
    main()

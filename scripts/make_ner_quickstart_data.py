"""Write the NER quickstart's data: sft_cli/assets/ner_quickstart/{train,dev,test}.conll, slices of WNUT-17.

    python scripts/make_ner_quickstart_data.py            # from ../shared/data/wnut17; the same files every run
    python scripts/make_ner_quickstart_data.py --wnut <folder with the WNUT-17 files> --out <folder>

WNUT-17 ("Emerging and Rare Entities", Derczynski et al. 2017, CC-BY 4.0) is noisy user text (tweets, Reddit,
YouTube) tagged in IOB2 with six types. Only a third of its training sentences hold an entity, so the train
slice takes 300 sentences that hold one and 100 that hold none (drawn at random, seed 0): a few hundred
sentences then carry enough entities to learn from in a couple of minutes on a CPU. dev and test are plain
random slices (100 sentences each) of the organisers' dev and test files, so their scores are honest ones on
WNUT-17's own mix. The files are written as token<TAB>tag lines with a blank line between sentences (the
original train file separates many sentences with a lone tab).
"""

import argparse
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "sft_cli" / "assets" / "ner_quickstart"
WNUT = ROOT.parent / "shared" / "data" / "wnut17"
SLICES = {  # name: (source file, sentences with an entity, sentences without; None: any, at random)
    "train": ("wnut17train.conll", 300, 100),
    "dev": ("emerging.dev.conll", None, 100),
    "test": ("emerging.test.annotated", None, 100),
}
SEED = 0
README = """# NER quickstart data: slices of WNUT-17

`sft-train +experiment=ner_quickstart` trains on these files. They are slices of the WNUT 2017 shared task
data on novel and emerging entity recognition (the organisers' files, repository leondz/emerging_entities_17),
made by `scripts/make_ner_quickstart_data.py` (deterministic, seed 0):

| file | from | sentences | tokens | entities |
|---|---|---|---|---|
{rows}

train.conll holds 300 training sentences with an entity and 100 without (the full train file has a third with
one); dev.conll and test.conll are plain random slices. Format: `token<TAB>tag`, IOB2, six types: person,
location, group, creative-work, corporation, product. The text is user-generated (tweets, Reddit, YouTube,
StackExchange) and is reproduced unchanged.

Licence: Creative Commons Attribution 4.0 International (CC-BY 4.0), https://creativecommons.org/licenses/by/4.0/
Changes: sentences selected as above, separators normalised to blank lines.

Cite: Leon Derczynski, Eric Nichols, Marieke van Erp, Nut Limsopatham. 2017. Results of the WNUT2017 Shared
Task on Novel and Emerging Entity Recognition. In Proceedings of the 3rd Workshop on Noisy User-generated Text
(W-NUT), EMNLP 2017, pages 140-147.
"""


def read_conll(path: Path) -> list[list[tuple[str, str]]]:
    """(token, tag) sentences; a line empty or of whitespace only (WNUT-17 uses a lone tab) ends a sentence."""
    sentences, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        columns = line.split()
        if not columns:
            if current:
                sentences.append(current)
            current = []
        else:
            current.append((columns[0], columns[-1]))
    if current:
        sentences.append(current)
    return sentences


def pick(sentences: list, with_entity: int | None, without: int, rng: random.Random) -> list:
    """`with_entity` sentences holding an entity and `without` holding none, or (with_entity None) `without`
    sentences of any kind; in file order."""
    if with_entity is None:
        return [sentences[i] for i in sorted(rng.sample(range(len(sentences)), without))]
    has = [i for i, s in enumerate(sentences) if any(tag != "O" for _, tag in s)]
    has_not = [i for i, s in enumerate(sentences) if all(tag == "O" for _, tag in s)]
    return [sentences[i] for i in sorted(rng.sample(has, with_entity) + rng.sample(has_not, without))]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wnut", type=Path, default=WNUT, help="the folder holding the WNUT-17 files")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, tags = [], {}
    for name, (source, with_entity, without) in SLICES.items():
        chosen = pick(read_conll(args.wnut / source), with_entity, without, random.Random(f"{SEED}-{name}"))
        tags[name] = {tag for s in chosen for _, tag in s}
        text = "\n".join("".join(f"{token}\t{tag}\n" for token, tag in s) for s in chosen)
        (args.out / f"{name}.conll").write_text(text, encoding="utf-8")
        entities = sum(tag.startswith("B-") for s in chosen for _, tag in s)
        rows.append(f"| {name}.conll | {source} | {len(chosen)} | {sum(map(len, chosen)):,} | {entities} |")
    unknown = (tags["dev"] | tags["test"]) - tags["train"]
    if unknown:  # sft-train refuses a val/test tag the training file never has
        raise SystemExit(f"dev/test hold tags train does not: {sorted(unknown)}; change SEED")
    (args.out / "README.md").write_text(README.format(rows="\n".join(rows)))
    print(f"wrote {', '.join(f'{n}.conll' for n in SLICES)} and README.md to {args.out}")


if __name__ == "__main__":
    main()

"""Tag schemes (IOB1, IOB2/BIO, BIOES): which one a file uses, and the entity spans a tag sequence holds."""

import re

TAG = re.compile(r"O|[BIES]-\S.*")
SCHEMES = ("IOB1", "IOB2", "BIOES")
SHOWN = {"IOB1": "IOB1 (an entity may start with I-)", "IOB2": "IOB2/BIO (every entity starts with B-)",
         "BIOES": "BIOES (E- ends an entity, S- is a single-word one)"}


def bad_tag(tag: str) -> str | None:
    """Why `tag` is not a tag of these schemes, or None."""
    if TAG.fullmatch(tag):
        return None
    return (f"has the tag {tag!r}, which is neither O nor B-, I-, E- or S- and an entity type (IOB1, IOB2/BIO or "
            "BIOES, e.g. B-PER)")


def evidence(tags: list[str]) -> dict[str, int]:
    """{scheme: index of the first tag that only that scheme writes} for one sentence: an entity starting with
    I- is IOB1; one starting with B- (after O or another type) is IOB2, or BIOES when E- or S- tags occur."""
    found: dict[str, int] = {}
    for i, tag in enumerate(tags):
        prev = tags[i - 1] if i else "O"
        continues = prev != "O" and prev[2:] == tag[2:]
        if tag[0] in "ES":
            found.setdefault("BIOES", i)
        elif tag[0] == "I" and not continues:
            found.setdefault("IOB1", i)
        elif tag[0] == "B" and not continues:
            found.setdefault("IOB2", i)
    if "BIOES" in found:
        found.pop("IOB2", None)  # BIOES entities start with B- too
    return found


def seqeval_scheme(scheme: str):
    from seqeval.scheme import IOB1, IOB2, IOBES

    return {"IOB1": IOB1, "IOB2": IOB2, "BIOES": IOBES}[scheme]


def spans(tags: list[str], scheme: str) -> list[tuple[str, int, int]]:
    """(type, first word, last word + 1) of every entity in `tags`, read strictly in `scheme` as seqeval's strict
    mode reads them (a sequence the scheme does not allow, such as I-PER after O in IOB2, is no entity)."""
    from seqeval.scheme import Entities

    entities = Entities([list(tags)], seqeval_scheme(scheme))
    return sorted(((e.tag, e.start, e.end) for e in entities.entities[0]), key=lambda e: (e[1], e[2]))

"""Instruction and chat files (JSONL, or a .json list) as tokenized train/val/test splits for causal-LM
fine-tuning, labelled to learn the responses only. The builder `chat_files` is the `_target_` of
configs/dataset/chat_files.yaml; `render_prompt` and `read_prompts` give sft-predict its prompts, rendered
exactly as training rendered them.

Three layouts, detected per file from its first valid record (or forced with dataset.format):
messages ({"messages": [{"role", "content"}, ...]}, rendered with a chat template), prompt_completion and
alpaca (rendered with a plain prompt format, then the response and EOS). Labels are found on token ids: the
tokens of the prompt alone (the conversation up to an assistant turn, with the generation prompt) must be a
prefix of the whole sequence's tokens, and the tokens after them, up to and including the turn's end-of-turn
token, are learned (tested against the Llama 3.1, Qwen2.5 and Gemma 3 templates: tests/test_chat_templates.py).
"""

import bisect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import to_absolute_path
from jinja2 import TemplateError, TemplateSyntaxError
from torch.utils.data import Dataset

from sft_cli.errors import SFTError, not_one_of
from sft_cli.models.hf import not_a_causal_lm
from sft_cli.task import Splits
from sft_cli.tasks.causal_lm import sources
from sft_cli.tasks.files import SKIP_HINT, existing_file, read_jsonl, read_rows, stratified_split
from sft_cli.tasks.tokens import TokenCache, fingerprint, load_tokenizer

log = logging.getLogger(__name__)

FORMATS = ("messages", "prompt_completion", "alpaca")
ROLES = ("system", "user", "assistant")
# ShareGPT records ({"conversations": [{"from": "human", "value": ...}, ...]}, as LLaMA-Factory and axolotl
# read them) are messages under other names: read as such when a record has no `messages` field
SHAREGPT = {"messages": "conversations", "role": "from", "content": "value"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # and "system"
TOOL_ROLES = ("tool", "function", "ipython", "observation", "function_call")  # turns sft-cli does not train on
FIELDS = {"messages": "messages", "role": "role", "content": "content", "prompt": "prompt",
          "completion": "completion", "instruction": "instruction", "input": "input", "output": "output"}
IGNORE = -100  # the label of a token that is not learned (torch's cross_entropy ignore_index)
# in the token cache's keys: entries labelled by an earlier rule are not reused (v2: a turn is learned up to
# its end-of-turn token, no longer the newline some templates write after it)
LABELS_VERSION = "chat-v2-"
# The default chat template (ChatML), for tokenizers without one; END is <|im_end|> when the tokenizer holds it
# as one token, else its EOS, so the model learns to end its turn with a token generation stops at.
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}@END@\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The Stanford Alpaca prompts, with and without an input
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass
class ChatSplits(Splits):
    """Splits of token sequences, plus what rendering a prompt for generation needs."""

    tokenizer: object = None  # the loaded tokenizer; for chat data, its chat_template is the one in use
    prompt_format: dict | None = None  # JSON-able: what render_prompt needs to render prompts as training did
    sample_prompts: list[str] = field(default_factory=list)  # up to 4 rendered validation prompts
    sample_references: list[str] = field(default_factory=list)  # their reference responses
    sample_questions: list[str] = field(default_factory=list)  # their last user turns, as written (for reports)
    # "val" / "test": each example's (parsed prompt part, reference response), in split order: what the task's
    # generated-answer metrics render (prompt_texts) and answer; rendered only for the examples judged
    references: dict[str, list[tuple]] = field(default_factory=dict)
    counts: dict = field(default_factory=dict)  # train file: examples (train split), truncated, dropped, skipped_rows


class TokenSequences(Dataset):
    """Examples as {"input_ids": [...], "labels": [...]} (same length; labels IGNORE where not learned)."""

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]]):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    def subset(self, indices: list[int]) -> "TokenSequences":
        return TokenSequences([self.input_ids[i] for i in indices], [self.labels[i] for i in indices])


class PackedSequences(Dataset):
    """Examples packed into rows of at most `capacity` tokens, by best-fit decreasing (longest first, each into
    the fullest row it still fits): {"input_ids", "labels", "position_ids", "examples"} per row. Positions
    restart at each example, which is how transformers' attention (SDPA, eager, flash) tells the examples
    of a row apart: its mask becomes block-diagonal causal when no attention_mask is given. The first label of
    each example is IGNORE, so no token is predicted from the example before it."""

    def __init__(self, examples: TokenSequences, capacity: int):
        self.examples = examples
        order = sorted(range(len(examples)), key=lambda i: -len(examples.input_ids[i]))
        rows: list[list[int]] = []
        room: list[tuple[int, int]] = []  # (tokens left, row), ascending: the best fit is found by bisection
        for i in order:
            n = len(examples.input_ids[i])
            k = bisect.bisect_left(room, (n, -1))  # the fullest row with n tokens left
            if k < len(room):
                left, r = room.pop(k)
                rows[r].append(i)
                bisect.insort(room, (left - n, r))
            else:
                rows.append([i])
                bisect.insort(room, (capacity - n, len(rows) - 1))
        self.rows = rows
        self.fill = 1 - sum(left for left, _ in room) / max(capacity * len(rows), 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> dict[str, list[int]]:
        input_ids, labels, positions = [], [], []
        for i in self.rows[r]:
            ids = self.examples.input_ids[i]
            input_ids += ids
            labels += [IGNORE] + list(self.examples.labels[i][1:])
            positions += range(len(ids))
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "examples": len(self.rows[r])}


class CausalCollate:
    """A DataLoader collate_fn: right-pads a batch to its longest sequence, giving ({input_ids, attention_mask},
    labels, counts) with IGNORE labels on the padding; counts: {examples, tokens} (not padding). Labels come
    from the items, never from input_ids == pad, so an EOS that is also the pad token is still learned. Packed
    rows (PackedSequences) get position_ids instead of an attention_mask; their padding continues the last
    example's positions, so no real token attends to it. With `flatten` (a flash attention model), packed rows
    are joined into one row without padding: the batch transformers hands to the variable-length kernel. A
    class, so workers can pickle it."""

    def __init__(self, pad_token_id: int, flatten: bool = False):
        self.pad_token_id = pad_token_id
        self.flatten = flatten

    def __call__(self, batch: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, int]]:
        packed = "position_ids" in batch[0]
        if packed and self.flatten:
            joined = {key: [v for item in batch for v in item[key]] for key in ("input_ids", "labels", "position_ids")}
            batch = [{**joined, "examples": sum(item["examples"] for item in batch)}]
        width = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(item["labels"], dtype=torch.long)
            if packed:
                mask[row, :n] = torch.tensor(item["position_ids"], dtype=torch.long)
                mask[row, n:] = torch.arange(width - n) + (mask[row, n - 1] + 1)
            else:
                mask[row, :n] = 1
        counts = {"examples": sum(item.get("examples", 1) for item in batch),
                  "tokens": sum(len(item["input_ids"]) for item in batch)}
        inputs = {"input_ids": input_ids, "position_ids" if packed else "attention_mask": mask}
        return inputs, labels, counts


def chat_files(train_file: str | None, tokenizer: str, val_file: str | None = None, test_file: str | None = None,
               format: str = "auto", fields: dict | None = None, max_length: int = 1024,
               val_size: float = 0.05, split_seed: int = 0, skip_bad_rows: bool = False,
               train_on_prompt: bool = False, chat_template: str | None = None, group_by_length: bool = False,
               cache_dir: str | None = None, packing: bool = False, train_files: list[str] | None = None,
               mix: list[float] | None = None, mix_seed: int = 0, hub: str | None = None,
               hub_config: str | None = None, hub_split: str = "train", hub_val_split: str | None = None,
               hub_test_split: str | None = None) -> ChatSplits:
    """Your chat or instruction data: one train file, several (`train_files`, mixed by the ratios `mix`: see
    sources.draw) or a hub dataset's splits (`hub`, sources.py). Validation is `val_file` (or `hub_val_split`) or
    a random `val_size` carved from train (from each train file alike); every example is tokenized once
    (cached), truncated to `max_length` and labelled to learn its responses (every assistant turn), or
    everything with `train_on_prompt`."""
    fields = _fields(fields)
    if format not in ("auto", *FORMATS):
        raise SFTError(not_one_of("dataset.format", format, ("auto", *FORMATS)))
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise SFTError(f"dataset.max_length={max_length!r} must be a whole number of tokens, at least 2")
    found = sources.find(train_file, train_files, mix, hub, hub_config, hub_split, hub_val_split, hub_test_split,
                         val_file, test_file)
    # every file is read and checked before the (slower) tokenizer load and tokenization
    files = {key: _read(file, key, format, fields, skip_bad_rows)
             for key, file in {**found.train, **found.val, **found.test}.items()}
    first = next(iter(found.train))
    fmt = files[first][1]
    for key, (path, other, _, _) in files.items():
        if other != fmt:  # one prompt format renders every split, and prediction
            raise SFTError(f"{key}={path} holds {other} records but {first} holds {fmt} records: give every "
                           "file in one layout.")
    if problem := not_a_causal_lm(to_absolute_path(tokenizer)):  # before its tokenizer's lack of an EOS is blamed
        raise SFTError(problem)  # dataset.tokenizer is model.name_or_path unless set apart
    tok = load_tokenizer(tokenizer)
    prompt_format = _prompt_format(tok, fmt, fields, chat_template)
    if fmt == "messages":
        tok.chat_template = prompt_format["chat_template"]
    how = Tokenizing(tok, prompt_format, max_length, train_on_prompt, skip_bad_rows, TokenCache(cache_dir))

    parts = {key: _tokenized(files[key][0], files[key][2], how) for key in found.train}
    train = TokenSequences([ids for part in parts.values() for ids in part[0].input_ids],
                           [labels for part in parts.values() for labels in part[0].labels])
    train_rows = [files[key][2][i] for key, part in parts.items() for i in part[1]]
    origin = [k for k, part in enumerate(parts.values()) for _ in part[1]]  # each example's train source
    counts = {name: sum(part[2][name] for part in parts.values()) for name in ("truncated", "dropped")}
    # rows that could not be read, then those that could not be tokenized
    skipped = {key: files[key][3] + part[2]["skipped_rows"] for key, part in parts.items()}
    counts["skipped_rows"] = sum(skipped.values())
    val_key, test_key = next(iter(found.val), None), next(iter(found.test), None)
    if val_key:
        path, _, rows, bad = files[val_key]
        val, val_kept, val_counts = _tokenized(path, rows, how)
        skipped[val_key] = bad + val_counts["skipped_rows"]
        val_rows = [rows[i] for i in val_kept]
    else:  # each train source's examples are a class: the same share of each is held out (one: a random slice)
        keep, held_out = stratified_split(origin, val_size, split_seed)
        val_rows = [train_rows[i] for i in held_out]
        train, val, origin = train.subset(keep), train.subset(held_out), [origin[i] for i in keep]
    mixed = {}
    if len(found.train) > 1:  # drawn once, here: a fixed list, so resuming within an epoch finds the same one
        train, mixed = sources.mixed(train, origin, {key: files[key][0] for key in found.train}, found.mix, mix_seed)
    test = None
    references = {"val": [_prompt_and_response(row[1], fmt) for row in val_rows]}
    if val_key and test_key and files[test_key][0].resolve() == files[val_key][0].resolve():
        test = val  # one file: the recipe then evaluates it once (train.test_best)
        references["test"] = references["val"]
    elif test_key:
        path, _, rows, bad = files[test_key]
        test, test_kept, test_counts = _tokenized(path, rows, how)
        skipped[test_key] = bad + test_counts["skipped_rows"]
        references["test"] = [_prompt_and_response(rows[i][1], fmt) for i in test_kept]
    samples = [_prompt_and_response(row[1], fmt) for row in val_rows[:4]]
    counts["examples"] = len(train)
    if packing:  # the training split only: validation scores the same examples either way
        train = PackedSequences(train, max_length)
        log.info(f"packing: {counts['examples']} training examples in {len(train)} rows of up to {max_length} "
                 f"tokens ({train.fill:.0%} full)")
    return ChatSplits(train, val, test, [], [], CausalCollate(tok.pad_token_id),
                      [len(ids) for ids in train.input_ids] if group_by_length and not packing else None,
                      {key: n for key, n in skipped.items() if n},
                      tokenizer=tok, prompt_format=prompt_format,
                      sample_prompts=[_render(tok, prompt_format, fmt, p) for p, _ in samples],
                      sample_references=[r for _, r in samples], counts=counts,
                      sample_questions=[_convert(p, fmt, "prompt_completion")["prompt"] for p, _ in samples],
                      references=references, mix=mixed)


def _fields(fields: dict | None) -> dict[str, str]:
    given = dict(fields or {})
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise SFTError(f"dataset.fields has the unknown key(s) {', '.join(unknown)}; its keys are: "
                       f"{', '.join(FIELDS)}")
    return {**FIELDS, **{k: str(v) for k, v in given.items() if v is not None}}


# ---- reading and checking records ------------------------------------------------------------------------


def _records(path: Path, key: str):
    """(location, record) per record of a .jsonl or .json (a list) file; a str record says why it is bad.
    The location is path:line, or path[index] for an item of a .json list."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for line, record in read_jsonl(path):
            yield f"{path}:{line}", record
        return
    if suffix != ".json":
        raise SFTError(f"{key}={path}: unknown format '{suffix}'. Use .jsonl (one JSON object per line) or .json "
                       "(a list of objects).")
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise SFTError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}). A .json file holds one "
                       "list of records; use .jsonl for one record per line.") from e
    if not isinstance(items, list):
        raise SFTError(f"{key}={path} holds a JSON {type(items).__name__}; a .json file must hold a list of "
                       "records (or use .jsonl, one record per line).")
    for i, record in enumerate(items):
        yield f"{path}[{i}]", record if isinstance(record, dict) else \
            f"is a JSON {type(record).__name__}, not an object"


def _layout(record: dict, fields: dict) -> str | None:
    """The layout a record is in, from the fields it has."""
    for fmt, key in (("messages", "messages"), ("prompt_completion", "prompt"), ("alpaca", "instruction")):
        if fields[key] in record:
            return fmt
    return "messages" if SHAREGPT["messages"] in record else None


def _string(record: dict, key: str, what: str, optional: bool = False) -> tuple[str | None, str | None]:
    """(problem, value) for the text field `key` of a record (a dict holding the file's field names)."""
    value = record.get(key)
    if value is None and optional:
        return None, ""
    if key not in record:
        return (f"has no {what}: no '{key}' among its fields {list(record)} (set dataset.fields.{what} to the "
                "one holding it)"), None
    if not isinstance(value, str):
        return f"has a non-string '{key}': {json.dumps(value)[:40]}", None
    if not value.strip() and not optional:
        return f"has an empty '{key}'", None
    return None, value


def _parse(record: dict, fmt: str, fields: dict, response: bool = True) -> tuple[str | None, object]:
    """(problem, None) for a bad record, else (None, the record in canonical keys): a list of {role, content}
    for messages, {prompt, completion} or {instruction, input, output}. Without `response`, a record needs
    only its prompt (prediction)."""
    if fmt == "messages":
        return _parse_messages(record, fields, response)
    wanted = ("prompt", "completion") if fmt == "prompt_completion" else ("instruction", "input", "output")
    parsed = {}
    for name in wanted:
        optional = name == "input" or (name in ("completion", "output") and not response)
        problem, value = _string(record, fields[name], name, optional)
        if problem:
            return problem, None
        parsed[name] = value
    return None, parsed


def _parse_messages(record: dict, fields: dict, response: bool) -> tuple[str | None, list | None]:
    """Each message's role and content, nothing else: OpenAI-style `name`, `tool_calls`, `function_call`,
    `tool_call_id` (and any other key) are ignored; a tool turn, or an assistant turn that only calls tools,
    is a bad record (sft-cli learns text replies)."""
    if fields["messages"] not in record and SHAREGPT["messages"] in record:
        fields = {**fields, **SHAREGPT}
    messages = record.get(fields["messages"])
    if fields["messages"] not in record:
        return f"has no '{fields['messages']}' among its fields {list(record)} (set dataset.fields.messages)", None
    if not isinstance(messages, list) or not messages:
        return f"has a '{fields['messages']}' that is not a non-empty list of messages", None
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"has a message {i} that is a JSON {type(message).__name__}, not an object", None
        role = message.get(fields["role"])
        role = SHAREGPT_ROLES.get(role, role) if fields["role"] == SHAREGPT["role"] else role
        if role in TOOL_ROLES:
            return (f"has a message {i} with the role {role!r}: tool turns are not supported (sft-cli learns text "
                    "replies; tool calls and their results are left out). Remove the tool turns from this record, "
                    "or set dataset.skip_bad_rows=true"), None
        if role not in ROLES:
            return (f"has a message {i} whose '{fields['role']}' is {role!r}, not one of: {', '.join(ROLES)} "
                    f"(set dataset.fields.role if the role is under another key)"), None
        if role == "assistant" and message.get(fields["content"]) is None and \
                (message.get("tool_calls") or message.get("function_call")):
            return (f"has an assistant message {i} that only calls tools (no '{fields['content']}'): tool calls are "
                    "not supported (sft-cli learns text replies). Remove the tool turns from this record, or set "
                    "dataset.skip_bad_rows=true"), None
        problem, content = _string(message, fields["content"], "content")
        if problem:
            return f"has a message {i} that {problem}", None
        parsed.append({"role": role, "content": content})
    if response and not any(m["role"] == "assistant" for m in parsed):
        return "has no assistant turn: nothing to learn", None
    if response and parsed[0]["role"] == "assistant":
        return "starts with an assistant turn: a user (or system) message must come first", None
    if not response and all(m["role"] == "assistant" for m in parsed):
        return "has no user or system message to answer", None
    return None, parsed


def _read(file: str, key: str, format: str, fields: dict, skip: bool):
    """(path, format, rows, skipped) with rows (location, parsed record); the format is `format`, or with auto
    the layout of the first valid record. Bad rows raise, or are skipped and counted. `file` may be a
    sources.HubSplit: its records are read as a file's."""
    hub = isinstance(file, sources.HubSplit)
    path = file if hub else existing_file(file, key)
    fmt = None if format == "auto" else format

    def parse(where: str, record: dict):
        nonlocal fmt
        if fmt is None and (fmt := _layout(record, fields)) is None:
            return (f"is in none of the layouts: it has no '{fields['messages']}', '{fields['prompt']}' or "
                    f"'{fields['instruction']}' among its fields {list(record)} (map your field names with "
                    "dataset.fields.*)"), None
        problem, parsed = _parse(record, fmt, fields)
        detected = f" (read as {fmt}: dataset.format={format})" if problem else ""
        return problem and problem + detected, (where, parsed)

    records = file.records() if hub else _records(path, key)
    rows, bad = read_rows(str(file), key, records, parse, skip, what="record")
    if not rows:
        why = f"all {bad} records are bad (skipped)" if bad else "it is empty"
        raise SFTError(f"{key}={file} holds no examples: {why}. Give a file of messages, prompt/completion or "
                       "instruction/output records.")
    return path, fmt, rows, bad


def _single_token(tok, text: str) -> bool:
    return len(tok(text, add_special_tokens=False)["input_ids"]) == 1


def _prompt_format(tok, fmt: str, fields: dict, chat_template: str | None) -> dict:
    """{format, fields, chat_template, prompt_template, prompt_template_no_input, end_of_turn}: everything
    render_prompt needs, saved with checkpoints."""
    if tok.eos_token is None:
        template = " and no chat template" if not getattr(tok, "chat_template", None) else ""
        raise SFTError(f"the tokenizer of {tok.name_or_path} has no eos_token{template}: a causal LM needs one to "
                       "learn where its answers end. Set \"eos_token\" in its tokenizer_config.json to the token "
                       "that ends a text (one in its vocabulary, such as \"</s>\" or \"<|endoftext|>\"), or point "
                       "model.name_or_path at a causal LM's own folder.")
    out = {"format": fmt, "fields": fields, "chat_template": None, "chat_template_source": None,
           "prompt_template": None, "prompt_template_no_input": None, "end_of_turn": tok.eos_token}
    if fmt == "prompt_completion":
        out["prompt_template"] = "{prompt}"
    elif fmt == "alpaca":
        out["prompt_template"], out["prompt_template_no_input"] = ALPACA, ALPACA_NO_INPUT
    else:
        out["chat_template"], out["chat_template_source"] = _chat_template(tok, chat_template)
        out["end_of_turn"] = _end_of_turn(tok, out["chat_template"], out["chat_template_source"])
        log.info(f"chat template: {out['chat_template_source']}; end of turn: {out['end_of_turn']!r}")
    return out


def _chat_template(tok, chat_template: str | None) -> tuple[str, str]:
    """(jinja text, a name for messages): a template file, the tokenizer's own (null), or the default ChatML
    (null and the tokenizer has none, or `default`)."""
    if chat_template not in (None, "default"):
        path = Path(to_absolute_path(str(chat_template)))
        if not path.is_file():
            raise SFTError(f"dataset.chat_template={chat_template}: no such file ({path}). Give a .jinja chat "
                           "template file, null (the tokenizer's own template) or default (ChatML).")
        try:
            return path.read_text(encoding="utf-8"), f"the chat template file {path}"
        except (OSError, UnicodeDecodeError) as e:
            raise SFTError(f"dataset.chat_template={chat_template}: could not read {path} ({e})") from e
    own = getattr(tok, "chat_template", None)
    if chat_template is None and own:
        return (own if isinstance(own, str) else tok.get_chat_template()), "the tokenizer's chat template"
    if _single_token(tok, "<|im_end|>"):
        return CHATML.replace("@END@", "<|im_end|>"), "the default ChatML template (end of turn <|im_end|>)"
    return CHATML.replace("@END@", "{{ eos_token }}"), "the default ChatML template (end of turn EOS)"


def _end_of_turn(tok, template: str, name: str) -> str:
    """The first special token the template writes after an assistant's content: where generation stops."""
    probe = "Probe answer 7."
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": probe}],
                                       chat_template=template, tokenize=False)
    except TemplateSyntaxError as e:  # no record can be rendered: the template itself is at fault, not a row
        raise SFTError(f"dataset.chat_template: {name} is not a valid Jinja template ({e.message}, at line "
                       f"{e.lineno}). Fix the template, or set dataset.chat_template=default (ChatML).") from e
    except (TemplateError, ValueError, TypeError) as e:  # the records' own rendering reports them by row
        log.warning(f"{name} could not render a user and an assistant message ({type(e).__name__}: "
                    f"{str(e)[:200]}); generation will stop at EOS")
        return tok.eos_token
    special = (set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))) - {tok.unk_token_id}
    for i in tok(text[text.rfind(probe) + len(probe):], add_special_tokens=False)["input_ids"]:
        if i in special:
            return tok.convert_ids_to_tokens(i)
    return tok.eos_token


def _prompt_and_response(parsed, fmt: str) -> tuple[object, str]:
    """(prompt part, reference response) of a parsed record: a chat without its final assistant turn(s), or
    the record without its completion / output."""
    if fmt != "messages":
        return parsed, parsed.get("completion") or parsed.get("output") or ""
    cut = len(parsed)
    while cut > 0 and parsed[cut - 1]["role"] == "assistant":
        cut -= 1
    return parsed[:cut], "\n".join(m["content"] for m in parsed[cut:])


def _convert(parsed, layout: str, fmt: str):
    """A parsed prompt part in `layout` as one in `fmt` (prediction may give any layout, or a plain string)."""
    if layout == fmt:
        return parsed
    if layout == "messages":
        users = [m["content"] for m in parsed if m["role"] == "user"]
        text = users[-1] if users else parsed[-1]["content"]
    else:
        text = parsed["prompt"] if "prompt" in parsed else \
            "\n\n".join(t for t in (parsed["instruction"], parsed["input"]) if t)  # prompt="" stays an empty turn
    return {"messages": [{"role": "user", "content": text}], "prompt_completion": {"prompt": text},
            "alpaca": {"instruction": text, "input": ""}}[fmt]


def _render(tok, prompt_format: dict, fmt: str, prompt) -> str:
    """The text of a prompt part, ending where the response starts (chat: with the generation prompt)."""
    if fmt == "messages":
        return tok.apply_chat_template(prompt, chat_template=prompt_format["chat_template"], tokenize=False,
                                       add_generation_prompt=True)
    template = prompt_format["prompt_template"]
    if fmt == "alpaca" and not prompt["input"].strip():
        template = prompt_format["prompt_template_no_input"]
    return template.format(**prompt)


def prompt_texts(tok, prompt_format: dict, prompt) -> tuple[str, str]:
    """(rendered, question) of a parsed prompt part (ChatSplits.references): the text generation continues,
    rendered as training rendered it, and the question as written (the last user turn, the prompt, or the
    instruction and its input)."""
    fmt = prompt_format["format"]
    return _render(tok, prompt_format, fmt, prompt), _convert(prompt, fmt, "prompt_completion")["prompt"]


def encode(tok, text: str) -> list[int]:
    """A rendered text's token ids, as generation tokenizes a prompt: with the tokenizer's special tokens (BOS)
    unless the text already starts with BOS (a chat template that writes it)."""
    bos = tok.bos_token
    return tok(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


# ---- tokenizing and labelling ----------------------------------------------------------------------------


def _texts(tok, prompt_format: dict, parsed) -> list[str]:
    """The texts of one record: the whole text, then for each response the text up to its start and (chat)
    up to its end: plain formats give [prompt + response, prompt], a chat two more per assistant turn."""
    fmt = prompt_format["format"]
    if fmt != "messages":
        prompt, response = _prompt_and_response(parsed, fmt)
        text = _render(tok, prompt_format, fmt, prompt)
        return [text + response, text]

    def render(messages, generation):
        return tok.apply_chat_template(messages, chat_template=prompt_format["chat_template"], tokenize=False,
                                       add_generation_prompt=generation)

    texts = [render(parsed, False)]
    for k, message in enumerate(parsed):
        if message["role"] == "assistant":
            texts += [render(parsed[:k], True), render(parsed[:k + 1], False)]
    return texts


def _label(tok, prompt_format: dict, parsed, train_on_prompt: bool) -> tuple[list, list, list]:
    """(input_ids, labels, learned: True on response tokens) for one record."""
    fmt = prompt_format["format"]
    try:
        texts = _texts(tok, prompt_format, parsed)
    except Exception as e:  # the chat template raised (e.g. roles that must alternate)
        raise _RowProblem(f"could not be rendered by the chat template ({type(e).__name__}: {str(e)[:200]})") from e
    ids = [encode(tok, t) for t in texts]
    full = ids[0]
    if fmt != "messages":
        prompt = ids[1]
        if full[:len(prompt)] != prompt:  # the prompt's last token merges with the response's first
            full = prompt + tok(texts[0][len(texts[1]):], add_special_tokens=False)["input_ids"]
        full = full + [tok.eos_token_id]
        spans = [(len(prompt), len(full))]
    else:
        spans = []
        end_of_turn = tok.convert_tokens_to_ids(prompt_format["end_of_turn"])
        end_of_turn = None if end_of_turn == tok.unk_token_id else end_of_turn
        for turn, (start, end) in enumerate(zip(ids[1::2], ids[2::2])):
            for text, part in ((texts[1 + 2 * turn], start), (texts[2 + 2 * turn], end)):
                if full[:len(part)] != part:
                    raise _RowProblem(_not_a_prefix(prompt_format["chat_template_source"], texts[0], text, turn))
            # a turn is learned up to its end-of-turn token: what the template writes after it (ChatML's and
            # Gemma's newline) is never generated, and belongs to the prompt of the turn that follows
            stop = next((i + 1 for i in range(len(start), len(end)) if full[i] == end_of_turn), len(end))
            spans.append((len(start), stop))
    learned = [False] * len(full)
    for start, end in spans:
        learned[start:end] = [True] * (end - start)
    labels = list(full) if train_on_prompt else [t if m else IGNORE for t, m in zip(full, learned)]
    return full, labels, learned


def _not_a_prefix(template: str, whole: str, part: str, turn: int) -> str:
    """Why a record cannot be masked by prefix: the text of the conversation up to its `turn`-th assistant turn
    is not how the whole conversation begins (the template rewrites or drops earlier turns once later ones
    follow), or it is, but its tokens are not the whole's first tokens (a token spans the turn's boundary)."""
    fix = ("Use a template that renders each turn the same whatever follows it: dataset.chat_template=default "
           "(ChatML) or dataset.chat_template=path/to/template.jinja")
    if whole.startswith(part):
        return (f"cannot be masked by prefix under {template}: its text up to assistant turn {turn + 1} begins the "
                "whole conversation, but its tokens do not (a token spans the end of the prompt and the start of "
                f"the response: end the generation prompt with a newline or a special token). {fix}")
    at = next((i for i, (a, b) in enumerate(zip(whole, part)) if a != b), min(len(whole), len(part)))
    return (f"cannot be masked by prefix under {template}: the conversation up to assistant turn {turn + 1} "
            f"renders as ...{part[max(0, at - 30):at + 30]!r}, but in the whole conversation as "
            f"...{whole[max(0, at - 30):at + 30]!r}: the template rewrites or drops earlier turns once later "
            "ones follow (as Qwen3's drops the reasoning of earlier assistant turns), so that turn's response is "
            f"not what follows its prompt in the whole conversation. {fix}")


class _RowProblem(Exception):
    """A record that reads well but cannot be tokenized; a bad row like the others."""


@dataclass(frozen=True)
class Tokenizing:
    """How every file of a run is tokenized."""

    tok: object
    prompt_format: dict
    max_length: int
    train_on_prompt: bool
    skip: bool  # dataset.skip_bad_rows
    cache: TokenCache


def _tokenized(path: Path, rows: list, how: Tokenizing) -> tuple[TokenSequences, list[int], dict]:
    """(examples, the indices of the rows kept, counts) for one file; cached per tokenizer, template, file
    version, settings and the rows read."""
    tok, prompt_format, max_length, train_on_prompt, skip, cache = (
        how.tok, how.prompt_format, how.max_length, how.train_on_prompt, how.skip, how.cache)
    file = cache.file(LABELS_VERSION, [fingerprint(tok), prompt_format, *sources.version(path, rows), max_length,
                                train_on_prompt, skip, [where for where, _ in rows]])
    saved = cache.load(file)
    if saved and saved.keys() >= {"input_ids", "labels", "kept", "counts"}:
        log.info(f"{path}: {len(saved['kept'])} examples, tokenized earlier ({file})")
        return TokenSequences(saved["input_ids"], saved["labels"]), saved["kept"], saved["counts"]
    input_ids, labels, kept, bad = [], [], [], []
    truncated = dropped = 0
    for i, (where, parsed) in enumerate(rows):
        try:
            ids, targets, learned = _label(tok, prompt_format, parsed, train_on_prompt)
        except _RowProblem as e:
            if not skip:
                raise SFTError(f"{where}: the record {e}. {SKIP_HINT}") from e
            bad.append((where, str(e)))
            continue
        if len(ids) > max_length:
            truncated += 1
            if not any(learned[:max_length]):
                dropped += 1
                continue
            ids, targets = ids[:max_length], targets[:max_length]
        input_ids.append(ids)
        labels.append(targets)
        kept.append(i)
    if kept and not train_on_prompt and not any(label != IGNORE for row in labels for label in row):
        # a chat template that never writes the assistant's content: every response is empty once rendered
        raise SFTError(f"{path}: no example has a response token to learn: {prompt_format['chat_template_source']} "
                       "never renders the assistant's content. Fix the template so that it writes each assistant "
                       "message, or set dataset.chat_template=default (ChatML).")
    if bad:
        log.warning(f"{path}: skipped {len(bad)} record(s) that could not be tokenized (dataset.skip_bad_rows=true); "
                    f"the first, {bad[0][0]}, {bad[0][1]}")
    if not kept:
        raise SFTError(f"{path}: no example is left: {dropped} of {len(rows)} have every response token beyond "
                       f"dataset.max_length={max_length} tokens (and {len(bad)} could not be tokenized). Raise "
                       "dataset.max_length, or shorten the prompts.")
    log.info(f"{path}: {len(kept)} examples ({prompt_format['format']}) tokenized; {truncated} truncated to "
             f"dataset.max_length={max_length}, {dropped} of them dropped (every response token cut)")
    if dropped:
        log.warning(f"{path}: dropped {dropped} example(s) whose response lies beyond dataset.max_length={max_length} "
                    "tokens; raise dataset.max_length to keep them")
    counts = {"examples": len(kept), "truncated": truncated, "dropped": dropped, "skipped_rows": len(bad)}
    cache.save(file, {"input_ids": input_ids, "labels": labels, "kept": kept, "counts": counts}, path)
    return TokenSequences(input_ids, labels), kept, counts


# ---- prediction ------------------------------------------------------------------------------------------


def render_prompt(tokenizer, prompt_format: dict, item) -> str:
    """A prompt rendered exactly as training rendered it, ending where the response starts (chat: with the
    generation prompt). `item` is a plain string (a user message, a prompt or an instruction) or a record in
    any of the three layouts (with the file's field names of prompt_format), whose response is ignored."""
    fmt = prompt_format["format"]
    if isinstance(item, str):
        return _render(tokenizer, prompt_format, fmt, _convert({"prompt": item}, "prompt_completion", fmt))
    layout = _layout(item, prompt_format["fields"])
    problem, parsed = ("has no prompt", None) if layout is None else \
        _parse(item, layout, prompt_format["fields"], response=False)
    if problem:
        raise SFTError(f"the prompt record {str(item)[:100]} {problem}")
    prompt, _ = _prompt_and_response(parsed, layout)
    return _render(tokenizer, prompt_format, fmt, _convert(prompt, layout, fmt))


def read_prompts(path: Path, prompt_format: dict) -> list:
    """The prompts of a .txt file (one per non-blank line) or of a .jsonl / .json file of records in any
    layout (responses ignored), for render_prompt; a bad record is an SFTError with its path:line."""
    path = Path(path)
    if not path.is_file():
        raise SFTError(f"input={path}: no such file")
    if path.suffix.lower() == ".txt":
        try:
            return [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise SFTError(f"input={path} could not be read as UTF-8 text ({e})") from e
    fields, items = prompt_format["fields"], []
    try:
        for where, record in _records(path, "input"):
            layout = None if isinstance(record, str) else _layout(record, fields)
            problem = record if isinstance(record, str) else \
                f"has none of the fields '{fields['messages']}', '{fields['prompt']}' or '{fields['instruction']}'" \
                if layout is None else _parse(record, layout, fields, response=False)[0]
            if problem:
                raise SFTError(f"{where}: the record {problem}. Give one prompt per line of a .txt file, or records "
                               "in the layout training used.")
            items.append(record)
    except (PermissionError, UnicodeDecodeError) as e:
        raise SFTError(f"input={path} could not be read ({e})") from e
    return items

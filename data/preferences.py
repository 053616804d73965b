"""Preference pairs: a prompt with a chosen and a rejected response (DPO, reward models).

User data is JSONL, one pair a line: {"prompt": "...", "chosen": "...", "rejected": "..."},
optionally with "system". The offline default (`bible_pairs`) turns the genealogy questions of
data/chat.py bible_qa into pairs: the chosen response is the right name, the rejected one the
answer of another question of the same kind (a plausible name, wrong here).

Both responses of a pair render in the chat format (data/chat.py), one conversation a row
(never packed: the two log-probabilities of a pair are compared), with the loss mask on the
response tokens and their closing <|end|>; the rows of a pair share an index.
"""
import dataclasses
import os

from data import chat, sources
from data.errors import DataError

HINT = ('each line must be {"prompt": "...", "chosen": "...", "rejected": "..."} '
        '(optionally with "system")')
ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two conversations with the same prompt turns and different last responses."""
    chosen: chat.Conversation
    rejected: chat.Conversation
    where: str = ""


def make_pair(prompt_turns, chosen: str, rejected: str, where: str) -> Pair:
    """A Pair of prompt_turns ((role, content), ...) answered by chosen and by rejected."""
    if chosen.strip() == rejected.strip():
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same text, so the pair "
                        "prefers nothing; give them different responses or drop the line")
    turns = tuple(prompt_turns)
    return Pair(chat.Conversation(turns + (("assistant", chosen),), where),
                chat.Conversation(turns + (("assistant", rejected),), where), where)


def read_pairs(path: str) -> list[Pair]:
    """The pairs of a JSONL file; every malformed line is a DataError naming it."""
    if not os.path.isfile(path):
        raise DataError(f"preference file {path} does not exist; check the path")
    content = sources.read_utf8(path)
    pairs = []
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        record = sources.parse_json_line(path, number, line)
        if not isinstance(record, dict):
            raise DataError(f"{where}: a JSON {type(record).__name__}, not an object; {HINT}")
        for key in ("prompt", "chosen", "rejected"):
            if key not in record:
                raise DataError(f"{where}: no {key!r} field; {HINT}")
        system = record.get("system") or ""
        for key in ("prompt", "chosen", "rejected", "system"):
            value = record.get(key) or ""
            if not isinstance(value, str):
                raise DataError(f"{where}: {key!r} must be a string, got "
                                f"{type(value).__name__}; {HINT}")
        for key in ("chosen", "rejected"):
            if not record[key].strip():
                raise DataError(f"{where}: {key!r} is empty; both responses need text")
        turns = ((("system", system),) if system.strip() else ()) + (("user", record["prompt"]),)
        pairs.append(make_pair(turns, record["chosen"], record["rejected"], where))
    if not pairs:
        raise DataError(f"{path} holds no pairs; {HINT}")
    return pairs


def wrong_answer_pairs(conversations: list[chat.Conversation]) -> list[Pair]:
    """Pairs of question-answer conversations: the gold answer chosen, rejected the answer of
    the next conversation of the same question kind that is none of this one's answers
    (conversations without such a neighbour give no pair)."""
    kind = chat.question_kind
    by_kind: dict[str, list[chat.Conversation]] = {}
    for conv in conversations:
        by_kind.setdefault(kind(conv), []).append(conv)
    out = []
    for conv in conversations:
        group = by_kind[kind(conv)]
        start = group.index(conv)
        others = (group[(start + k) % len(group)] for k in range(1, len(group)))
        wrong = next((o.answers[0] for o in others if o.answers[0] not in conv.answers), None)
        if wrong is not None:
            out.append(make_pair(conv.turns[:-1], conv.answers[0], wrong, conv.where))
    return out


def bible_pairs(db_path: str, version: str = "4") -> tuple[list[Pair], list[Pair]]:
    """(train, dev) pairs of the genealogy questions of data/chat.py bible_qa."""
    train, dev = chat.bible_qa(db_path, version)
    return wrong_answer_pairs(train), wrong_answer_pairs(dev)


def render_pairs(pairs: list[Pair], fmt, max_len: int) -> tuple[dict, dict]:
    """Rows chosen_<key> and rejected_<key> (data/chat.py pack's keys, one conversation a
    row, row i of both from pairs[i], rendered in the chat format `fmt`) and the figures of
    the chosen side."""
    rows, stats = {}, {}
    for side in ("chosen", "rejected"):
        examples = [(*fmt.render(getattr(p, side)), p.where) for p in pairs]
        side_rows, side_stats = chat.pack(examples, max_len, packing=False)
        rows.update({f"{side}_{key}": side_rows[key] for key in ROW_KEYS})
        stats[side] = side_stats
    return rows, {"pairs": len(pairs), "truncated": stats["chosen"]["truncated"] +
                  stats["rejected"]["truncated"]}


def side(batch: dict, name: str) -> dict:
    """The plain row keys of one side ("chosen" / "rejected") of a pair batch."""
    return {key: batch[f"{name}_{key}"] for key in ROW_KEYS}


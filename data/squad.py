"""Span question answering data: SQuAD (Devlin et al. 2018, sections 4.2 and 4.3).

A question and a context paragraph are packed as [CLS] question [SEP] context [SEP]; the model
predicts the first and last token of the answer span in the context (section 4.2). Contexts longer
than the row are cut into overlapping windows ("doc stride"), each a separate feature whose meta
records which context characters each row token covers and whether this window gives the token
its most context. SQuAD 2.0 (section 4.3) adds unanswerable questions: their span is the [CLS]
token. The no-answer threshold is chosen on questions held apart from training (holdout_split),
never on the dev set it is scored on. Turning logits back into answers and scoring them (exact
match, F1, the threshold) is data/squad_eval.py.

bible_squad builds a small SQuAD 2.0-format demo set from the default Bible corpus, so the
fine-tuning task runs without downloading SQuAD.
"""

import dataclasses
import hashlib
import json
import os
import random
import re
import sys

import numpy as np
import tqdm

from data import sources
from data import tokenizer as tok
from data.errors import DataError

_FORMAT_HINT = ("the file must follow the SQuAD format, {\"data\": [{\"title\", \"paragraphs\": "
                "[{\"context\", \"qas\": [{\"id\", \"question\", \"answers\": [{\"text\", "
                "\"answer_start\"}]}]}]}]} (https://rajpurkar.github.io/SQuAD-explorer/)")


@dataclasses.dataclass(frozen=True)
class QAExample:
    """One question about one context, with its gold answers (text, char offset in context)."""
    qid: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]
    is_impossible: bool


def _field(record, key: str, kind, where: str, path: str):
    """record[key], checked to be of type kind; a DataError naming the JSON path otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: {where} should be a JSON object, got "
                        f"{type(record).__name__}; {_FORMAT_HINT}")
    if key not in record:
        raise DataError(f"{path}: {where} has no {key!r} key; {_FORMAT_HINT}")
    value = record[key]
    # bool is a subclass of int: an answer_start of true is still wrong.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{path}: {where}.{key} should be {kind.__name__}, got "
                        f"{type(value).__name__}; {_FORMAT_HINT}")
    return value


def _parse_question(qa, context: str, where: str, path: str) -> QAExample:
    """One entry of a paragraph's "qas" list, its answers checked against the context."""
    qid = _field(qa, "id", str, where, path)
    question = _field(qa, "question", str, where, path)
    is_impossible = qa.get("is_impossible", False)  # absent in v1.1: every question answerable
    if not isinstance(is_impossible, bool):
        raise DataError(f"{path}: {where}.is_impossible should be true or false")
    answers = []
    for i, answer in enumerate(_field(qa, "answers", list, where, path)):
        text = _field(answer, "text", str, f"{where}.answers[{i}]", path)
        start = _field(answer, "answer_start", int, f"{where}.answers[{i}]", path)
        if not text.strip():
            raise DataError(f"{path}: question {qid!r} ({where}.answers[{i}]) has an empty "
                            "answer text; give the answer's text, or mark the question "
                            "is_impossible with no answers")
        found = context[start:start + len(text)] if start >= 0 else ""
        if found != text:
            raise DataError(
                f"{path}: question {qid!r} ({where}.answers[{i}]): the answer {text!r} is not at "
                f"answer_start={start} of its context (that position holds {found!r}); fix "
                "answer_start, which counts characters (not bytes) from the context's start")
        answers.append((text, start))
    if is_impossible and answers:
        raise DataError(f"{path}: question {qid!r} is marked is_impossible but has answers; "
                        "remove them (SQuAD 2.0 keeps them under plausible_answers)")
    return QAExample(qid, question, context, tuple(answers), is_impossible)


def parse_squad(data, path: str = "<squad data>") -> list[QAExample]:
    """Examples of SQuAD v1.1 / v2.0 JSON already loaded into Python (path names it in errors)."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level should be a JSON object; {_FORMAT_HINT}")
    examples, seen = [], set()
    for a, article in enumerate(_field(data, "data", list, "the top level", path)):
        paragraphs = _field(article, "paragraphs", list, f"data[{a}]", path)
        for p, paragraph in enumerate(paragraphs):
            where = f"data[{a}].paragraphs[{p}]"
            context = _field(paragraph, "context", str, where, path)
            for q, qa in enumerate(_field(paragraph, "qas", list, where, path)):
                example = _parse_question(qa, context, f"{where}.qas[{q}]", path)
                # Predictions are keyed by id, so a repeated id would silently lose one.
                if example.qid in seen:
                    raise DataError(f"{path}: question id {example.qid!r} occurs twice; ids "
                                    "must be unique")
                seen.add(example.qid)
                examples.append(example)
    return examples


def read_squad(path: str) -> list[QAExample]:
    """Examples of a SQuAD v1.1 or v2.0 JSON file."""
    if not os.path.isfile(path):
        raise DataError(f"SQuAD file {path} does not exist; check the path (SQuAD itself is at "
                        "https://rajpurkar.github.io/SQuAD-explorer/)")
    text = sources.read_utf8(path)  # the project's UTF-8 check, naming the bad byte
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); fix the file "
                        "or download it again") from None
    return parse_squad(data, path)


def _answer_tokens(answer, spans) -> tuple[int, int] | None:
    """(first, last) context token of the smallest token span covering the answer characters."""
    text, start = answer
    end = start + len(text)
    # A token belongs to the span if it shares at least one character with the answer; pieces
    # with an empty span (a lone "▁") share none. When a piece straddles an answer boundary
    # ("kings" for the answer "king") the whole piece is taken: the model can only point at
    # tokens, and squad_eval.postprocess then returns the covering text.
    inside = [i for i, (s, e) in enumerate(spans) if s < e and s < end and e > start]
    return (inside[0], inside[-1]) if inside else None


def _windows(n_tokens: int, max_window: int, doc_stride: int) -> list[tuple[int, int]]:
    """(start, length) of the context windows: doc_stride apart, the last reaching the end."""
    windows, start = [], 0
    while True:
        length = min(max_window, n_tokens - start)
        windows.append((start, length))
        if start + length >= n_tokens:
            return windows
        # min(): a stride longer than the window would otherwise skip tokens.
        start += min(doc_stride, length)


def _max_context(windows, window: int, position: int) -> bool:
    """Whether windows[window] gives context token `position` the most context on both sides."""
    # The reference rule: a token's context in a window is the smaller of its left and right
    # neighbour counts, plus a small bonus for longer windows; the first window wins ties.
    best, best_score = None, -1.0
    for w, (start, length) in enumerate(windows):
        if not start <= position < start + length:
            continue
        score = min(position - start, start + length - 1 - position) + 0.01 * length
        if score > best_score:
            best, best_score = w, score
    return best == window


def _example_features(index, example, question_ids, context_tokens, max_len, doc_stride,
                      cls_sep):
    """Rows and meta of one example's windows, as lists of per-feature tuples."""
    ids, spans = context_tokens
    cls, sep = cls_sep
    max_window = max_len - len(question_ids) - 3  # [CLS], [SEP], [SEP]
    span = _answer_tokens(example.answers[0], spans) if example.answers else None
    windows = _windows(len(ids), max_window, doc_stride)
    # A row, with q question tokens and a window of n context tokens [start, start + n):
    #   0: [CLS] | 1..q: question | q+1: [SEP] | q+2..q+1+n: context | q+2+n: [SEP] | padding
    # so context token i sits at row index offset + i - start, and the answer's token span
    # (context indices) moves by the same amount.
    offset = len(question_ids) + 2
    features = []
    for w, (start, length) in enumerate(windows):
        row = [cls, *question_ids, sep, *ids[start:start + length], sep]
        types = [0] * offset + [1] * (length + 1)
        token_to_char = [None] * max_len
        max_context = [False] * max_len
        for i in range(start, start + length):
            token_to_char[offset + i - start] = spans[i]  # shared, not copied, per window
            max_context[offset + i - start] = _max_context(windows, w, i)
        # The answer must lie wholly in the window; a window holding only part of it points
        # at [CLS] like an unanswerable question, as in the reference implementation.
        if span and start <= span[0] and span[1] < start + length:
            positions = (offset + span[0] - start, offset + span[1] - start)
        else:
            positions = (0, 0)
        meta = {"example_index": index, "token_to_char": token_to_char,
                "max_context": max_context}
        features.append((row, types, positions, meta))
    return features


def squad_features(
    examples, tokenizer, *, max_len: int, doc_stride: int, max_query_len: int, train: bool
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Fixed-length rows, one per context window, and per-row meta for squad_eval.postprocess."""
    # Training and eval rows are built the same way (eval keeps its positions, e.g. for a dev
    # loss); train=True only insists that every answerable question has a gold answer.
    if doc_stride <= 0 or max_query_len <= 0:
        raise DataError(f"doc_stride ({doc_stride}) and max_query_len ({max_query_len}) must be "
                        "positive")
    if max_len - max_query_len - 3 <= 0:
        raise DataError(f"max_len={max_len} leaves no room for context after a question of up "
                        f"to max_query_len={max_query_len} tokens; raise max_len or lower "
                        "max_query_len")
    cls_sep = tok.required_ids(tokenizer, "cls", "sep", purpose="span question answering")
    # Contexts repeat (one per paragraph, many questions each): each is tokenized once, and its
    # (start, end) tuples are shared by all its features' meta, which keeps meta small.
    context_cache = {}
    rows = []
    progress = tqdm.tqdm(examples, desc="squad features", unit="question",
                         disable=not sys.stderr.isatty())
    for index, example in enumerate(progress):
        if train and not example.is_impossible and not example.answers:
            raise DataError(f"question {example.qid!r} is answerable but has no gold answer, so "
                            "it cannot be trained on; add its answers or mark it is_impossible")
        if example.context not in context_cache:
            ids, starts, ends = tokenizer.encode_with_offsets(example.context)
            context_cache[example.context] = ids, list(zip(starts, ends))
        question_ids = tokenizer.encode(example.question)[:max_query_len]
        rows.extend(_example_features(index, example, question_ids,
                                      context_cache[example.context], max_len, doc_stride,
                                      cls_sep))
    n = len(rows)
    arrays = {name: np.zeros((n, max_len), np.int32)
              for name in ("inputs", "token_types", "segment_ids")}
    arrays["start_positions"] = np.zeros(n, np.int32)
    arrays["end_positions"] = np.zeros(n, np.int32)
    arrays["example_weights"] = np.ones(n, np.float32)
    for f, (row, types, (start, end), _) in enumerate(rows):
        arrays["inputs"][f, :len(row)] = row
        arrays["token_types"][f, :len(types)] = types
        arrays["segment_ids"][f, :len(row)] = 1
        arrays["start_positions"][f] = start
        arrays["end_positions"][f] = end
    return arrays, [meta for *_, meta in rows]


def holdout_split(examples, fraction: float):
    """(kept, held apart): every context in about `fraction` of them held apart with all its
    questions, chosen by a hash of the text (the same split on every run and machine)."""
    if fraction <= 0:
        return list(examples), []
    held = {context for context in {e.context for e in examples}
            if int(hashlib.sha256(context.encode("utf-8")).hexdigest()[:8], 16)
            < fraction * 16 ** 8}
    return ([e for e in examples if e.context not in held],
            [e for e in examples if e.context in held])


# bible_squad: a demo QA set from the default corpus.

# Held-out books for the dev split, whole books so no context is in both splits: Ruth (8), Ezra
# (15), Nehemiah (16), Jonah (32) and Philemon (57), about a tenth of the questions. Ruth, Jonah
# and Philemon are data/sources.py's eval books, so a BERT pretrained on that train split never
# read them; its test books (Obadiah, 2 John) are in neither split here either.
BIBLE_QA_DEV_BOOKS = (8, 15, 16, 32, 57)
_VERSES_PER_CONTEXT = 8  # ~200-400 tokens: several windows at max_len 128, some at 256

# A person or place: a capitalised word, possibly hyphenated ("Adoni-zedek", "Paddan-aram").
_NAME = r"[A-Z][a-z]+(?:-[a-z]+)?"
# Capitalised words that start sentences or clauses and would otherwise pass as names.
_NOT_NAMES = frozenset(
    "The He She It They And But Now Then When Of In To So For This That These Those His Her "
    "Their All Behold Also Yet Let Be Go From Is Are Am Was Were I We You My Your Our Who What "
    "After Before As By With At On There Here Son Sons King".split())
# (pattern, question) pairs for what WEB actually says: "X became the father of Y" (Y often a
# list "A, B, and C", each name a gold answer), "X the son of Y" or "X, the son of Y", the same
# with "daughter", and "X king of Y" or "X, king of Y". The answer y sits in a lookahead so it
# can also be the x of the next match in a chain ("Elkanah the son of Jeroham the son of Elihu");
# "(?! became)" ends a list before "A, and A became the father of B".
_RELATIONS = (
    (re.compile(rf"\b(?P<x>{_NAME}) became the father of "
                rf"(?=(?P<y>{_NAME}(?:, {_NAME})*(?:,? and {_NAME})?)\b(?! became))"),
     "Who did {} become the father of?"),
    (re.compile(rf"\b(?P<x>{_NAME}),? the son of (?=(?P<y>{_NAME})\b)"), "Whose son was {}?"),
    (re.compile(rf"\b(?P<x>{_NAME}),? the daughter of (?=(?P<y>{_NAME})\b)"),
     "Whose daughter was {}?"),
    (re.compile(rf"\b(?P<x>{_NAME}),? king of (?=(?P<y>{_NAME})\b)"), "What was {} king of?"),
)


def _bible_contexts(db_path: str, version: str) -> list[tuple[int, int, int, str]]:
    """(book, chapter, first verse, text) of runs of ~_VERSES_PER_CONTEXT verses in a chapter."""
    chapters: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for book, chapter, verse, text in sources.read_bible_verses(db_path, version):
        chapters.setdefault((book, chapter), []).append((verse, text))
    contexts = []
    for (book, chapter), verses in chapters.items():
        runs = [verses[i:i + _VERSES_PER_CONTEXT]
                for i in range(0, len(verses), _VERSES_PER_CONTEXT)]
        if len(runs) > 1 and len(runs[-1]) < _VERSES_PER_CONTEXT // 2:
            runs[-2:] = [runs[-2] + runs[-1]]  # no stub contexts of a verse or two
        for run in runs:
            contexts.append((book, chapter, run[0][0], " ".join(text for _, text in run)))
    return contexts


def relation_questions(context: str) -> list[tuple[str, str, list[dict]]]:
    """(person, question, answers) for each person the context states a relation of."""
    found: dict[tuple[int, str], dict[str, int]] = {}
    for r, (pattern, _) in enumerate(_RELATIONS):
        for match in pattern.finditer(context):
            person = match["x"]
            if person in _NOT_NAMES:
                continue
            answers = found.setdefault((r, person), {})
            # Each name of a list is its own gold answer, at its own offset.
            for name in re.finditer(_NAME, match["y"]):
                if name[0] not in _NOT_NAMES and name[0] != person:
                    answers.setdefault(name[0], match.start("y") + name.start())
    # Every distinct answer stated in the context is gold (e.g. two men named Zechariah); the
    # first in the text is the one training points at.
    return [(person, _RELATIONS[r][1].format(person),
             [{"text": text, "answer_start": start}
              for text, start in sorted(answers.items(), key=lambda item: item[1])])
            for (r, person), answers in found.items() if answers]


def _bible_split(contexts, seed: int) -> dict:
    """SQuAD v2.0 JSON of contexts: their questions, and no-answer copies in other chapters."""
    rng = random.Random(seed)
    qas: list[list[dict]] = [[] for _ in contexts]
    n_questions = 0
    for c, (book, chapter, verse, text) in enumerate(contexts):
        for k, (person, question, answers) in enumerate(relation_questions(text)):
            qid = f"{book}-{chapter}-{verse}-{k}"
            qas[c].append({"id": qid, "question": question, "answers": answers,
                           "is_impossible": False})
            n_questions += 1
            if n_questions % 2:
                continue
            # Every second question is also asked of a context from another chapter that never
            # names the person, so a third of all questions have no answer (SQuAD 2.0).
            for _ in range(100):
                other = rng.randrange(len(contexts))
                o_book, o_chapter, _, o_text = contexts[other]
                if ((o_book, o_chapter) != (book, chapter)
                        and not re.search(rf"\b{re.escape(person)}\b", o_text)):
                    qas[other].append({"id": f"{qid}-none", "question": question,
                                       "answers": [], "is_impossible": True})
                    break
    articles: dict[tuple[int, int], list[dict]] = {}
    for (book, chapter, _, text), questions in zip(contexts, qas):
        if questions:
            articles.setdefault((book, chapter), []).append(
                {"context": text, "qas": questions})
    return {"version": "v2.0", "data": [
        {"title": f"book {book} chapter {chapter}", "paragraphs": paragraphs}
        for (book, chapter), paragraphs in articles.items()]}


def bible_squad(db_path: str, version: str = "4") -> tuple[dict, dict]:
    """(train, dev) SQuAD v2.0 JSON of relation questions about the Bible; dev is whole books."""
    contexts = _bible_contexts(db_path, version)
    train = [c for c in contexts
             if c[0] not in BIBLE_QA_DEV_BOOKS and c[0] not in sources.TEST_BOOKS]
    dev = [c for c in contexts if c[0] in BIBLE_QA_DEV_BOOKS]
    if not train or not dev:
        raise DataError(f"{db_path} lacks the training books or the dev books "
                        f"{BIBLE_QA_DEV_BOOKS}; delete it so the full database is fetched again")
    splits = _bible_split(train, seed=0), _bible_split(dev, seed=1)
    if not all(split["data"] for split in splits):
        raise DataError(f"Bible version {version!r} gives no questions: the patterns follow the "
                        "World English Bible's wording; use version '4'")
    return splits

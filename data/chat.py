"""Supervised fine-tuning (SFT) data for GPT: conversations, the chat format, loss masks, packing.

SFT trains a pretrained LM on demonstrations (Ouyang et al. 2022, section 3.5; Wei et al. 2022,
FLAN) with the ordinary next-token loss, but only on what the assistant says: the prompt is read,
never learned. A conversation is rendered as

  [BOS] <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

where the four chat tokens are *special* tokens added to the base run's vocabulary: plain text
never produces them, so a user who types "<|user|>" cannot fake a turn, and every turn's content
is encoded on its own. The loss mask is 1 on the assistant's content and its closing <|end|> (so
the model learns to stop), 0 elsewhere. Rendered conversations are packed into rows of exactly
data/lm.pack_rows's arrays, so GPT's LM loss and data/lm.make_iterator run unchanged.

Data: the user's JSONL ({"prompt", "response"} or {"messages": [...]}) or prompt<TAB>response
TSV, or bible_qa, free-form genealogy questions about one Bible verse (the facts data/squad.py
finds), with whole books held out for dev.
"""

import dataclasses
import os

import numpy as np

from data import sources, squad, squad_eval
from data import tokenizer as tok
from data.errors import DataError

ROLES = ("system", "user", "assistant")
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
_TOKEN_NAMES = ("system", "user", "assistant", "end")  # keys of chat_token_ids, CHAT_TOKENS order
# Plain text whose mean embedding starts each new token's row (new_token_inits).
_INIT_TEXT = {"system": "System:", "user": "User:", "assistant": "Assistant:"}

_JSONL_HINT = ('each line must be {"prompt": "...", "response": "..."} (optionally with "system") '
               'or {"messages": [{"role": "user", "content": "..."}, '
               '{"role": "assistant", "content": "..."}]}')
_TSV_HINT = "each line must be prompt<TAB>response (an optional first line prompt<TAB>response)"


@dataclasses.dataclass(frozen=True)
class Conversation:
    """(role, content) turns; where names the source ("path:line") in messages; answers are all
    acceptable final answers (default: the last assistant content), for exact match / F1."""

    turns: tuple[tuple[str, str], ...]
    where: str = ""
    answers: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.answers:
            said = [content for role, content in self.turns if role == "assistant"]
            object.__setattr__(self, "answers", tuple(said[-1:]))


# ---- reading ----------------------------------------------------------------------------------

def read_conversations(path: str) -> list[Conversation]:
    """Conversations of a JSONL file (.jsonl / .json) or a prompt<TAB>response TSV (any other)."""
    if not os.path.isfile(path):
        raise DataError(f"conversation file {path} does not exist; check the path")
    content = sources.read_utf8(path)
    jsonl = path.endswith((".jsonl", ".json"))
    hint = _JSONL_HINT if jsonl else _TSV_HINT
    if not content.strip():
        raise DataError(f"{path} is empty; it needs one conversation per line: {hint}")
    # split("\n"), not splitlines(): line numbers must match what an editor shows.
    lines = content.split("\n")
    if jsonl:
        conversations = [_jsonl_conversation(path, n, line)
                         for n, line in enumerate(lines, start=1) if line.strip()]
    else:
        conversations = _tsv_conversations(path, lines)
    if not conversations:
        raise DataError(f"{path} has a header but no conversations; {hint}")
    return conversations


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _jsonl_conversation(path: str, line_number: int, line: str) -> Conversation:
    """The Conversation of one JSONL line, in either format."""
    record = sources.parse_json_line(path, line_number, line)
    where = f"{path}:{line_number}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON {_kind(record)}, not an object; {_JSONL_HINT}")
    if "messages" in record:
        if "prompt" in record or "response" in record:
            raise DataError(f"{where}: has both 'messages' and 'prompt'/'response'; keep one "
                            "format per line")
        return Conversation(_message_turns(record["messages"], where), where)
    if "prompt" not in record and "response" not in record:
        raise DataError(f"{where}: neither a prompt/response nor a messages record (its fields: "
                        f"{', '.join(sorted(record)[:8]) or 'none'}); {_JSONL_HINT}")
    for key in ("prompt", "response"):
        if key not in record:
            raise DataError(f"{where}: no {key!r} field; {_JSONL_HINT}")
    system = record.get("system")  # absent or null: no system turn
    for key, value in (("prompt", record["prompt"]), ("response", record["response"]),
                       ("system", "" if system is None else system)):
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, got {_kind(value)}; "
                            f"{_JSONL_HINT}")
    if not record["response"].strip():
        raise DataError(f"{where}: the response is empty; every conversation needs a "
                        "non-empty response to train on (fill it in or delete the line)")
    turns = [("system", system)] if system and system.strip() else []
    turns += [("user", record["prompt"]), ("assistant", record["response"])]
    return Conversation(tuple(turns), where)


def _message_turns(messages, where: str) -> tuple[tuple[str, str], ...]:
    """(role, content) of a "messages" list, checked."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", "
                        f"\"content\"}} objects; {_JSONL_HINT}")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: messages[{i}] is not an object with 'role' and "
                            f"'content'; {_JSONL_HINT}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}] has role {role!r}; use one of "
                            f"{', '.join(map(repr, ROLES))}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content must be a string, got "
                            f"{_kind(content)}; {_JSONL_HINT}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: messages[{i}] is an empty assistant message; fill it in "
                            "or delete it (the assistant's words are what is trained on)")
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: the messages have no assistant turn, so nothing in them would "
                        "be trained on; add the assistant's answer or delete the line")
    if turns[-1][0] != "assistant":
        raise DataError(f"{where}: the last message is a {turns[-1][0]} message; end with the "
                        "assistant's answer (nothing after it is trained on)")
    return tuple(turns)


def _tsv_conversations(path: str, lines: list[str]) -> list[Conversation]:
    """One user/assistant conversation per prompt<TAB>response line."""
    conversations, first = [], True
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if first and [f.strip().lower() for f in fields] == ["prompt", "response"]:
            first = False
            continue  # the header
        first = False
        where = f"{path}:{line_number}"
        if len(fields) != 2:
            raise DataError(f"{where}: {len(fields)} tab-separated columns, expected 2 "
                            "(prompt<TAB>response); replace tabs inside a text by spaces, or use "
                            "JSONL for texts with tabs or line breaks")
        if not fields[1].strip():
            raise DataError(f"{where}: the response is empty; every conversation needs a "
                            "non-empty response to train on (fill it in or delete the line)")
        conversations.append(Conversation((("user", fields[0]), ("assistant", fields[1])), where))
    return conversations


# ---- chat tokens ------------------------------------------------------------------------------

def _find_chat_ids(tokenizer) -> dict[str, int]:
    """{name: id} of the chat tokens among the tokenizer's *special* ids (maybe incomplete)."""
    pieces = {tokenizer.id_to_piece(i): i for i in tokenizer.special_ids}
    return {name: pieces[token] for name, token in zip(_TOKEN_NAMES, CHAT_TOKENS)
            if token in pieces}


def chat_token_ids(tokenizer) -> dict[str, int]:
    """{"system", "user", "assistant", "end"} -> id; a DataError when the vocabulary lacks them."""
    ids = _find_chat_ids(tokenizer)
    if len(ids) < len(CHAT_TOKENS):
        missing = [t for name, t in zip(_TOKEN_NAMES, CHAT_TOKENS) if name not in ids]
        raise DataError(f"the tokenizer in {tokenizer.path} has no special chat tokens "
                        f"{' '.join(missing)}; fine-tune with the sft task "
                        "(--config=experiments/gpt_sft.py), which adds them to the base run's "
                        "tokenizer")
    return ids


def uses_template(tokenizer) -> bool:
    """Whether the tokenizer brings a checkpoint's chat template (data/chat_template.py)."""
    return bool(getattr(tokenizer, "chat_template", None))


def add_chat_tokens(tokenizer, workdir: str):
    """The tokenizer with CHAT_TOKENS as special tokens, saved into workdir (tokenizer.model or
    hf_tokenizer/, atomically) so load_run_tokenizer(workdir) gives it back. New tokens take the
    ids vocab_size .. vocab_size + 3; a tokenizer that has them all, or a chat template of its
    own (which then sets the chat format: chat_template.chat_format), is returned as it is."""
    if uses_template(tokenizer) or len(_find_chat_ids(tokenizer)) == len(CHAT_TOKENS):
        saved = {os.path.abspath(os.path.join(workdir, name)) for name in (tok.MODEL_FILE,
                                                                           tok.HF_DIR)}
        if os.path.abspath(tokenizer.path) not in saved:
            tokenizer.save(workdir)
        return tokenizer
    if not hasattr(tokenizer, "with_special_tokens"):
        raise DataError(f"the tokenizer in {tokenizer.path} ({type(tokenizer).__name__}) cannot "
                        "take new tokens; chat fine-tuning needs a tokenizer trained here "
                        "(tokenizer.model) or a Hugging Face tokenizer.json folder")
    extended = tokenizer.with_special_tokens(CHAT_TOKENS, workdir)
    chat_token_ids(extended)  # they are special now: text cannot produce them
    return extended


def new_token_inits(tokenizer) -> dict[int, list[int]]:
    """{chat token id: ordinary ids whose mean embedding starts its row} when the embedding
    table grows: "User:" for <|user|> and so on, EOS for <|end|> (both end a text)."""
    ids = chat_token_ids(tokenizer)
    inits = {ids[name]: tokenizer.encode(text) for name, text in _INIT_TEXT.items()}
    end = [tokenizer.eos_id] if tokenizer.eos_id is not None else tokenizer.encode(".")
    inits[ids["end"]] = end
    return inits


# ---- rendering --------------------------------------------------------------------------------

def _render_turns(turns, tokenizer, ids, where: str = "") -> tuple[list[int], list[int]]:
    """[BOS] then role token, content, <|end|> per turn; mask 1 on assistant content + <|end|>.
    A vocabulary without BOS (Qwen's) starts at the first role token."""
    tokens = tok.bos_prefix(tokenizer)
    mask = [0] * len(tokens)
    for role, content in turns:
        if role not in ROLES:
            raise DataError(f"{where or 'a conversation'}: role {role!r} is not one of "
                            f"{', '.join(map(repr, ROLES))}")
        # Each content is encoded on its own, never as part of a rendered string: the chat
        # tokens exist only as these ids, so text that spells "<|end|>" stays text.
        body = tokenizer.encode(content)
        learn = int(role == "assistant")
        tokens += [ids[role], *body, ids["end"]]
        mask += [0] + [learn] * (len(body) + 1)  # the role token itself is given, not learned
    return tokens, mask


def render(conv: Conversation, tokenizer, ids: dict[str, int]) -> tuple[list[int], list[int]]:
    """(tokens, loss_mask) of a conversation; nothing follows the last <|end|> (no EOS)."""
    return _render_turns(conv.turns, tokenizer, ids, conv.where)


def prompt_tokens(turns, tokenizer, ids: dict[str, int]) -> list[int]:
    """The rendered turns followed by <|assistant|>: what generation continues from (and stops
    at <|end|>); exactly the prefix render() gives the assistant turn after these turns."""
    return _render_turns(turns, tokenizer, ids)[0] + [ids["assistant"]]


def show(conv: Conversation, tokenizer, ids: dict[str, int]) -> str:
    """The exact rendered sequence for reading: text with the special tokens written out and the
    loss-carrying tokens inside ⟦ ⟧, then each piece, then the counts."""
    tokens, mask = render(conv, tokenizer, ids)
    special = set(ids.values()) | {tokens[0]}
    roles = {ids[role] for role in ROLES}
    text, pieces, run = [], [], []
    in_loss = False

    def flush():
        if run:
            text.append(tokenizer.decode(run))
            run.clear()

    for k, (i, m) in enumerate(zip(tokens, mask)):
        if m != in_loss:
            flush()
            text.append("⟦" if m else "⟧")
            pieces.append("⟦" if m else "⟧")
            in_loss = bool(m)
        if i in special:
            flush()
            if i in roles and k > 1:
                text.append("\n")  # a turn per line; not a token
            text.append(tokenizer.id_to_piece(i))
        else:
            run.append(i)
        pieces.append(tokenizer.id_to_piece(i))
    flush()
    if in_loss:
        text.append("⟧")
        pieces.append("⟧")
    pieces_line = " ".join(pieces).replace("⟦ ", "⟦").replace(" ⟧", "⟧")
    return (f"{''.join(text)}\npieces: {pieces_line}\n{len(tokens)} tokens, {sum(mask)} carry "
            "loss (inside ⟦ ⟧); the line breaks before role tokens are for reading, not tokens")


# ---- packing ----------------------------------------------------------------------------------

def pack(examples, max_len: int, *, packing: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Rows of (tokens, loss_mask, where) examples, with data/lm.pack_rows's keys and dtypes,
    and figures: examples, rows, truncated (+ _share), loss_token_share, fill."""
    if max_len < 1:
        raise DataError(f"max_len={max_len} leaves no room for any token; raise it")
    cut, truncated = [], 0
    for tokens, mask, where in examples:
        if len(tokens) != len(mask):
            raise ValueError(f"{where}: {len(tokens)} tokens but {len(mask)} mask entries")
        # n tokens give n - 1 (input, target) positions; a target's weight is its mask entry.
        n, was_cut = len(tokens), len(tokens) - 1 > max_len
        if was_cut:
            # The last answer starts after the last 0 of the mask; the token before it is its
            # <|assistant|>. If even that does not fit, no prompt is left to answer.
            answer_start = max((i for i, m in enumerate(mask) if not m), default=-1) + 1
            if answer_start - 1 < n - max_len:
                raise DataError(f"{where}: {n} tokens, longer than max_len={max_len}, and its "
                                f"last answer alone takes {n - answer_start} of them: nothing "
                                "of the prompt is left to train on; raise --config.data.max_len "
                                "or shorten the answer")
            # Cut from the prompt side: BOS and the last max_len tokens after it, so the answer
            # and its closing <|end|> survive and only the start of the context is lost.
            tokens, mask = tokens[:1] + tokens[-max_len:], mask[:1] + mask[-max_len:]
            truncated += 1
        if not any(mask[1:]):
            if was_cut:
                raise DataError(f"{where}: {n} tokens, longer than max_len={max_len} with "
                                "nothing left to train on; raise --config.data.max_len or "
                                "shorten it")
            raise DataError(f"{where}: no token carries loss (no assistant content to learn); "
                            "give it an assistant answer or drop it")
        cut.append((tokens[:-1], tokens[1:], mask[1:]))
    if not cut:
        raise DataError("no token carries loss: there are no conversations; check the data files")

    # Greedy and in order: an example joins the current row while it fits, else it starts a new
    # row. Examples are never split across rows: an answer without its question teaches nothing.
    # Within a row each example is its own segment (1, 2, ...), so attention never crosses from
    # one conversation into another, and its positions restart at 0; padding is segment 0.
    places, row, fill, segment = [], 0, 0, 0
    for inputs, _, _ in cut:
        if places and (not packing or fill + len(inputs) > max_len):
            row, fill, segment = row + 1, 0, 0
        segment += 1
        places.append((row, fill, segment))
        fill += len(inputs)
    shape = (row + 1, max_len)
    rows = {"inputs": np.zeros(shape, np.int32), "targets": np.zeros(shape, np.int32),
            "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32),
            "weights": np.zeros(shape, np.float32)}
    for (inputs, targets, weights), (r, start, segment) in zip(cut, places):
        span = slice(start, start + len(inputs))
        rows["inputs"][r, span] = inputs
        rows["targets"][r, span] = targets
        rows["segment_ids"][r, span] = segment
        rows["positions"][r, span] = np.arange(len(inputs))
        rows["weights"][r, span] = weights
    used = sum(len(inputs) for inputs, _, _ in cut)
    stats = {"examples": len(cut), "rows": shape[0], "truncated": truncated,
             "truncated_share": truncated / len(cut),
             "loss_token_share": float(rows["weights"].sum()) / used,
             "fill": used / (shape[0] * max_len)}
    return rows, stats


# ---- the demo task: questions about one Bible verse --------------------------------------------

# A verse of up to ~220 characters renders (with its question and answer) to at most ~106
# tokens even with the tiny demo's 2,048-piece vocabulary: well inside max_len 128.
MAX_CONTEXT_CHARS = 220


def _verse_facts(db_path: str, version: str):
    """(book, chapter, verse, last verse, context, question, answers) of each relation stated
    in a verse, or across two consecutive verses when neither states it alone."""
    verses = sources.read_bible_verses(db_path, version)
    # data/squad.py's patterns, run on one verse at a time instead of its 8-verse contexts.
    asked = [squad.relation_questions(text) for _, _, _, text in verses]
    for k, (book, chapter, verse, text) in enumerate(verses):
        for _, question, answers in asked[k]:
            yield book, chapter, verse, verse, text, question, answers
        if k + 1 == len(verses) or verses[k + 1][:2] != (book, chapter):
            continue
        # A list running over the verse boundary ("... the son of Samuel," / "the son of
        # Elkanah, ..."): the pair states what neither verse does.
        alone = {q for _, q, _ in asked[k]} | {q for _, q, _ in asked[k + 1]}
        pair = f"{text} {verses[k + 1][3]}"
        for _, question, answers in squad.relation_questions(pair):
            if question not in alone:
                yield book, chapter, verse, verses[k + 1][2], pair, question, answers


def bible_qa(db_path: str, version: str = "4", max_context_chars: int = MAX_CONTEXT_CHARS
             ) -> tuple[list[Conversation], list[Conversation]]:
    """(train, dev) genealogy questions about a short context ("<verse>\\nQuestion: Whose son
    was Jeroham?" -> "Elkanah"); dev is data/squad.BIBLE_QA_DEV_BOOKS, train the other books
    but data/sources.TEST_BOOKS. The answer is the first gold name; answers holds them all."""
    splits: dict[str, dict[str, Conversation]] = {"train": {}, "dev": {}}
    for book, chapter, verse, last, context, question, answers in _verse_facts(db_path, version):
        if len(context) > max_context_chars or book in sources.TEST_BOOKS:
            continue
        split = splits["dev" if book in squad.BIBLE_QA_DEV_BOOKS else "train"]
        prompt = f"{context}\nQuestion: {question}"
        verses = f"{verse}" if last == verse else f"{verse}-{last}"
        names = tuple(a["text"] for a in answers)  # in text order: the first is the answer
        # A verse repeated word for word (Ezra 2 / Nehemiah 7, Kings / Chronicles) is asked once.
        split.setdefault(prompt, Conversation(
            (("user", prompt), ("assistant", names[0])),
            f"bible version {version}, book {book} {chapter}:{verses}", names))
    # ... and a training question that is also a dev question would leak the answer.
    train = [conv for prompt, conv in splits["train"].items() if prompt not in splits["dev"]]
    dev = list(splits["dev"].values())
    if not train or not dev:
        raise DataError(f"Bible version {version!r} of {db_path} gives no train or no dev "
                        f"questions (dev books {squad.BIBLE_QA_DEV_BOOKS}): the patterns follow "
                        "the World English Bible's wording; use version '4' (or delete the "
                        "database so the full one is fetched again)")
    return train, dev


def question_kind(conv: Conversation) -> str:
    """The first two words of the question ("Whose son", "What was"), else ""."""
    last_user = [content for role, content in conv.turns if role == "user"][-1:]
    question = last_user[0].rpartition("Question: ")[2] if last_user else ""
    return " ".join(question.split()[:2])


def few_shot_prefix(train: list[Conversation], k: int) -> tuple[tuple[str, str], ...]:
    """The turns of k solved train conversations, as shots before a question for a model that
    was never fine-tuned: short ones (the prompt must fit the context), one question kind after
    another so the shots show each kind. Deterministic."""
    by_kind: dict[str, list[Conversation]] = {}
    size = lambda conv: (sum(len(c) for _, c in conv.turns), conv.where)  # noqa: E731
    for conv in sorted(train, key=size):
        by_kind.setdefault(question_kind(conv), []).append(conv)
    queues, shots = list(by_kind.values()), []
    while len(shots) < k and any(queues):
        for queue in queues:
            if queue and len(shots) < k:
                shots.append(queue.pop(0))
    return tuple(turn for conv in shots for turn in conv.turns if turn[0] != "system")


def with_shots(prefix, conv: Conversation) -> Conversation:
    """conv with the few-shot turns of few_shot_prefix before its own (after a system turn);
    prompt_tokens(result.turns[:-1], ...) is then the few-shot prompt."""
    system = tuple(turn for turn in conv.turns[:1] if turn[0] == "system")
    return Conversation(system + tuple(prefix) + conv.turns[len(system):], conv.where,
                        conv.answers)


# ---- scoring ----------------------------------------------------------------------------------

def answer_scores(prediction: str, answers) -> tuple[float, float]:
    """(exact match, token F1) of a generated answer, each the best over the gold answers
    (the official SQuAD definitions of data/squad_eval.py), in [0, 1]."""
    if not answers:
        raise ValueError("answer_scores needs at least one gold answer")
    return (max(squad_eval.exact_match(prediction, gold) for gold in answers),
            max(squad_eval.f1_score(prediction, gold) for gold in answers))

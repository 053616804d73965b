"""BERT pretraining examples: masked LM plus next sentence prediction (Devlin et al. 2018,
section 3.1 and appendix A.1).

An example is [CLS] A [SEP] B [SEP]: A is a run of whole sentences of one document and B is the
text that follows it (IsNext) half of the time, a span of another document otherwise (NotNext).
Pairs are cut as in the paper's reference data generation: consecutive sentences are gathered
until they fill the sequence, then split at a random sentence boundary. Then 15% of the pieces
are chosen for the masked LM (appendix A.1): 80% of those become [MASK], 10% a random piece and
10% stay as they are. Masks are drawn once per pass over the corpus (static masking, as the
reference does); dupe_factor passes give the same text several pairings and masks. Rows are
fixed-shape numpy arrays that data.lm.make_iterator batches, shards and checkpoints.
"""

import re
import sys

import numpy as np
import tqdm

from data import tokenizer as tok
from data.errors import DataError

# Below this, [CLS] A [SEP] B [SEP] leaves too little room for two real spans worth predicting.
MIN_MAX_LEN = 8

# A sentence ends at . ! or ?, possibly inside closing quotes or brackets ("light.” And"), when
# whitespace follows. Abbreviations ("Mr. Smith") also split; for NSP that only makes some
# "sentences" shorter, which the chunking into full-length pairs absorbs.
_SENTENCE_END = re.compile(r"""([.!?]["'”’»)\]]*)\s+""")


def split_sentences(doc: str) -> list[str]:
    """Sentences of a document: split at newlines and at sentence-ending punctuation."""
    lines = _SENTENCE_END.sub("\\1\n", doc).splitlines()
    return [s for s in (line.strip() for line in lines) if s]


def truncate_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int, rng) -> None:
    """Trims the pair in place to max_num_tokens, one token at a time from the longer side."""
    # The reference removes one token per step from the longer side (B on a tie), from its front
    # or back by a coin flip, so neither side always loses its ends (a small regulariser). How
    # many tokens each side loses depends only on the lengths; the side's front/back split is
    # then a Binomial(n, 1/2), which draws in O(1) what the coin flips would draw token by token.
    len_a, len_b = len(tokens_a), len(tokens_b)
    excess = len_a + len_b - max_num_tokens
    if excess <= 0:
        return
    gap = min(abs(len_a - len_b), excess)  # first the longer side shrinks to the other's length
    cut_a, cut_b = (gap, 0) if len_a > len_b else (0, gap)
    rest = excess - gap  # then they alternate, B first since ties go to B
    cut_a, cut_b = cut_a + rest // 2, cut_b + rest - rest // 2
    for tokens, cut in ((tokens_a, cut_a), (tokens_b, cut_b)):
        front = int(rng.binomial(cut, 0.5)) if cut else 0
        del tokens[:front]
        del tokens[len(tokens) - (cut - front):]


def create_instances(
    docs_sentences: list[list[list[int]]],
    max_len: int,
    rng: np.random.Generator,
    *,
    short_seq_prob: float = 0.1,
) -> list[tuple[list[int], list[int], bool]]:
    """(tokens_a, tokens_b, is_random_next) pairs of every document, with NotNext B from another."""
    # Empty sentences would let A or B come out empty; documents without text cannot give B.
    docs = [doc for doc in ([s for s in doc if s] for doc in docs_sentences) if doc]
    if len(docs) < 2:
        return []  # NotNext needs a second document; build_pretraining_rows says so
    instances = []
    for d in range(len(docs)):
        instances.extend(_document_instances(docs, d, max_len - 3, rng, short_seq_prob))
    return instances


def _document_instances(docs, d, max_num_tokens, rng, short_seq_prob):
    """The pairs of document d: chunks of whole sentences, each split into A and B."""
    document, instances = docs[d], []
    chunk, chunk_len, i = [], 0, 0
    target = _target_length(max_num_tokens, rng, short_seq_prob)
    while i < len(document):
        chunk.append(document[i])
        chunk_len += len(document[i])
        if i == len(document) - 1 or chunk_len >= target:
            # A takes the first a_end sentences; at least one sentence is left for an IsNext B.
            a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
            tokens_a = [t for sentence in chunk[:a_end] for t in sentence]
            # A lone sentence has no continuation in the chunk, so it can only be NotNext.
            is_random_next = len(chunk) == 1 or rng.random() < 0.5
            if is_random_next:
                tokens_b = _random_span(docs, d, target - len(tokens_a), rng)
                # The chunk's sentences after A go back to the document, so no text is wasted.
                i -= len(chunk) - a_end
            else:
                tokens_b = [t for sentence in chunk[a_end:] for t in sentence]
            truncate_pair(tokens_a, tokens_b, max_num_tokens, rng)
            instances.append((tokens_a, tokens_b, bool(is_random_next)))
            chunk, chunk_len = [], 0
            target = _target_length(max_num_tokens, rng, short_seq_prob)
        i += 1
    return instances


def _target_length(max_num_tokens, rng, short_seq_prob):
    """Tokens to gather for the next pair: usually the full length, sometimes shorter."""
    # Short sequences now and then keep the model used to the short inputs of fine-tuning tasks.
    # The reference draws this once per document; drawing per pair makes short_seq_prob the
    # fraction of short pairs even when a long document (a Bible chapter) gives many pairs.
    if rng.random() < short_seq_prob:
        return int(rng.integers(2, max_num_tokens + 1))
    return max_num_tokens


def _random_span(docs, d, target_b_length, rng):
    """Consecutive sentences of a random document other than d, about target_b_length tokens."""
    # Picking among the others directly (not retrying on a hit, as the reference does) makes
    # sure a NotNext B never comes from A's own document.
    other = int(rng.integers(len(docs) - 1))
    document = docs[other + 1 if other >= d else other]
    tokens_b = []
    for sentence in document[int(rng.integers(len(document))):]:
        tokens_b.extend(sentence)
        if len(tokens_b) >= target_b_length:
            break
    return tokens_b


def mask_tokens(
    ids: np.ndarray,
    candidates: np.ndarray,
    rng,
    *,
    mask_id: int,
    ordinary_ids: np.ndarray,
    mask_prob: float = 0.15,
    max_predictions: int,
    word_starts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masked ids, chosen positions ascending, original ids there) for one row (appendix A.1).

    A random replacement is one of ordinary_ids (tokenizer.ordinary_ids(): never a special id).
    """
    ids = np.asarray(ids)
    (cand_pos,) = np.nonzero(candidates)
    budget = min(max_predictions, max(1, round(mask_prob * len(cand_pos))), len(cand_pos))
    # Candidates grouped into words: a piece starts a new word if it begins one ("▁the") or the
    # piece before it is not a candidate, so a word never spans [SEP]. Without word_starts every
    # candidate is its own word.
    new_word = np.ones(len(cand_pos), bool)
    if word_starts is not None and len(cand_pos):
        new_word[1:] = np.asarray(word_starts)[cand_pos[1:]] | (np.diff(cand_pos) != 1)
    word_of = np.cumsum(new_word) - 1
    word_len = np.bincount(word_of, minlength=int(new_word.sum()))
    # Words in random order, each taken whole if it still fits the budget (skipped otherwise).
    chosen, taken = np.zeros(len(word_len), bool), 0
    for w in rng.permutation(len(word_len)):
        if taken >= budget:
            break
        if taken + word_len[w] <= budget:
            chosen[w], taken = True, taken + word_len[w]
    positions = cand_pos[chosen[word_of]]
    originals = ids[positions]

    # 80% [MASK]; 10% a random piece and 10% unchanged, so the model cannot tell which inputs
    # are real and must keep a good representation of every token (the [MASK] piece never
    # appears at fine-tuning time).
    draws = rng.random(len(positions))
    random_ids = ordinary_ids[rng.integers(len(ordinary_ids), size=len(positions))]
    masked = ids.copy()
    masked[positions] = np.where(draws < 0.8, mask_id,
                                 np.where(draws < 0.9, random_ids, originals))
    return masked, positions, originals


def _tokenize_documents(docs: list[str], tokenizer) -> list[list[list[int]]]:
    """Token ids of each sentence of each document."""
    progress = tqdm.tqdm(docs, desc="tokenizing", unit="doc", disable=not sys.stderr.isatty())
    return [[tokenizer.encode(s) for s in split_sentences(doc)] for doc in progress]


def _pair_rows(instances, max_len: int, cls_id: int,
               sep_id: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(unmasked rows with NSP labels, masking candidates) of (tokens_a, tokens_b, nsp) pairs."""
    n = len(instances)
    inputs = np.zeros((n, max_len), np.int32)  # padding: segment id 0 masks it, whatever its id
    len_a = np.array([len(a) for a, _, _ in instances], np.int32)
    len_b = np.array([len(b) for _, b, _ in instances], np.int32)
    for row, (a, b, _) in zip(inputs, instances):
        row[: len(a) + len(b) + 3] = [cls_id, *a, sep_id, *b, sep_id]
    # Column c is in B (type 1) if it lies past the first [SEP] and up to the second one.
    columns = np.arange(max_len)[None, :]
    first_sep, second_sep = (len_a + 1)[:, None], (len_a + len_b + 2)[:, None]
    rows = {
        "inputs": inputs,
        "token_types": ((columns > first_sep) & (columns <= second_sep)).astype(np.int32),
        "segment_ids": (columns <= second_sep).astype(np.int32),
        "nsp_labels": np.array([nsp for _, _, nsp in instances], np.int32),  # 1 = NotNext
        "example_weights": np.ones(n, np.float32),
    }
    # Masking may touch the real tokens but [CLS] and the [SEP]s. Found by column, not by id:
    # a corpus that spells out "[SEP]" holds that id inside its sentences.
    real = columns <= second_sep
    return rows, real & (columns != 0) & (columns != first_sep) & (columns != second_sep)


def _check_settings(max_len: int, max_predictions: int, dupe_factor: int) -> None:
    """DataError for settings that cannot give a single usable example."""
    if max_len < MIN_MAX_LEN:
        raise DataError(
            f"max_len {max_len} is too short for BERT pretraining ([CLS] A [SEP] B [SEP] needs "
            f"room for two spans); use --config.data.max_len of at least {MIN_MAX_LEN}"
        )
    if max_predictions < 1:
        raise DataError(
            f"max_predictions {max_predictions} leaves nothing for the masked LM to predict; "
            "set --config.data.max_predictions to at least 1 (the paper uses 20 at max_len 128)"
        )
    if dupe_factor < 1:
        raise DataError(f"dupe_factor {dupe_factor} gives no examples; use at least 1")


def build_pretraining_rows(
    docs: list[str],
    tokenizer,
    *,
    max_len: int,
    max_predictions: int,
    seed: int,
    mask_prob: float = 0.15,
    short_seq_prob: float = 0.1,
    whole_word: bool = False,
    dupe_factor: int = 1,
) -> dict[str, np.ndarray]:
    """Masked-LM and NSP rows of max_len tokens; the same seed gives the same rows."""
    _check_settings(max_len, max_predictions, dupe_factor)
    cls_id, sep_id, mask_id = tok.required_ids(tokenizer, "cls", "sep", "mask",
                                               purpose="BERT pretraining")
    docs_sentences = _tokenize_documents(docs, tokenizer)
    rng = np.random.default_rng(seed)
    instances = []
    for _ in range(dupe_factor):  # each pass pairs and masks the text anew
        instances.extend(create_instances(docs_sentences, max_len, rng,
                                          short_seq_prob=short_seq_prob))
    if not instances:
        with_text = sum(any(doc) for doc in docs_sentences)
        raise DataError(
            f"no BERT pretraining example: the corpus has {with_text} document(s) with text, "
            "and next sentence prediction needs at least two (B of a NotNext pair comes from "
            "another document); add documents (separate them by blank lines) or more eval text"
        )
    rows, candidates = _pair_rows(instances, max_len, cls_id, sep_id)
    word_start_table = None
    if whole_word:
        # "▁the", "Ġthe", a WordPiece without "##": looked up once for the whole vocabulary.
        word_start_table = np.array([tokenizer.is_word_start(i)
                                     for i in range(tokenizer.vocab_size)])
    _mask_rows(rows, candidates, rng, mask_id=mask_id, ordinary_ids=tokenizer.ordinary_ids(),
               mask_prob=mask_prob, max_predictions=max_predictions,
               word_start_table=word_start_table)
    return rows


def _mask_rows(rows, candidates, rng, *, mask_id, ordinary_ids, mask_prob, max_predictions,
               word_start_table):
    """Masks rows["inputs"] in place and adds the zero-padded mlm_* arrays."""
    n = len(candidates)
    positions = np.zeros((n, max_predictions), np.int32)
    targets = np.zeros((n, max_predictions), np.int32)
    weights = np.zeros((n, max_predictions), np.float32)  # 0 marks an unused slot
    for r, ids in enumerate(rows["inputs"]):
        word_starts = None if word_start_table is None else word_start_table[ids]
        masked, pos, originals = mask_tokens(
            ids, candidates[r], rng, mask_id=mask_id, ordinary_ids=ordinary_ids,
            mask_prob=mask_prob, max_predictions=max_predictions, word_starts=word_starts)
        ids[:] = masked
        positions[r, : len(pos)], targets[r, : len(pos)], weights[r, : len(pos)] = pos, originals, 1
    rows.update(mlm_positions=positions, mlm_targets=targets, mlm_weights=weights)

"""Sentence pairs for the encoder-decoder Transformer (Vaswani et al. 2017, sections 5.1 and 6.1).

Pairs come from the user's parallel text (a TSV, or two line-aligned files), from the
public-domain Bible (English World English Bible -> French Louis Segond 1910, aligned verse by
verse, whole books held out as in data/sources.py) or from a synthetic copy / reverse task that
any working model learns in minutes. Section 5.1 encodes both sides with one shared BPE
vocabulary (train the tokenizer on source and target text together) and batches pairs of
similar length to waste little compute on padding; here consecutive pairs are packed into
fixed-length rows instead, with segment ids so that no pair attends to another. BLEU (section
6.1; Papineni et al. 2002) is sacrebleu's standard corpus score with its 13a tokenization on
detokenized text, the number that goes into metrics and docs/translation.md.
"""

import os
import random

import numpy as np

from data import sources
from data import tokenizer as tok
from data.errors import DataError

SYNTHETIC_TASKS = ("copy", "reverse")


def _lines(path: str) -> list[str]:
    """Lines of a UTF-8 file; a missing file is a DataError."""
    if not os.path.isfile(path):
        raise DataError(f"parallel text file {path} does not exist; check the path")
    # Split at "\n" only: str.splitlines() also breaks at U+2028, U+0085 and form feeds, which
    # can occur inside a sentence and would shift every later line out of alignment.
    lines = sources.read_utf8(path).split("\n")
    # Blank lines at the end (an editor's final newline) don't count towards the line count.
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def iter_tsv_pairs(path: str):
    """(source, target) of each non-blank line of a source<TAB>target file, read streaming
    (a TSV of any size; .gz / .zst too), stripped; a pair with a blank side is skipped."""
    if not os.path.isfile(path):
        raise DataError(f"parallel text file {path} does not exist; check the path")
    for line_number, line in enumerate(sources.lines_utf8(path), start=1):
        # Only "\n" ends a line: str.splitlines() would also break at U+2028, U+0085 and form
        # feeds, which can occur inside a sentence.
        line = line.removesuffix("\n").removesuffix("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataError(
                f"{path}:{line_number}: expected source<TAB>target, found {len(fields) - 1} "
                "tabs; replace tabs inside the text with spaces, or give the source and target "
                "as two line-aligned files"
            )
        source, target = fields[0].strip(), fields[1].strip()
        if source and target:
            yield source, target


def read_parallel(source: str, target: str | None = None) -> list[tuple[str, str]]:
    """(source, target) pairs from one TSV (target=None) or two line-aligned UTF-8 files."""
    if target is None:
        pairs, where = list(iter_tsv_pairs(source)), source
    else:
        source_lines, target_lines = _lines(source), _lines(target)
        if len(source_lines) != len(target_lines):
            raise DataError(
                f"{source} has {len(source_lines)} lines but {target} has "
                f"{len(target_lines)}; the files must be line-aligned (line i of one is the "
                "translation of line i of the other)"
            )
        pairs, where = list(zip(source_lines, target_lines)), f"{source} and {target}"
    # A pair with a blank side is dropped whole (from both files at once, keeping the
    # alignment): there is nothing to translate or nothing to learn from.
    pairs = [(s.strip(), t.strip()) for s, t in pairs if s.strip() and t.strip()]
    if not pairs:
        raise DataError(f"empty corpus: {where} hold no non-blank sentence pairs")
    return pairs


def bible_pairs(db_path: str, source_version: str = "4",
                target_version: str = "l") -> tuple[list, list, list]:
    """(train, dev, test) verse pairs; dev and test are sources.EVAL_BOOKS and TEST_BOOKS."""
    targets = {(b, c, v): text
               for b, c, v, text in sources.read_bible_verses(db_path, target_version)}
    train, dev, test = [], [], []
    for book, chapter, verse, text in sources.read_bible_verses(db_path, source_version):
        # A verse one translation lacks (or leaves empty) has no counterpart to learn from.
        target = targets.get((book, chapter, verse))
        if not text or not target:
            continue
        split = dev if book in sources.EVAL_BOOKS else test if book in sources.TEST_BOOKS else train
        split.append((text, target))
    if not train or not dev:
        raise DataError(
            f"{db_path} has no aligned {source_version!r}/{target_version!r} verses in the "
            f"training books or in the dev books {sources.EVAL_BOOKS}; delete it so the full "
            "database is fetched again"
        )
    return train, dev, test


def synthetic_pairs(task: str, n: int, *, num_symbols: int = 20, min_len: int = 3,
                    max_len: int = 12, seed: int = 0) -> list[tuple[str, str]]:
    """n random symbol strings ("sh sb sn") paired with their copy or their reverse.

    Symbols are letters only: sentencepiece splits letters from digits, so "s7" would cost two
    tokens, while every "s" + letter becomes one piece and a symbol is one token.
    """
    if task not in SYNTHETIC_TASKS:
        raise DataError(f"unknown synthetic task {task!r}; use one of {SYNTHETIC_TASKS}")
    if num_symbols < 1 or not 1 <= min_len <= max_len:
        raise DataError(
            f"synthetic pairs need num_symbols >= 1 and 1 <= min_len <= max_len, got "
            f"num_symbols={num_symbols}, min_len={min_len}, max_len={max_len}"
        )
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        symbols = [_symbol(rng.randrange(num_symbols))
                   for _ in range(rng.randint(min_len, max_len))]
        target = symbols if task == "copy" else symbols[::-1]
        pairs.append((" ".join(symbols), " ".join(target)))
    return pairs


def _symbol(i: int) -> str:
    """The i-th synthetic symbol: "sa".."sz", then "saa", "sab", ..."""
    letters = ""
    while True:
        letters = chr(ord("a") + i % 26) + letters
        i = i // 26 - 1
        if i < 0:
            return "s" + letters


def encode_pairs(pairs, tokenizer, *,
                 max_len: int) -> tuple[list[list[int]], list[list[int]], int]:
    """(source ids + [EOS], [BOS] + target ids + [EOS], dropped), with the tokenizer's special
    ids; pairs with a side over max_len - 1 tokens are dropped."""
    if max_len < 2:
        raise DataError(f"max_len must be at least 2 (a token and EOS), got {max_len}")
    # Marian starts the decoder with <pad> (its bos_id) and ends both sides with </s> = 0.
    bos, eos = tok.required_ids(tokenizer, "bos", "eos", purpose="translation")
    source_ids, target_ids, dropped = [], [], 0
    for source, target in pairs:
        src, tgt = tokenizer.encode(source), tokenizer.encode_target(target)
        # One slot per side is kept for EOS (source) or BOS / EOS (decoder input / target).
        if len(src) > max_len - 1 or len(tgt) > max_len - 1:
            dropped += 1
            continue
        source_ids.append([*src, eos])
        target_ids.append([bos, *tgt, eos])
    return source_ids, target_ids, dropped


def _assign_rows(src_ids, tgt_ids, max_len: int, pack: bool) -> list[list[int]]:
    """Pair indices of each row: consecutive pairs while both sides still fit (or one per row)."""
    rows, src_used, tgt_used = [], max_len, max_len  # "full", so the first pair opens a row
    for i, (src, tgt) in enumerate(zip(src_ids, tgt_ids)):
        src_len, tgt_len = len(src), len(tgt) - 1  # the decoder reads all of tgt but EOS
        if src_len > max_len or tgt_len > max_len:
            raise DataError(
                f"pair {i} has {src_len - 1} source / {tgt_len - 1} target tokens, more than "
                f"max_len - 1 = {max_len - 1}; filter with encode_pairs(..., max_len={max_len})"
            )
        if pack and src_used + src_len <= max_len and tgt_used + tgt_len <= max_len:
            rows[-1].append(i)
            src_used, tgt_used = src_used + src_len, tgt_used + tgt_len
        else:
            rows.append([i])
            src_used, tgt_used = src_len, tgt_len
    return rows


def make_rows(src_ids, tgt_ids, *, max_len: int, pack: bool = True) -> dict[str, np.ndarray]:
    """Fixed-shape encoder / decoder rows for data.lm.make_iterator, packed or one pair per row.

    src_ids and tgt_ids are encode_pairs': x1 .. xn [EOS] and [BOS] y1 .. ym [EOS]. Padding
    columns hold 0, whatever that id is: segment id 0 and weight 0 mask them everywhere.
    """
    if len(src_ids) != len(tgt_ids):
        raise DataError(f"{len(src_ids)} source but {len(tgt_ids)} target sequences")
    if not src_ids:
        raise DataError("no sentence pairs to make rows from; add data or raise max_len")
    assignment = _assign_rows(src_ids, tgt_ids, max_len, pack)
    shape = (len(assignment), max_len)
    rows = {name: np.zeros(shape, np.int32) for name in (
        "inputs", "input_segment_ids", "input_positions", "decoder_inputs", "targets",
        "target_segment_ids", "target_positions")}
    rows["weights"] = np.zeros(shape, np.float32)
    for r, pair_indices in enumerate(assignment):
        s = t = 0  # next free column on the source / target side
        # Segment k (from 1; 0 is padding) is the same pair on both sides, so the encoder's
        # self-attention, the decoder's self-attention and the cross-attention can all be
        # masked to "same segment": a pair never sees another pair packed into its row.
        for segment, i in enumerate(pair_indices, start=1):
            src, tgt = src_ids[i], tgt_ids[i]
            n = len(src)
            rows["inputs"][r, s:s + n] = src
            rows["input_segment_ids"][r, s:s + n] = segment
            rows["input_positions"][r, s:s + n] = np.arange(n)  # restart: each pair from 0
            s += n
            # Teacher forcing: the decoder reads [BOS] y1 .. ym and predicts y1 .. ym [EOS].
            m = len(tgt) - 1
            rows["decoder_inputs"][r, t:t + m] = tgt[:-1]
            rows["targets"][r, t:t + m] = tgt[1:]
            rows["target_segment_ids"][r, t:t + m] = segment
            rows["target_positions"][r, t:t + m] = np.arange(m)
            rows["weights"][r, t:t + m] = 1.0  # EOS is predicted too: it ends the decode
            t += m
    return rows


def sacrebleu_score(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (13a tokenization) of detokenized text: the reported number."""
    import sacrebleu  # only evaluation needs it

    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score

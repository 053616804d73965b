"""Sequence classification features for fine-tuning BERT (Devlin et al. 2018, section 4.1).

A single text becomes [CLS] text [SEP] and a pair [CLS] text [SEP] text_pair [SEP], with token
type 0 up to the first [SEP] and 1 after it (section 3, "Input/Output Representations"); the
classifier reads the final hidden state of [CLS]. Examples come from a TSV or JSONL file of the
user's, or from the demo task on the default corpus: which testament a Bible verse is from, with
whole books held out for the dev split. Rows are fixed-shape numpy arrays that
data.lm.make_iterator batches like every other pipeline; metrics are computed from a confusion
matrix so the training loop only has to sum one per batch.
"""

import dataclasses
import json
import math
import os

import numpy as np

from data import sources
from data import tokenizer as tok
from data.errors import DataError

_FIELDS_HINT = "columns text, label and optionally text_pair"


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled text or text pair, as read."""

    text: str
    text_pair: str | None
    label: str  # a class name, or a number as text for regression


def _tsv_examples(path: str, content: str) -> list[Example]:
    """Examples of a TSV file whose header names the columns; other columns are ignored."""
    # split("\n") rather than splitlines(): a form feed or U+2028 inside a text is not a row end,
    # and the line numbers in messages must match what an editor shows.
    lines = content.split("\n")
    header = [name.strip() for name in lines[0].split("\t")]
    for required in ("text", "label"):
        if required not in header:
            raise DataError(
                f"{path}:1: the header has no column {required!r} (it has {header}); the first "
                f"line must name the tab-separated {_FIELDS_HINT}"
            )
    text_col, label_col = header.index("text"), header.index("label")
    pair_col = header.index("text_pair") if "text_pair" in header else None
    examples = []
    for line_number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(
                f"{path}:{line_number}: {len(fields)} tab-separated fields but the header has "
                f"{len(header)}; replace tabs inside a text by spaces, or fill the missing column"
            )
        pair = fields[pair_col] if pair_col is not None else None
        examples.append(Example(fields[text_col], pair, fields[label_col].strip()))
    return examples


def _jsonl_example(path: str, line_number: int, line: str) -> Example:
    """The Example of one JSONL line: an object with text, label and optionally text_pair."""
    record = sources.parse_json_line(path, line_number, line)
    if not isinstance(record, dict):
        record = {}
    text, pair, label = record.get("text"), record.get("text_pair"), record.get("label")
    if not isinstance(text, str) or not isinstance(pair, str | None):
        raise DataError(
            f"{path}:{line_number}: 'text' (and 'text_pair' if present) must be strings; each "
            f"line must be a JSON object with the fields {_FIELDS_HINT}"
        )
    if not isinstance(label, str | int | float):
        raise DataError(
            f"{path}:{line_number}: no string or number field 'label'; each line must be a JSON "
            f"object with the fields {_FIELDS_HINT}"
        )
    # A number label is kept as JSON writes it ("1", "0.5"), the same text a TSV file would hold.
    return Example(text, pair, label.strip() if isinstance(label, str) else json.dumps(label))


def read_classification(path: str) -> list[Example]:
    """Examples of a TSV file with a header row, or of a JSONL file (.jsonl or .json)."""
    if not os.path.isfile(path):
        raise DataError(f"classification file {path} does not exist; check the path")
    content = sources.read_utf8(path)
    if not content.strip():
        raise DataError(f"{path} is empty; it needs one example per line with the {_FIELDS_HINT}")
    if path.endswith((".jsonl", ".json")):
        examples = [_jsonl_example(path, n, line)
                    for n, line in enumerate(content.split("\n"), start=1) if line.strip()]
    else:
        examples = _tsv_examples(path, content)
    if not examples:
        raise DataError(f"{path} has a header but no examples; add one example per line")
    for n, example in enumerate(examples, start=1):
        if not example.label:
            raise DataError(f"{path}: example {n} has an empty label; label every example")
    return examples


def label_names(examples: list[Example]) -> list[str]:
    """Sorted unique labels; a class index is the position of its label in this list."""
    return sorted({example.label for example in examples})


def _truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """a and b trimmed from the end, longer side first, until together they fit in budget."""
    # As in the BERT reference code (_truncate_seq_pair): trimming the longer side keeps as much
    # of the shorter text as possible, which usually carries half the evidence (e.g. the
    # hypothesis in entailment). Neither side can keep more than budget tokens, so cutting both
    # to budget first changes nothing and bounds the loop for very long texts.
    a, b = a[:budget], b[:budget]
    while len(a) + len(b) > budget:
        if len(a) > len(b):
            a.pop()
        else:
            b.pop()
    return a, b


def _encode(example: Example, tokenizer, max_len: int) -> tuple[list[int], list[int]]:
    """(ids, token types) of [CLS] a [SEP] or [CLS] a [SEP] b [SEP], at most max_len long."""
    cls, sep = tok.required_ids(tokenizer, "cls", "sep", purpose="BERT classification")
    a = tokenizer.encode(example.text)
    if example.text_pair is None:
        a = a[:max_len - 2]
        return [cls, *a, sep], [0] * (len(a) + 2)
    a, b = _truncate_pair(a, tokenizer.encode(example.text_pair), max_len - 3)
    ids = [cls, *a, sep, *b, sep]
    return ids, [0] * (len(a) + 2) + [1] * (len(b) + 1)


def _label_value(example: Example, index: int, label_index: dict[str, int] | None) -> float:
    """The class index of example's label, or its float value for regression (index None)."""
    if label_index is None:
        try:
            value = float(example.label)
        except ValueError:
            value = math.nan
        # A NaN or infinite target would silently turn the loss into NaN.
        if not math.isfinite(value):
            raise DataError(
                f"example {index} ({example.text[:60]!r}) has label {example.label!r}, not a "
                "finite number; regression needs numeric labels (or give class labels)"
            )
        return value
    if example.label not in label_index:
        known = list(label_index)
        shown = ", ".join(map(repr, known[:20])) + (", ..." if len(known) > 20 else "")
        raise DataError(
            f"example {index} ({example.text[:60]!r}) has label {example.label!r}, which the "
            f"training split does not have (known labels: {shown}); drop such examples or add "
            "training examples with that label"
        )
    return label_index[example.label]


def classification_rows(
    examples: list[Example], tokenizer, *, max_len: int, labels: list[str] | None
) -> dict[str, np.ndarray]:
    """Fixed-shape rows of examples; labels None means regression on the label as a number."""
    if max_len < 3:
        raise DataError(f"max_len {max_len} leaves no room for [CLS] and [SEP]; raise it")
    if not examples:
        raise DataError("no classification examples; check the data files")
    n = len(examples)
    inputs = np.zeros((n, max_len), np.int32)  # padding: segment id 0 masks it, whatever its id
    token_types = np.zeros((n, max_len), np.int32)
    segment_ids = np.zeros((n, max_len), np.int32)
    label_index = None if labels is None else {name: i for i, name in enumerate(labels)}
    targets = np.zeros(n, np.float32 if labels is None else np.int32)
    for i, example in enumerate(examples):
        ids, types = _encode(example, tokenizer, max_len)
        inputs[i, :len(ids)] = ids
        token_types[i, :len(ids)] = types
        # Segment 1 on real tokens, 0 on padding: the attention mask convention of data.lm.
        segment_ids[i, :len(ids)] = 1
        targets[i] = _label_value(example, i, label_index)
    return {
        "inputs": inputs,
        "token_types": token_types,
        "segment_ids": segment_ids,
        "labels": targets,
        # make_iterator's eval padding rows are all zero, so their weight 0 keeps them out.
        "example_weights": np.ones(n, np.float32),
    }


def classification_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy, macro_f1 and (2 classes) mcc of a confusion matrix, rows true, cols predicted."""
    confusion = np.asarray(confusion, np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1] or confusion.sum() <= 0:
        raise ValueError(f"need a non-empty square confusion matrix, got shape {confusion.shape}")
    tp = np.diag(confusion)
    fp = confusion.sum(axis=0) - tp  # predicted as the class, truly another
    fn = confusion.sum(axis=1) - tp  # truly the class, predicted as another
    # F1 = 2tp / (2tp + fp + fn). A class that is neither in the eval labels nor ever predicted
    # has no F1 at all; counting it as 0 (or 1) would make macro-F1 depend on absent classes.
    present = (2 * tp + fp + fn) > 0
    f1 = 2 * tp[present] / (2 * tp + fp + fn)[present]
    metrics = {"accuracy": float(tp.sum() / confusion.sum()), "macro_f1": float(f1.mean())}
    if len(confusion) == 2:
        # Matthews correlation (symmetric in the two classes); 0 when a row or column is empty,
        # the usual convention (the prediction then carries no information about the label).
        (tn_, fp_), (fn_, tp_) = confusion
        denominator = (tp_ + fp_) * (tp_ + fn_) * (tn_ + fp_) * (tn_ + fn_)
        mcc = (tp_ * tn_ - fp_ * fn_) / math.sqrt(denominator) if denominator > 0 else 0.0
        metrics["mcc"] = float(mcc)
    return metrics


def majority_baseline(
    train_labels: np.ndarray, eval_labels: np.ndarray, num_classes: int
) -> dict[str, float]:
    """Metrics of always predicting the most frequent training class (ties: the lowest index)."""
    train_labels, eval_labels = np.asarray(train_labels), np.asarray(eval_labels)
    if max(train_labels.max(initial=0), eval_labels.max(initial=0)) >= num_classes:
        raise ValueError(f"labels must be below num_classes={num_classes}")
    majority = int(np.argmax(np.bincount(train_labels, minlength=num_classes)))
    confusion = np.zeros((num_classes, num_classes))
    confusion[:, majority] = np.bincount(eval_labels, minlength=num_classes)
    return classification_metrics(confusion)


# Whole books are held out, as in sources.py, because verses of one book share names, places and
# phrasing that would otherwise leak into the dev split. sources.EVAL_BOOKS (Ruth, Jonah,
# Philemon) alone give ~160 verses, too few to measure accuracy to a point, so short books are
# added until each testament has ~650-700 dev verses (1,342 in all, near balanced, so the
# training-majority "old" scores ~52% on dev). The OT side mixes narrative (Ruth, Jonah, Esther),
# poetry (Song of Solomon, Lamentations) and prophecy (Joel, Habakkuk) so no one genre decides
# the label; the NT side is letters, since every NT narrative book (gospels, Acts) is long.
OLD_TESTAMENT_LAST_BOOK = 39  # Malachi; 40 (Matthew) to 66 (Revelation) are the New Testament
DEV_BOOKS = tuple(sorted(sources.EVAL_BOOKS + (
    17, 22, 25, 29, 35,  # Esther, Song of Solomon, Lamentations, Joel, Habakkuk
    48, 50, 56, 59, 60, 62,  # Galatians, Philippians, Titus, James, 1 Peter, 1 John
)))


def bible_classification(db_path: str, version: str = "4") -> tuple[list[Example], list[Example]]:
    """(train, dev) verses labelled "old" or "new" by testament; DEV_BOOKS held out whole."""
    train, dev = [], []
    for book, _, _, text in sources.read_bible_verses(db_path, version):
        if book in sources.TEST_BOOKS:
            continue  # kept out of both splits, for final numbers only
        label = "old" if book <= OLD_TESTAMENT_LAST_BOOK else "new"
        (dev if book in DEV_BOOKS else train).append(Example(text, None, label))
    if not train or not dev:
        raise DataError(
            f"{db_path} lacks the training books or the dev books {DEV_BOOKS}; delete it so "
            "the full database is fetched again"
        )
    return train, dev

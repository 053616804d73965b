"""Packed next-token batches for language modelling (GPT, Radford et al. 2018, section 3.1).

Documents become one token stream, [BOS] doc [EOS] [BOS] doc [EOS] ..., cut into rows of
max_len + 1 tokens; inputs are a row without its last token and targets the row shifted by one.
A row holds pieces of several documents, so each row also carries segment ids (which document
piece a position belongs to, for the block-diagonal attention mask), positions (restarting at 0
in each piece) and loss weights (0 where the target starts another document). Every pipeline
yields the same kind of dict of fixed-shape arrays through make_iterator, so the BERT and
seq2seq pipelines look like this one.
"""

import functools
import sys

import grain
import numpy as np
import tqdm

from data import tokenizer as tok
from data.errors import DataError


def tokenize_documents(docs, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, doc_ids): every document as [BOS] ids [EOS], concatenated; both int32. A
    vocabulary without BOS (Qwen's) gives ids [EOS]: its documents end with the one token."""
    # GPT-2's vocabulary has one <|endoftext|> for both, so documents are separated by two.
    (eos,) = tok.required_ids(tokenizer, "eos", purpose="language modelling")
    bos = tok.bos_prefix(tokenizer)
    tokens, doc_ids = [], []
    progress = tqdm.tqdm(docs, desc="tokenizing", unit="doc", disable=not sys.stderr.isatty())
    for i, doc in enumerate(progress):
        ids = [*bos, *tokenizer.encode(doc), eos]
        tokens.append(np.asarray(ids, np.int32))
        doc_ids.append(np.full(len(ids), i, np.int32))
    if not tokens:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(tokens), np.concatenate(doc_ids)


def pack_rows(tokens: np.ndarray, doc_ids: np.ndarray, max_len: int) -> dict[str, np.ndarray]:
    """Rows of max_len tokens: inputs, targets, segment_ids, positions and loss weights."""
    n_rows = len(tokens) // (max_len + 1)
    if n_rows == 0:
        raise DataError(
            f"corpus has {len(tokens)} tokens, fewer than one training sequence of "
            f"max_len+1={max_len + 1}; add text or lower --config.data.max_len"
        )
    # The last partial row is dropped: padding it would waste compute on every epoch.
    used = n_rows * (max_len + 1)
    rows = np.asarray(tokens[:used], np.int32).reshape(n_rows, max_len + 1)
    docs = np.asarray(doc_ids[:used]).reshape(n_rows, max_len + 1)
    input_docs = docs[:, :-1]

    # A segment starts at column 0 and wherever the document changes. A document cut by a row
    # start becomes a fresh segment: attention never reaches back into the previous row anyway.
    starts = np.ones_like(input_docs, dtype=bool)
    starts[:, 1:] = input_docs[:, 1:] != input_docs[:, :-1]
    segment_ids = np.cumsum(starts, axis=1, dtype=np.int32)

    # Position = column minus the column where its segment started (a running max of starts).
    columns = np.broadcast_to(np.arange(max_len, dtype=np.int32), starts.shape)
    segment_start = np.maximum.accumulate(np.where(starts, columns, 0), axis=1)
    positions = (columns - segment_start).astype(np.int32)

    # No loss for predicting across a document boundary (the BOS after an EOS, or the first
    # token of the next document): nothing in the context could predict it.
    weights = (docs[:, 1:] == docs[:, :-1]).astype(np.float32)
    return {
        "inputs": rows[:, :-1],
        "targets": rows[:, 1:],
        "segment_ids": segment_ids,
        "positions": positions,
        "weights": weights,
    }


def make_iterator(
    rows: dict[str, np.ndarray],
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """A checkpointable iterator over this process's batches of batch_size // process_count rows."""
    # Training (shuffle, repeat): a new deterministic order every epoch, forever. Eval (neither):
    # one pass in order, the last batch filled with all-zero rows (weight 0) so every batch has
    # the same static shape. Every process builds the same sequence of *global* batches and
    # keeps its own contiguous slice of each, so the global batch, and with it the training
    # run, is the same for any number of processes, every process runs the same number of
    # batches (one that stopped early would hang the others in a collective), and a run saved
    # with N processes resumes with M. get_state() is {"next_index": int} (global batches so
    # far), JSON as is; set_state() on an iterator built with the same seed and batch_size
    # resumes at exactly the next batch.
    if batch_size <= 0 or batch_size % process_count:
        raise DataError(
            f"batch_size {batch_size} is not a positive multiple of the {process_count} "
            "processes; pick a batch_size divisible by the process count"
        )
    n_rows = num_rows(rows)
    if n_rows == 0:
        raise DataError("no rows to iterate over; add text or lower --config.data.max_len")
    # Eval rounds up to whole global batches; slots past n_rows are padding rows.
    n_slots = n_rows if repeat else -(-n_rows // batch_size) * batch_size

    # The pipeline runs over row indices and gathers a whole batch at once at the end, which is
    # one numpy fancy-index per array instead of one Python dict per row.
    ds = grain.MapDataset.range(n_slots)
    if shuffle:
        ds = ds.shuffle(seed=seed)  # reseeded with the epoch number by repeat() below
    if repeat:
        ds = ds.repeat(None)
    ds = ds.batch(batch_size, drop_remainder=repeat)
    local = slice(process_index * batch_size // process_count,
                  (process_index + 1) * batch_size // process_count)
    ds = ds.map(functools.partial(_gather, rows, local))
    # The data is already in memory: reader threads would only fight over the GIL.
    read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return iter(ds.to_iter_dataset(read_options))


def num_rows(rows) -> int:
    """Rows of a dict of arrays, or of a lazy row source (data/prepared.py: len() and take())."""
    return len(rows) if hasattr(rows, "take") else len(next(iter(rows.values())))


def _gather(rows, local: slice, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The rows at indices[local]; indices past the end give all-zero padding rows (weight 0).

    rows is a dict of arrays, or a lazy source whose take(indices) reads just those rows (so
    each process reads only its own slice of the global batch)."""
    indices = np.asarray(indices)[local]
    padding = indices >= num_rows(rows)
    safe = np.where(padding, 0, indices)
    if hasattr(rows, "take"):
        batch = rows.take(safe)
    else:  # fancy indexing copies, so zeroing below is safe
        batch = {name: array[safe] for name, array in rows.items()}
    for array in batch.values():
        array[padding] = 0
    return batch


def unigram_cross_entropy(train_tokens, eval_targets, eval_weights, vocab_size: int) -> float:
    """Nats per eval token of an add-one-smoothed unigram model of train_tokens (a bar to beat)."""
    counts = np.bincount(np.asarray(train_tokens).ravel(), minlength=vocab_size)[:vocab_size]
    return unigram_loss_from_counts(counts, eval_targets, eval_weights, vocab_size)


def unigram_loss_from_counts(counts, eval_targets, eval_weights, vocab_size: int) -> float:
    """unigram_cross_entropy with the training token counts given (prepared data stores them)."""
    return unigram_loss_over_chunks(counts, [(eval_targets, eval_weights)], vocab_size)


def unigram_loss_over_chunks(counts, chunks, vocab_size: int) -> float:
    """The same over (targets, weights) chunks of the eval split, summed as they come (so a
    large eval split is never in memory at once)."""
    counts = np.asarray(counts, np.float64)[:vocab_size]
    log_probs = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    nll_sum = weight_sum = 0.0
    for targets, weights in chunks:
        weights = np.asarray(weights, np.float64).ravel()
        nll_sum += float((-log_probs[np.asarray(targets).ravel()] * weights).sum())
        weight_sum += float(weights.sum())
    if weight_sum <= 0:
        raise DataError("the eval split has no target tokens; add eval text or lower max_len")
    return nll_sum / weight_sum

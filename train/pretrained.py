"""Hugging Face model folders in and out: config.json + safetensors <-> our sharded params.

`--config.init_from=hf:DIR` starts a run from a local Hugging Face folder (GPT-2, BERT with
any of its heads, MarianMT): `configure` rewrites config.model from DIR/config.json before
anything is built, `check` compares every tensor's name and shape with the model's before
anything is written, and `load_params` places each tensor straight onto the mesh.
`export_tensors` gives a run's parameters under the checkpoint's names; train/hf_runs.py writes
whole run folders in and out.

Weights are read only from safetensors files; a folder that has only pickled weights
(pytorch_model.bin and the like) is refused, never unpickled. The safetensors header is
parsed here (8-byte length, JSON table of dtype / shape / byte range per tensor) so a
truncated or inconsistent file is one clear error before any data is read; each tensor is
then read through a read-only memory map (vocabulary tables straight into their padded rows),
placed shard by shard, and unmapped.
"""
import json
import math
import os
import struct

import jax
import ml_dtypes
from flax import traverse_util
import numpy as np

from data.errors import DataError
from models import hf
from models.hf import UnsupportedCheckpoint

PREFIX = "hf:"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_PICKLES = ("pytorch_model.bin", "model.bin", "tf_model.h5", "flax_model.msgpack", ".pt",
            ".pth", ".ckpt", ".bin")


def hf_folder(init_from) -> str | None:
    """DIR of an init_from of the form 'hf:DIR', else None."""
    if isinstance(init_from, str) and init_from.startswith(PREFIX):
        return init_from[len(PREFIX):]
    return None


def read_hf_config(directory: str) -> dict:
    """The folder's config.json, or a DataError naming what is missing."""
    if not os.path.isdir(directory):
        raise DataError(f"{directory} is not a folder; pass a local Hugging Face model folder "
                        "(docs/pretrained.md shows how to download one)")
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise DataError(f"{directory} has no config.json, so it is not a Hugging Face model "
                        "folder; download the whole model folder, not only its weights")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); download it again") from None


class SafetensorsFolder:
    """Every tensor of a folder's safetensors file(s): name -> (file, dtype, shape, range)."""

    def __init__(self, directory: str):
        self.directory = directory
        files = self._weight_files(directory)
        self.entries = {}
        for file in files:
            for name, entry in self._header(file).items():
                # Early ports (bert-base-uncased's own file) name LayerNorm parameters
                # gamma / beta, which transformers renames to weight / bias on load.
                if name.endswith("LayerNorm.gamma") or name.endswith("LayerNorm.beta"):
                    name = name[:-len("gamma")] + "weight" if name.endswith("gamma") \
                        else name[:-len("beta")] + "bias"
                self.entries[name] = (file, *entry)

    @staticmethod
    def _weight_files(directory):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted({os.path.join(directory, v) for v in weight_map.values()})
            except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
                raise DataError(f"{index} is not a safetensors index ({e!r}); download it "
                                "again") from None
            missing = [f for f in files if not os.path.exists(f)]
            if missing:
                raise DataError(f"{index} lists {len(files)} files but {missing[0]} is "
                                "missing; download the whole folder")
            return files
        if os.path.exists(single):
            return [single]
        pickles = sorted(f for f in os.listdir(directory) if f.endswith(_PICKLES))
        if pickles:
            raise DataError(
                f"{directory} has weights only as {pickles[0]}, a pickle, which can run code "
                "when loaded, so it is never read here. Convert it to model.safetensors on a "
                "machine you trust (transformers: AutoModel.from_pretrained(DIR)."
                "save_pretrained(DIR)) or download the safetensors version")
        raise DataError(f"{directory} has no model.safetensors (or model.safetensors."
                        "index.json); download the model's weights into it")

    @staticmethod
    def _header(file):
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DataError(f"{file} is truncated ({size} bytes, no safetensors header); "
                                "download it again")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise DataError(f"{file} is truncated or not a safetensors file (its header "
                                f"claims {length} bytes, the file has {size}); download it "
                                "again")
            try:
                table = json.loads(f.read(length))
            except (ValueError, UnicodeDecodeError):
                raise DataError(f"{file} has a damaged safetensors header; download it "
                                "again") from None
        table.pop("__metadata__", None)
        entries, end = {}, 0
        if not isinstance(table, dict) or not all(
                isinstance(t, dict) and len(t.get("data_offsets", ())) == 2 and "shape" in t
                for t in table.values()):
            raise DataError(f"{file} has a damaged safetensors header; download it again")
        for name, t in table.items():
            if t.get("dtype") not in _DTYPES:
                raise DataError(f"{file}: tensor {name} has dtype {t.get('dtype')!r}, which "
                                f"is not supported ({sorted(_DTYPES)})")
            start, stop = t["data_offsets"]
            shape = tuple(t["shape"])
            if stop - start != math.prod(shape) * np.dtype(_DTYPES[t["dtype"]]).itemsize:
                raise DataError(f"{file}: tensor {name}'s byte range does not match its shape "
                                f"{shape}; the file is damaged, download it again")
            entries[name] = (_DTYPES[t["dtype"]], shape, 8 + length + start)
            end = max(end, stop)
        if 8 + length + end > size:
            raise DataError(f"{file} is truncated: its tensors need {8 + length + end} bytes "
                            f"and the file has {size}; download it again")
        return entries

    def shape(self, name):
        return self.entries[name][2]

    def read(self, name, rows_like=None) -> np.ndarray:
        """The tensor's values: a read-only memory map of the file.

        With `rows_like` (our vocabulary-padded leaf shape) the values are read as rows of
        that shape's trailing dims into a zero-filled array of its row count, so padding a
        vocabulary costs no second copy.
        """
        file, dtype, shape, offset = self.entries[name]
        if rows_like is None:
            # A read-only map of the file's pages (usually already in the page cache): no
            # fresh buffer to fault in and fill; unmapped when the caller drops it.
            return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)
        rest = tuple(rows_like[1:])
        out = np.zeros((rows_like[0],) + rest, dtype)
        target = out[:math.prod(shape) // max(math.prod(rest), 1)]
        with open(file, "rb") as f:
            f.seek(offset)
            f.readinto(memoryview(target.reshape(-1).view(np.uint8)))
        return out


def configure(config):
    """Sets config.model's architecture from the hf:DIR in config.init_from (in place).

    The experiment's family must match the checkpoint's; dropout, dtypes and the rest stay
    the experiment's. Returns config (unchanged when init_from is not hf:).
    """
    directory = hf_folder(config.get("init_from", ""))
    if directory is None:
        return config
    multiple = config.model.get("vocab_multiple", 1)
    # Published vocabularies (50,257 for GPT-2) are padded for tensor parallelism.
    try:
        family, fields = hf.model_fields(read_hf_config(directory),
                                         128 if multiple == 1 else multiple)
    except UnsupportedCheckpoint as e:
        raise DataError(f"{directory}: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{directory}/config.json lacks a field this model needs ({e!r}) or is "
                        "not a Hugging Face model config; download it again") from None
    if family != config.model.get("family", "gpt"):
        raise DataError(f"{directory} holds a {family} checkpoint but this experiment trains "
                        f"a {config.model.get('family', 'gpt')} model; use "
                        f"experiments/{family}.py (or a fine-tuning experiment of that family)")
    missing = [k for k in fields if k not in config.model]
    if missing:
        raise DataError(f"this experiment's config.model has no {missing}; it cannot take a "
                        f"{family} checkpoint")
    for key, value in fields.items():
        config.model[key] = value
    return config


def _paths(tree) -> dict:
    """'a/b/c' -> leaf of a nested dict of params (or of their shapes, shardings, specs)."""
    return traverse_util.flatten_dict(tree, sep="/")


def _rules(rule) -> list:
    """The Rules of one planned leaf: one, or one per layer of a stacked leaf."""
    if rule is None:
        return []
    return [r for _, r in rule] if isinstance(rule, list) else [rule]


def _plan(config, abstract_params, folder):
    """our path -> (Rule or list of (layer, Rule) for stacked leaves, our leaf shape), for
    the leaves the checkpoint has; and the top-level names it lacks (fresh heads)."""
    family = config.model.get("family", "gpt")
    rules = hf.tensor_rules(family, config.model.num_layers, folder.entries)
    ours = _paths(abstract_params)
    by_path = {}
    for path, rule in rules.items():
        base, layer = hf.stacked_name(path)
        if base in ours and path not in ours:  # scanned: one stacked leaf for every layer
            by_path.setdefault(base, []).append((layer, rule))
        else:
            by_path[path] = rule
    plan, fresh = {}, set()
    for path, leaf in ours.items():
        rule = by_path.get(path)
        names = [r.name for r in _rules(rule)]
        if not names or any(n not in folder.entries for n in names):
            fresh.add(path.split("/")[0])
            continue
        plan[path] = (rule, leaf.shape)
    # A group is taken whole or not at all: the loop replaces top-level groups.
    plan = {p: v for p, v in plan.items() if p.split("/")[0] not in fresh}
    return plan, fresh


def check(config, abstract_params, folder=None) -> dict:
    """Compares the checkpoint with the model before anything is read or written.

    Returns {"fresh": top-level parameter groups the checkpoint lacks (heads that start
    from random), "unused": checkpoint tensors nothing reads, and the "plan" and "folder"
    that load_params reads}. A missing encoder / decoder
    tensor or a shape that does not fit is a DataError naming the tensor.
    """
    directory = hf_folder(config.init_from)
    folder = folder or SafetensorsFolder(directory)
    plan, fresh = _plan(config, abstract_params, folder)
    allowed_fresh = {"mlm_transform", "mlm_ln", "mlm_bias", "nsp", "classifier",
                     "qa_outputs", "pooler", "final_logits_bias"}
    if fresh - allowed_fresh:
        missing = sorted(fresh - allowed_fresh)
        raise DataError(f"{directory} lacks the weights of {missing} (model.safetensors has "
                        f"{len(folder.entries)} tensors, none of them for these); is it the "
                        f"right model folder?")
    vocab = config.model.vocab_size
    for path, (rule, shape) in plan.items():
        for r in _rules(rule):
            leaf_shape = shape[1:] if isinstance(rule, list) else shape
            want = hf.expected_hf_shape(r, leaf_shape, vocab)
            have = folder.shape(r.name)
            if have != tuple(want):
                raise DataError(f"{directory}: tensor {r.name} has shape {have} but config.json "
                                f"implies {tuple(want)}; the weights and config.json do not "
                                "belong together")
    used = {r.name for rule, _ in plan.values()
            for r in _rules(rule)}
    unused = sorted(n for n in folder.entries if n not in used and not hf.is_derived(n))
    return {"fresh": sorted(fresh), "unused": unused, "plan": plan, "folder": folder}


_CHUNK_BYTES = 32 << 20


def _put_in_chunks(folder, rule, shape, dtype, sharding):
    """A large row-major leaf (GPT-2's 50,304 x 768 token table) read from the file in
    chunks of rows, each written in place into the device array (a donated update), so the
    host never holds more than one chunk beside the devices' copy."""
    import jax.numpy as jnp

    file, file_dtype, file_shape, offset = folder.entries[rule.name]
    rest = tuple(shape[1:])
    rows = math.prod(file_shape) // max(math.prod(rest), 1)
    row_bytes = math.prod(rest) * np.dtype(file_dtype).itemsize
    step = max(1, min(shape[0], _CHUNK_BYTES // row_bytes))
    update = jax.jit(lambda buf, chunk, start: jax.lax.dynamic_update_slice_in_dim(
        buf, chunk, start, 0), donate_argnums=0, out_shardings=sharding)
    buf = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
    with open(file, "rb") as f:
        for start in range(0, rows, step):
            # The last chunk is moved back to end at the table's end: rows it rewrites get
            # the same values (or the zeros of vocabulary padding) again.
            start = min(start, shape[0] - step)
            chunk = np.zeros((step,) + rest, file_dtype)
            n = max(0, min(step, rows - start))
            f.seek(offset + start * row_bytes)
            f.readinto(memoryview(chunk[:n].reshape(-1).view(np.uint8)))
            buf = update(buf, chunk.astype(dtype, copy=False), start)
    return buf


def load_params(config, abstract_params, shardings, report=None) -> dict:
    """The checkpoint's parameters, each placed straight onto the devices `shardings` names.

    Top-level groups the checkpoint lacks (a classifier over a BertModel) are left out, so
    the caller keeps them freshly initialised. `report` is check()'s, when the caller has
    already run it (the headers are then not read again).
    """
    from train import host
    report = report or check(config, abstract_params)
    folder, plan = report["folder"], report["plan"]
    host.return_large_buffers()
    flat_shardings = _paths(shardings)
    dtypes = {p: leaf.dtype for p, leaf in _paths(abstract_params).items()}
    cache = {}  # GPT-2's c_attn feeds three leaves: read it once

    def source(rule, shape):
        if rule.name not in cache:
            cache.clear()
            cache[rule.name] = folder.read(rule.name, shape if rule.kind == "vocab" else None)
        return cache[rule.name]

    placed = {}
    for path, (rule, shape) in plan.items():
        if (not isinstance(rule, list) and rule.kind in ("copy", "vocab")
                and math.prod(shape) * dtypes[path].itemsize > _CHUNK_BYTES):
            placed[path] = _put_in_chunks(folder, rule, shape, dtypes[path],
                                          flat_shardings[path])
            continue
        if isinstance(rule, list):
            full = np.stack([hf.import_array(r, source(r, shape[1:]), shape[1:])
                             for _, r in sorted(rule, key=lambda x: x[0])])
        else:
            full = hf.import_array(rule, source(rule, shape), shape)
        full = full.astype(dtypes[path], copy=False)
        placed[path] = jax.make_array_from_callback(
            shape, flat_shardings[path], lambda index, a=full: np.ascontiguousarray(a[index]))
        placed[path].block_until_ready()
    cache.clear()
    return traverse_util.unflatten_dict(placed, sep="/")


def _embed_axes(logical_params) -> dict:
    """path -> indices of the axes named `embed` (the model width) of each leaf."""
    from models import layers
    return {path: [i for i, n in enumerate(spec) if n == layers.EMBED]
            for path, spec in _paths(logical_params).items()}


def export_tensors(config, params, logical_params=None) -> dict:
    """HF tensor name -> numpy array of a run's params (host copies, one leaf at a time).

    Scanned layers are unstacked; a Transformer trained with interleaved sinusoids has its
    model width reordered (hf.embed_permutation) so Marian's split sinusoids give the same
    network; BERT heads absent from config.model.heads are not written.
    """
    m = config.model
    family = m.get("family", "gpt")
    rules = hf.tensor_rules(family, m.num_layers, prefix=hf.EXPORT_PREFIX[family])
    if family == "bert" and "span" in m.heads:  # BertForQuestionAnswering has no pooler
        rules = {p: r for p, r in rules.items() if not p.startswith("pooler/")}
    permute = family == "transformer" and m.get("position_layout",
                                                "interleaved") == "interleaved"
    axes = _embed_axes(logical_params) if permute else {}
    perm = hf.embed_permutation(m.d_model)
    leaves = {}
    for path, leaf in _paths(params).items():
        a = np.asarray(jax.device_get(leaf))
        for axis in axes.get(path, []):
            a = np.take(a, perm, axis=axis)
        leaves[path] = a
    unstacked = {}
    for path, rule in rules.items():
        base, layer = hf.stacked_name(path)
        if path in leaves:
            unstacked[path] = leaves[path]
        elif layer is not None and base in leaves:
            unstacked[path] = leaves[base][layer]
    if family == "transformer" and "final_logits_bias" not in unstacked:
        unstacked["final_logits_bias"] = np.zeros((m.vocab_size,), np.float32)
    out = hf.export_arrays(rules, unstacked, m.vocab_size)
    floating = lambda v: np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16
    return {k: v.astype(np.float32) if v.dtype != np.float32 and floating(v) else v
            for k, v in out.items()}

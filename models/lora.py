"""LoRA: low-rank adapters on frozen weights (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models").

An adapted projection computes x W + b + (alpha / r) (x A) B (sec. 4.1): W stays frozen, only
A (in_shape,r) and B (r,features) train, and B starts at zero so fine-tuning starts from the
base model exactly. The adapters themselves live in layers.Projection (params `lora_a`,
`lora_b`); this file holds the pure functions on parameter trees around them: choose which
projections get adapters (`parse_targets`), separate the trainable leaves from the frozen ones
for the optimizer (`split` / `combine`), and fold the adapters back into the kernels for
serving with no extra latency (`merge`, sec. 4.1 "No Additional Inference Latency").

The trees are nested dicts of arrays, of flax-boxed nn.Partitioned arrays (what `init`
returns, carrying logical axis names), or of jax.ShapeDtypeStruct (what `jax.eval_shape`
returns); every function keeps the leaves' boxing as it found it.
"""
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ADAPTER_NAMES = ("lora_a", "lora_b")
# The projections an adapter can attach to: attention's W_Q, W_K, W_V, W_O, the
# feed-forward's two matrices (attention.MultiHeadAttention, layers.FeedForward) and the gated
# feed-forward's three (layers.GatedFeedForward: Llama, Qwen, Mistral, Gemma). The paper adapts
# only W_Q and W_V (sec. 7.1); adapting every matrix is the common choice since QLoRA
# (Dettmers et al. 2023, sec. 4) found it needed to match full fine-tuning.
ATTENTION_TARGETS = ("query", "key", "value", "out")
FEED_FORWARD_TARGETS = ("wi", "wo")
GATED_TARGETS = ("gate", "up", "down")
TARGETS = ATTENTION_TARGETS + FEED_FORWARD_TARGETS + GATED_TARGETS


def parse_targets(targets) -> tuple:
    """'query,value' (or a sequence of names) -> ('query', 'value'), checked against TARGETS."""
    if isinstance(targets, str):
        targets = targets.split(",")
    names = tuple(dict.fromkeys(t.strip() for t in targets if t.strip()))
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown} in lora_targets; the valid ones are "
                         f"{', '.join(TARGETS)}")
    return names


def layer_kwargs(config, projections=ATTENTION_TARGETS + FEED_FORWARD_TARGETS,
                 model="GPT and BERT") -> dict:
    """The lora_* arguments of blocks.self_attention_stack from a model config, checked: a
    ValueError for a negative rank, an unknown target, a rank with no target, or a target
    that names none of the model's `projections` (GPT's have no gate, Llama's no wi)."""
    if config.lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0 (0: no adapters), got {config.lora_rank}")
    targets = parse_targets(config.lora_targets)
    if config.lora_rank and not targets:
        raise ValueError(f"lora_rank {config.lora_rank} but no lora_targets; name some of "
                         f"{', '.join(projections)}")
    foreign = [t for t in targets if t not in projections]
    if config.lora_rank and foreign:
        raise ValueError(f"lora_targets {','.join(foreign)!r} name no projection of {model}; "
                         f"use some of {','.join(projections)}")
    return dict(lora_rank=config.lora_rank, lora_alpha=config.lora_alpha, lora_targets=targets)


def _is_group(x) -> bool:
    return isinstance(x, Mapping)


def split(params, extra_trainable=()):
    """(trainable, frozen): every adapter leaf, plus the top-level groups named in
    `extra_trainable` (say a freshly initialised classifier head), vs everything else.

    Both keep the nested structure of `params`, without empty groups; `combine` undoes it.
    """
    def walk(tree, top):
        trainable, frozen = {}, {}
        for key, value in tree.items():
            if top and key in extra_trainable:
                trainable[key] = value
            elif _is_group(value):
                t, f = walk(value, False)
                if t:
                    trainable[key] = t
                if f:
                    frozen[key] = f
            elif key in ADAPTER_NAMES:
                trainable[key] = value
            else:
                frozen[key] = value
        return trainable, frozen

    return walk(params, True)


def combine(frozen, trainable):
    """The full tree from `split`'s two halves (a recursive dict merge)."""
    out = dict(frozen)
    for key, value in trainable.items():
        if key not in out:
            out[key] = value
        elif _is_group(out[key]) and _is_group(value):
            out[key] = combine(out[key], value)
        else:
            raise ValueError(f"{key!r} is in both the frozen and the trainable tree")
    return out


def _unbox(x):
    return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x


def _merged_kernel(kernel, a, b, scale):
    """W + scale A B, contracting the rank axis; leading axes shared by W, A and B (the
    LAYERS axis of scanned blocks) are batch axes.

    W is lead + in + out, A lead + in + (r,), B lead + (r,) + out, so the number of lead
    axes follows from the three ranks. The product runs in fp32 at full precision (the default
    on GPUs would round it through TF32).
    """
    w, a, b = _unbox(kernel), _unbox(a), _unbox(b)
    lead = a.ndim + b.ndim - 2 - w.ndim
    batch = w.shape[:lead]
    in_size = int(np.prod(a.shape[lead:-1]))
    a_2d = a.reshape(batch + (in_size, a.shape[-1])).astype(jnp.float32)
    b_2d = b.reshape(batch + (b.shape[lead], -1)).astype(jnp.float32)
    delta = jnp.matmul(a_2d, b_2d, precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
    merged = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return kernel.replace_boxed(merged) if isinstance(kernel, nn.meta.AxisMetadata) else merged


def merge(params, alpha: float, rank: int):
    """`params` without adapters, each adapted kernel replaced by W + (alpha / rank) A B.

    The result is a tree for the same model with lora_rank=0: serving it costs nothing extra.
    """
    def walk(tree):
        if "lora_a" in tree and "lora_b" in tree and "kernel" in tree:
            found = _unbox(tree["lora_a"]).shape[-1]
            if found != rank:
                raise ValueError(f"adapters of rank {found}, but merge was given rank {rank}")
            out = {k: v for k, v in tree.items() if k not in ADAPTER_NAMES}
            out["kernel"] = _merged_kernel(tree["kernel"], tree["lora_a"], tree["lora_b"],
                                           alpha / rank)
            return out
        return {k: walk(v) if _is_group(v) else v for k, v in tree.items()}

    return walk(params)


def count(params) -> int:
    """Number of elements in a (boxed, plain or abstract) tree, e.g. of split's trainable half."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(params)))

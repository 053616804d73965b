"""Translation end to end: the reverse sanity task, a TSV run with save / resume / BLEU,
`experiments.translate`, and the label-smoothed loss against a hand computation."""
import json
import random

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import transformer as transformer_experiment
from tests.test_cli import _assert_clear_error, run
from train.tasks import seq2seq
from train import runs

LEXICON = {"the": "le", "king": "roi", "went": "alla", "to": "a", "city": "ville",
           "and": "et", "people": "peuple", "said": "dit", "river": "fleuve", "dark": "sombre"}


def _records(workdir, split):
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == split]


def test_reverse_sanity_task_reaches_95_percent_exact_match(tmp_path):
    """The :smoke preset is the reverse task with its step budget (1,000 steps).

    On one device, as a laptop user runs it. The trajectory depends on the summation order of
    the data-parallel gradient: measured on 2026-12-08, 1 and 8 devices ended at 100% exact
    match and 2 devices at 93.75% (token accuracy 98.9%), so the 95% bar holds for the recipe
    but not for every device split; the split mesh is tested elsewhere (test_parallelism)."""
    run("train.main", "--config=experiments/transformer.py:smoke", f"--workdir={tmp_path}",
        devices=1)
    final = _records(tmp_path, "eval")[-1]
    assert final["step"] == 1000 and final["exact_match"] >= 95.0


def write_tsv(path, n, seed):
    """Word-by-word 'translations' through a small lexicon."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(list(LEXICON)) for _ in range(rng.randint(3, 8))]
        lines.append(" ".join(words) + "\t" + " ".join(LEXICON[w] for w in words))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tsv_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mt")
    train, dev = write_tsv(tmp / "train.tsv", 300, 0), write_tsv(tmp / "dev.tsv", 20, 1)
    test = write_tsv(tmp / "test.tsv", 12, 2)
    args = ["train.main", "--config=experiments/transformer.py:smoke", f"--workdir={tmp / 'run'}",
            f"--config.data.source={train}", f"--config.data.eval_source={dev}",
            f"--config.data.test_source={test}", "--config.average_checkpoints=2",
            "--config.num_train_steps=20", "--config.eval_every_steps=10",
            "--config.checkpoint_every_steps=10", "--config.log_every_steps=5"]
    first = run(*args, "--config.stop_at_step=10")
    assert "stopped early" in first.stdout + first.stderr
    run(*args)
    return tmp / "run"


def test_translation_run_saves_resumes_and_logs_bleu(tsv_run):
    evals = _records(tsv_run, "eval")
    assert [r["step"] for r in evals] == [10, 20]
    assert all(0.0 <= r["bleu"] <= 100.0 and "exact_match" in r for r in evals)
    assert [r["step"] for r in _records(tsv_run, "train")] == [5, 10, 15, 20]
    # At the end: the mean of the checkpoints of steps 10 and 20 is evaluated on dev, then
    # translates the whole test split.
    [averaged] = _records(tsv_run, "averaged")
    assert averaged["step"] == 20 and averaged["checkpoints"] == 2 and "bleu" in averaged
    [test] = _records(tsv_run, "test")
    assert test["sentences"] == 12 and 0.0 <= test["bleu"] <= 100.0


def test_checkpoint_averaging_is_the_mean_of_the_last_checkpoints(tsv_run):
    import jax

    from train import checkpoint, tasks

    config = runs.read_run_config(str(tsv_run), "")
    task = tasks.get(config.task)
    averaged, step = runs.restore_params(config, str(tsv_run), task)  # the run's config: 2
    last, _ = runs.restore_params(config, str(tsv_run), task, average=0)
    # Independently: the two checkpoints' arrays straight from Orbax, no abstract state.
    ckpt = checkpoint.Checkpointer(str(tsv_run), async_save=False, read_only=True)
    raw = [ckpt._manager.restore(s, args=checkpoint.ocp.args.Composite(
        state=checkpoint.ocp.args.StandardRestore()))["state"]["params"] for s in (10, 20)]
    ckpt.close()
    assert step == 20
    flat = lambda tree: jax.tree.leaves(jax.device_get(tree))
    for a, l, p10, p20 in zip(flat(averaged), flat(last), flat(raw[0]), flat(raw[1])):
        np.testing.assert_allclose(a, (p10 + p20) / 2, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(l, p20)
    assert any(not np.array_equal(a, l) for a, l in zip(flat(averaged), flat(last)))


def test_averaging_more_checkpoints_than_kept_is_refused(tmp_path):
    proc = run("train.main", "--config=experiments/transformer.py:smoke",
               f"--workdir={tmp_path / 'run'}", "--config.average_checkpoints=9", check=False)
    _assert_clear_error(proc, "keep_checkpoints")
    assert not (tmp_path / "run").exists()


def test_translate_reads_a_file_and_refuses_a_missing_one(tsv_run, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("the king went\n\nthe river\n", encoding="utf-8")
    from_file = run("experiments.translate", f"--workdir={tsv_run}", f"--input={source}",
                    "--beam_size=1").stdout.splitlines()
    assert len(from_file) == 2  # one line per non-blank input line
    proc = run("experiments.translate", f"--workdir={tsv_run}", f"--input={tmp_path / 'no'}",
               check=False)
    _assert_clear_error(proc, "does not exist")


def test_label_smoothed_loss_by_hand():
    config = transformer_experiment.get_config("smoke")
    config.data.max_len = 2
    # p = (1/2, 1/4, 1/8, 1/8) at every position; the target is token 0. The decoder's output
    # is 1 (d = 1) and the tied output layer's embedding holds the log-probabilities.
    embedding = jnp.log(jnp.array([[0.5], [0.25], [0.125], [0.125]]))

    class Fixed(nn.Module):
        config: object

        @nn.compact
        def __call__(self, src, tgt, *args, hidden_only=False, **kwargs):
            assert hidden_only
            return jnp.ones(tgt.shape + (1,))

    batch = seq2seq.init_batch(config, 1)
    batch["weights"] = batch["weights"].at[0, 1].set(0.0)  # one target token counts
    model = Fixed(seq2seq.tf.TransformerConfig.from_config(config.model))
    loss_sum, sums = seq2seq.loss_fn({"embed": {"embedding": embedding}}, batch, None,
                                     model=model, train=False)
    # nll = log 2; mean over the vocabulary of -log p = (1 + 2 + 3 + 3) / 4 log 2 = 2.25 log 2;
    # smoothed = 0.9 log 2 + 0.1 * 2.25 log 2 = 1.125 log 2.
    assert float(loss_sum) == pytest.approx(1.125 * np.log(2), rel=1e-6)
    assert float(sums["nll_sum"]) == pytest.approx(np.log(2), rel=1e-6)


def test_attention_maps_for_a_translation_and_the_positions_plot(tsv_run, tmp_path):
    out = run("experiments.attention", f"--workdir={tsv_run}", "--text=the king went",
              f"--out={tmp_path / 'maps'}", f"--positions={tmp_path / 'pe.png'}").stdout
    written = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert written == ["encoder-decoder_layer_0.png", "encoder-decoder_layer_1.png"], out
    assert (tmp_path / "pe.png").stat().st_size > 1000

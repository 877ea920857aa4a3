"""Issue 19: the ReLU family's initialisation (upstream's for the AutoEncoder, the
data-fitted encoder scale for Gated and JumpReLU), schedules that follow the run's length
(warm-up, dead-feature window, batch-top-k threshold start), and the quality module on a
tiny budget."""

import json
import logging

import pytest
import torch

from dictionary_learning import trainer as trainer_module
from dictionary_learning.architectures.batch_topk import threshold_schedule
from dictionary_learning.demo_lm import DemoLMConfig
from dictionary_learning.measure.quality import (QualitySetup, format_table, run_quality,
                                                 write_report)
from dictionary_learning.trainer import Trainer, TrainerConfig, resolve_schedules

FITTED = ["GatedAutoEncoder", "JumpReluAutoEncoder"]  # the plain AutoEncoder: upstream's init


def offset_data(n=2048, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2 + torch.randn(d, generator=g)


@pytest.mark.parametrize("cls", FITTED)
def test_first_batch_fixes_the_least_squares_encoder_scale(cls):
    """After start(): encoder rows are the tied decoder rows times one scale s, and s
    minimises the first reconstruction's squared error (a nearby scale is worse), which
    is then below the data's energy (the unscaled init is far above it)."""
    d, m = 16, 256
    x = offset_data(d=d)
    t = Trainer(TrainerConfig(d, m, dict_class=cls), total_steps=10)
    ae = t.dictionary
    with torch.no_grad():
        unscaled = (x - ae(x)).pow(2).sum(-1).mean()
    t.start(x, x)
    norms = ae.W_enc.detach().norm(dim=-1)
    s = float(norms.mean())
    torch.testing.assert_close(norms, torch.full_like(norms, s))
    torch.testing.assert_close(ae.W_enc.detach() / s, ae.W_dec.detach())  # still tied, decoder unit rows
    assert 0.5 * 2 * d / m < s < 2 * 2 * d / m, s  # about 2d/m

    def mse(scale):
        with torch.no_grad():
            ae.W_enc.mul_(scale)
            error = (x - ae(x)).pow(2).sum(-1).mean()
            ae.W_enc.div_(scale)
        return float(error)

    best = mse(1.0)
    assert best < mse(0.95) and best < mse(1.05)
    assert best < float(x.pow(2).sum(-1).mean()) < float(unscaled)


def test_autoencoder_starts_as_upstream_and_its_decoder_is_unit_after_one_step():
    """Upstream's initialisation: tied rows of norm 0.1 at the first step, encoder bias
    nn.Linear's uniform draw in +-1/sqrt(d) (seeded: the same for the same seed), the
    pre-encoder bias zero; the constraint restores unit decoder rows after the step."""
    d, m = 16, 256
    x = offset_data(d=d)
    t = Trainer(TrainerConfig(d, m, seed=3), total_steps=10)
    ae = t.dictionary
    b = ae.encoder.bias.detach().clone()
    assert b.abs().max() <= d ** -0.5 and b.std() > 0.5 * d ** -0.5 / 3 ** 0.5
    torch.testing.assert_close(b, Trainer(TrainerConfig(d, m, seed=3)).dictionary.b_enc.detach())
    t.start(x, x)
    for w in (ae.W_enc, ae.W_dec):
        torch.testing.assert_close(w.norm(dim=-1), torch.full((m,), 0.1))
    torch.testing.assert_close(ae.W_enc, ae.W_dec)
    assert torch.equal(ae.b_enc, b) and not ae.bias.any()
    t.step(0, x, x)
    torch.testing.assert_close(ae.W_dec.norm(dim=-1), torch.ones(m))


def test_short_run_leaves_warm_up_and_long_run_keeps_1000():
    short = Trainer(TrainerConfig(8, 32), total_steps=30)
    assert short.config.warmup_steps == 3
    assert short.lr_at(2) == short.config.lr and short.lr_at(0) < short.config.lr
    assert Trainer(TrainerConfig(8, 32), total_steps=50_000).config.warmup_steps == 1000
    assert Trainer(TrainerConfig(8, 32)).config.warmup_steps == 1000  # length unknown


def test_explicit_values_are_honoured_and_a_misfit_is_warned_once(caplog):
    trainer_module._warned.clear()
    cfg = TrainerConfig(8, 32, lr=3e-3, warmup_steps=1000, decay_start=30,
                        dead_feature_tokens=5, sparsity_warmup_steps=40)
    with caplog.at_level(logging.WARNING, logger="dictionary_learning.trainer"):
        for _ in range(2):
            t = Trainer(cfg, total_steps=30)
    assert t.config == cfg  # nothing resolved: every field was given
    assert t.lr_at(29) < cfg.lr  # the run never leaves warm-up, as asked
    messages = [r.getMessage() for r in caplog.records]
    assert sum("warmup_steps=1000" in m for m in messages) == 1
    assert sum("sparsity_warmup_steps=40" in m for m in messages) == 1


def test_resolution_is_idempotent_and_follows_the_run():
    for cls, kwargs in [("AutoEncoder", {}), ("BatchTopKSAE", {"k": 4}),
                        ("MatryoshkaBatchTopKSAE", {"k": 4, "group_sizes": [8, 24]})]:
        cfg = TrainerConfig(8, 32, dict_class=cls, dict_kwargs=kwargs)
        once = resolve_schedules(cfg, 200)
        assert resolve_schedules(once, 200) == once
        assert once.dead_feature_tokens == 10_000_000 and once.dead_feature_steps == 3  # 200/75
        if cls != "AutoEncoder":
            assert {k: once.dict_kwargs[k] for k in threshold_schedule(200)} == \
                threshold_schedule(200)
    given = TrainerConfig(8, 32, dict_class="BatchTopKSAE",
                          dict_kwargs={"k": 4, "threshold_start_step": 7})
    assert resolve_schedules(given, 200).dict_kwargs["threshold_start_step"] == 7
    assert resolve_schedules(TrainerConfig(8, 32), None).dead_feature_steps is None


@pytest.mark.parametrize("cls, kwargs, lr, decays", [
    ("AutoEncoder", {}, 1.5e-3, True),
    ("JumpReluAutoEncoder", {}, 1e-3, False),
    ("GatedAutoEncoder", {}, 1e-3, False),
    ("AutoEncoderTopK", {"k": 4}, 2e-3, True),
    ("BatchTopKSAE", {"k": 4}, 2e-3, True),
    ("MatryoshkaBatchTopKSAE", {"k": 4, "group_sizes": [8, 24]}, 2e-3, True)])
def test_each_class_has_its_own_learning_rate_and_decay(cls, kwargs, lr, decays):
    """``lr=None`` is the class's default; ReLU and the TopK family decay linearly to 0
    over the run's last fifth (from step 80 of 100), the others keep their peak; explicit values
    win, and a run of unknown length never decays."""
    t = Trainer(TrainerConfig(8, 32, dict_class=cls, dict_kwargs=kwargs, warmup_steps=0),
                total_steps=100)
    assert t.config.lr == lr
    assert t.config.decay_start == (80 if decays else None)
    expected = [lr * (min(1.0, (100 - s) / 20) if decays else 1.0) for s in range(100)]
    assert [t.lr_at(s) for s in range(100)] == pytest.approx(expected, rel=1e-12)
    given = Trainer(TrainerConfig(8, 32, dict_class=cls, dict_kwargs=kwargs, lr=5e-4,
                                  decay_start=100), total_steps=100)
    assert given.config.lr == 5e-4 and given.lr_at(99) == given.lr_at(50) == 5e-4
    unknown = resolve_schedules(TrainerConfig(8, 32, dict_class=cls, dict_kwargs=kwargs), None)
    assert unknown.lr == lr and unknown.decay_start is None


@pytest.mark.parametrize("cls", ["AutoEncoderTopK", "BatchTopKSAE"])
def test_auxk_switches_on_in_a_short_run_only_with_the_scaled_window(cls):
    """Features that never fire (their encoder bias pushed far down) count as dead after
    1/75 of a 450-step run (6 steps), so the auxk term is nonzero from then on; with the
    old fixed 10M-token window it stays exactly 0."""
    x = offset_data(n=256)

    def auxk_terms(**extra):
        t = Trainer(TrainerConfig(16, 64, dict_class=cls, dict_kwargs={"k": 4}, **extra),
                    total_steps=450)
        with torch.no_grad():
            t.dictionary.b_enc[:32] = -1e3  # half the features can never fire
        return [float(t.step(i, x, x).out.terms["auxk"].detach()) for i in range(12)]

    scaled = auxk_terms()
    assert scaled[:6] == [0.0] * 6 and all(v > 0 for v in scaled[6:]), scaled
    assert auxk_terms(dead_feature_tokens=10_000_000) == [0.0] * 12


TINY_LM = DemoLMConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, vocab_size=300,
                       ctx_len=32, batch_size=8, steps=5, warmup_steps=1, lr=3e-3, n_docs=200)


def test_quality_runs_on_a_tiny_budget_and_writes_table_and_plot(tmp_path):
    setup = QualitySetup(steps=3, batch_size=64, expansion=2, submodule="0.mlp", ctx_len=32,
                         n_ctxs=16, eval_texts=8, eval_loss_texts=4,
                         archs=("relu", "batchtopk"), max_per_arch=2)
    report = run_quality(setup, lm_config=TINY_LM, cache_dir=tmp_path / "cache")
    assert [(r["arch"], r["dict_class"]) for r in report["rows"]] == [
        ("relu", "AutoEncoder")] * 2 + [("batchtopk", "BatchTopKSAE")] * 2
    for row in report["rows"]:
        for key in ("l0", "frac_variance_explained", "frac_alive", "frac_recovered",
                    "frac_alive_train"):
            assert isinstance(row[key], float), (key, row)
        assert 0 < row["frac_alive_train"] <= 1
    write_report(report, tmp_path / "q.json", tmp_path / "q.png")
    assert json.loads((tmp_path / "q.json").read_text())["rows"][0]["arch"] == "relu"
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(report).splitlines()
    assert len(table) == 2 + 4 and "l1=" in table[2] and "k=" in table[-1]
    assert "alive (train)" in table[0]


def test_alive_count_covers_features_that_fire_on_any_row_in_any_chunk():
    """Against a hand count, as the quality run counts alive features on training rows
    (``reconstruction_metrics`` over chunks): feature i of a diagonal ReLU dictionary
    fires exactly where column i of the data is positive; columns 2 and 4 never are,
    column 3 only on the last row (so a chunk boundary must not lose it), and features 5-7
    have a bias no row overcomes. The count covers every row and only the rows given; a
    negative number of rows is refused before anything runs."""
    from dictionary_learning.architectures.autoencoder import AutoEncoder
    from dictionary_learning.evaluation import reconstruction_metrics

    ae = AutoEncoder(5, 8)
    with torch.no_grad():
        ae.bias.zero_()
        ae.encoder.weight.zero_()
        ae.encoder.weight[:5] = torch.eye(5)
        ae.encoder.bias.copy_(torch.tensor([0.0] * 5 + [-100.0] * 3))
    rows = -torch.rand(10, 5)
    rows[0, 0] = rows[4, 1] = rows[9, 3] = 1.0

    def alive(rows, chunk):
        return reconstruction_metrics(ae, rows.split(chunk))["frac_alive"]

    for chunk in (1, 3, 4, 10, 64):
        assert alive(rows, chunk) == 3 / 8
    assert alive(rows[:9], 4) == 2 / 8
    with pytest.raises(ValueError, match="no tokens"):
        alive(rows[:0], 4)
    with pytest.raises(ValueError, match="alive_rows must be 0 or more"):
        QualitySetup(alive_rows=-1)


def test_upstream_line_needs_its_package_and_trains_on_the_same_rows(tmp_path, monkeypatch):
    """``upstream-relu`` refuses clearly without upstream's package; with one (here a
    stand-in whose trainer records what it is given and keeps its weights at their
    initialisation) it gets the same batches as ours, in order, for ``steps`` steps, and
    its weights are scored as an ``AutoEncoder``."""
    import sys
    import types

    from dictionary_learning.measure import quality
    from dictionary_learning.architectures.autoencoder import AutoEncoder

    setup = QualitySetup(steps=3, batch_size=4, expansion=2, max_per_arch=2)
    rows = torch.randn(20, 8)
    monkeypatch.setitem(sys.modules, "upstream_dl", None)
    with pytest.raises(ImportError, match="upstream_dl"):
        quality.upstream_dictionaries(rows, setup)

    seen = []

    class StandardTrainer:
        def __init__(self, steps, activation_dim, dict_size, l1_penalty, warmup_steps, **kw):
            self.args = (steps, activation_dim, dict_size, l1_penalty, warmup_steps)
            self.ae = AutoEncoder(activation_dim, dict_size)

        def update(self, step, x):
            seen.append((self.args, step, x.clone()))

    standard = types.ModuleType("upstream_dl.trainers.standard")
    standard.StandardTrainer = StandardTrainer
    for name, module in [("upstream_dl", types.ModuleType("upstream_dl")),
                         ("upstream_dl.trainers", types.ModuleType("upstream_dl.trainers")),
                         ("upstream_dl.trainers.standard", standard)]:
        monkeypatch.setitem(sys.modules, name, module)
    configs, dictionaries = quality.upstream_dictionaries(rows, setup)
    penalties = [c["sparsity_penalty"] for c in quality.SWEEP["relu"][:2]]
    assert [c.sparsity_penalty for c in configs] == penalties
    assert [a[0] for a in seen] == [(3, 8, 16, p, 1) for step in range(3) for p in penalties]
    for args, step, x in seen:
        torch.testing.assert_close(x, rows[4 * step:4 * step + 4], rtol=0, atol=0)
    assert all(type(ae) is AutoEncoder and ae.dict_size == 16 for ae in dictionaries)

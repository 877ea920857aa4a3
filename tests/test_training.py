"""The training loop: a textbook reference step, planted-feature recovery, resampling,
the entropy and stretcher paths, and the saved folder layout."""

import json

import pytest
import torch
from conftest import planted_dictionary_data

from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.dictionary import AutoEncoder, MLPStretcher
from dictionary_learning.loading import load_dictionary
from dictionary_learning.training import Trainer, TrainerConfig, trainSAE, train_dictionaries


def batches(X, size=512, epochs=1):
    for _ in range(epochs):
        for i in range(0, len(X), size):
            yield X[i:i + size]


def test_step_equals_textbook_sae_step():
    """Three steps of the loop equal a plain hand-written SAE update."""
    torch.manual_seed(0)
    cfg = TrainerConfig(8, 24, lr=1e-2, sparsity_penalty=0.1, warmup_steps=4)
    trainer = Trainer(cfg)
    ae = trainer.dictionary
    xs = [torch.randn(32, 8) for _ in range(3)]
    trainer.start(xs[0], xs[0])  # the initial 0.1 scale: the reference starts after it
    b, We, be, Wd = (ae.bias.detach().clone().requires_grad_(),
                     ae.encoder.weight.detach().clone().requires_grad_(),
                     ae.encoder.bias.detach().clone().requires_grad_(),
                     ae.decoder.weight.detach().clone().requires_grad_())
    opt = torch.optim.Adam([b, We, be, Wd], lr=cfg.lr)
    for step, x in enumerate(xs):
        trainer.step(step, x, x)
        # Reference: f = relu(We (x - b) + be), x_hat = Wd f + b.
        f = torch.relu((x - b) @ We.T + be)
        x_hat = f @ Wd.T + b
        loss = (x - x_hat).pow(2).sum(-1).mean() + 0.1 * f.abs().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():  # rows of norm 0.1 at the first step
            cols = Wd / Wd.norm(dim=0, keepdim=True)
            Wd.grad -= (Wd.grad * cols).sum(0, keepdim=True) * cols
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 4)
        opt.step()
        with torch.no_grad():
            Wd /= Wd.norm(dim=0, keepdim=True)
    for ours, ref in [(ae.bias, b), (ae.encoder.weight, We), (ae.encoder.bias, be),
                      (ae.decoder.weight, Wd)]:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_recovers_planted_features_and_keeps_unit_decoder():
    X, D = planted_dictionary_data(d=32, m=64, n=100_000)
    ae = trainSAE(batches(X, epochs=3), 32, 128, lr=1e-2, sparsity_penalty=0.3,
                  warmup_steps=50, progress=False)
    best_cos = (D @ ae.W_dec.T).max(dim=1).values
    assert (best_cos > 0.9).float().mean() >= 0.8, best_cos
    torch.testing.assert_close(ae.W_dec.norm(dim=-1), torch.ones(128))


@pytest.mark.parametrize("resample", [True, False])
def test_resampling_revives_dead_features(resample):
    X, _ = planted_dictionary_data(d=32, m=64, n=40_000, seed=1)
    cfg = TrainerConfig(32, 128, lr=1e-2, sparsity_penalty=0.3, warmup_steps=10,
                        resample_steps=25 if resample else None)
    trainer = Trainer(cfg)
    dead = torch.arange(32)
    with torch.no_grad():
        trainer.dictionary.b_enc[dead] = -100.0  # these features can never fire
    for step, x in enumerate(batches(X, size=512)):
        trainer.step(step, x, x)
    with torch.no_grad():
        fires = (trainer.dictionary.encode(X[:5000])[:, dead] > 0).any(dim=0)
    if resample:
        assert trainer.n_resampled >= len(dead)
        assert fires.float().mean() >= 0.9
    else:
        assert not fires.any()


def test_no_resampling_in_the_last_window_of_a_known_run():
    """Resampling every 5 steps of a 12-step run: after step index 4 (5 more steps to
    train) but not after index 9 (a feature resampled then would get 2 steps). A run of
    unknown length resamples at every interval."""
    x = torch.randn(64, 8)

    def resampled_at(total_steps):
        trainer = Trainer(TrainerConfig(8, 32, resample_steps=5), total_steps=total_steps)
        real, steps = trainer.resample_dead, []
        trainer.resample_dead = lambda step, *a: steps.append(step) or real(step, *a)
        for step in range(12):
            with torch.no_grad():
                trainer.dictionary.b_enc[:4] = -1e3  # 4 features never fire
            trainer.step(step, x, x)
        assert trainer.n_resampled >= 4 * len(steps)
        return steps

    assert resampled_at(12) == [4]
    assert resampled_at(None) == [4, 9]


def test_entropy_penalty_trains_and_lowers_loss():
    X, _ = planted_dictionary_data(d=16, m=32, n=20_000, seed=2)
    cfg = TrainerConfig(16, 64, lr=1e-2, sparsity_penalty=0.1, penalty="entropy",
                        warmup_steps=5)
    trainer = Trainer(cfg)
    losses = [float(trainer.step(i, x, x).loss) for i, x in enumerate(batches(X, 256))]
    assert set(Trainer.summary(trainer.step(0, X[:8], X[:8]))) >= {"mse", "entropy", "l0"}
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def test_stretcher_learns_a_map_between_widths():
    """(x_in, x_out) pairs of different widths train an MLPStretcher."""
    X, _ = planted_dictionary_data(d=16, m=32, n=30_000, seed=3)
    W = torch.randn(16, 24, generator=torch.Generator().manual_seed(0)) / 4
    pairs = [(x, torch.relu(x) @ W) for x in batches(X, 256)]
    ae = trainSAE(iter(pairs), (16, 24), 64, lr=1e-2, sparsity_penalty=1e-3, warmup_steps=5,
                  progress=False)
    assert isinstance(ae, MLPStretcher) and ae.output_dim == 24
    x, y = pairs[0]
    with torch.no_grad():
        before = (y - MLPStretcher(16, 64, 24)(x)).pow(2).sum(-1).mean()
        after = (y - ae(x)).pow(2).sum(-1).mean()
    assert after < 0.2 * before


def test_saved_folder_layout_and_reload(tmp_path, models, texts):
    model = models["pythia"]
    buffer = ActivationBuffer(texts, model, model.gpt_neox.layers[1].mlp, n_ctxs=20,
                              ctx_len=32, refresh_batch_size=16, out_batch_size=64,
                              progress=False)
    ae = trainSAE(buffer, 64, 256, lr=1e-3, sparsity_penalty=1e-3, steps=12, warmup_steps=5,
                  save_dir=tmp_path, save_steps=5, progress=False)
    names = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert {"ae.pt", "config.json", "metrics.jsonl", "checkpoints/ae_5.pt",
            "checkpoints/ae_10.pt", "checkpoints/trainer_state_10.pt"} <= names
    assert not any(n.endswith(".tmp") for n in names)
    config = json.loads((tmp_path / "config.json").read_text())
    trainer = config["trainer"]
    assert trainer["dict_class"] == "AutoEncoder" and trainer["activation_dim"] == 64
    assert trainer["dict_size"] == 256 and trainer["lr"] == 1e-3
    assert trainer["submodule_name"] == "gpt_neox.layers.1.mlp" and trainer["layer"] == 1
    assert config["buffer"]["ctx_len"] == 32 and config["buffer"]["io"] == "out"
    assert config["run"]["finished"] and config["run"]["steps_done"] == 12
    assert config["run"]["activations_trained"] == 12 * 64
    assert config["buffer"]["tokens_seen"] >= 12 * 64
    assert "torch" in config["run"]["versions"]
    loaded, _ = load_dictionary(tmp_path)
    x = next(buffer)
    assert torch.equal(loaded(x), ae(x))
    # Checkpoints are bare state_dicts in the published layout.
    ckpt = AutoEncoder.from_pretrained(tmp_path / "checkpoints" / "ae_10.pt")
    assert ckpt.dict_size == 256
    state = torch.load(tmp_path / "checkpoints" / "trainer_state_10.pt", weights_only=True)
    assert state["step"] == 10 and "optimizer" in state


def test_several_dictionaries_from_one_stream(tmp_path):
    X, _ = planted_dictionary_data(d=16, m=32, n=5_000, seed=4)
    configs = [TrainerConfig(16, 32, sparsity_penalty=p, warmup_steps=5) for p in (1e-3, 1e-1)]
    stream_len = [0]

    def stream():
        for x in batches(X, 250):
            stream_len[0] += 1
            yield x

    dicts = train_dictionaries(stream(), configs, save_dir=tmp_path, progress=False)
    assert stream_len[0] == 20  # each batch read once, shared by both dictionaries
    for i, ae in enumerate(dicts):
        loaded, config = load_dictionary(tmp_path / f"trainer_{i}")
        assert config["trainer"]["sparsity_penalty"] == configs[i].sparsity_penalty
        assert torch.equal(loaded.encoder.weight, ae.encoder.weight)
    l0 = [(ae.encode(X) > 0).sum(-1).float().mean() for ae in dicts]
    assert l0[1] < l0[0]  # the larger penalty is sparser


def test_crash_mid_run_leaves_loadable_checkpoint(tmp_path):
    X, _ = planted_dictionary_data(d=16, m=32, n=5_000, seed=5)

    def stream():
        yield from batches(X[:2000], 250)  # 8 good batches
        yield torch.randn(250, 17)          # then a batch of the wrong width

    with pytest.raises(ValueError, match="last dimension is 16"):
        train_dictionaries(stream(), [TrainerConfig(16, 32)], save_dir=tmp_path, save_steps=4,
                           progress=False)
    ckpt = AutoEncoder.from_pretrained(tmp_path / "checkpoints" / "ae_8.pt")
    assert ckpt.activation_dim == 16
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["run"]["steps_done"] == 8 and not config["run"]["finished"]


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="penalty must be one of"):
        TrainerConfig(8, 16, penalty="l2")
    with pytest.raises(ValueError, match="unknown dictionary class 'Nope'"):
        TrainerConfig(8, 16, dict_class="Nope")
    with pytest.raises(ValueError, match="activation_dim is 8 but the activations have width 9"):
        trainSAE(iter([torch.randn(4, 9)]), 8, 16, lr=1e-3, sparsity_penalty=1e-3)
    with pytest.raises(ValueError, match="no batch"):
        trainSAE(iter([]), 8, 16, lr=1e-3, sparsity_penalty=1e-3)


def test_learning_rate_and_sparsity_schedules():
    cfg = TrainerConfig(8, 16, lr=1.0, warmup_steps=10, decay_start=60,
                        sparsity_penalty=2.0, sparsity_warmup_steps=4)
    trainer = Trainer(cfg, total_steps=100)
    assert trainer.lr_at(0) == pytest.approx(0.1) and trainer.lr_at(9) == pytest.approx(1.0)
    assert trainer.lr_at(59) == 1.0
    assert trainer.lr_at(80) == pytest.approx(0.5) and trainer.lr_at(100) == 0.0
    assert [trainer.sparsity_coefficient(s) for s in (0, 1, 3, 50)] == [0.5, 1.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="decay_start needs a known number of steps"):
        Trainer(cfg)


def test_jumprelu_thresholds_train_at_their_scaled_learning_rate():
    """Adam's first step moves every parameter with a gradient by the learning rate (its
    update is lr * g / |g|): the thresholds by ``threshold_lr_scale`` times the warmed-up
    rate, ``b_dec`` by the rate itself."""
    torch.manual_seed(0)
    X, _ = planted_dictionary_data(d=16, m=32, n=256, seed=0)
    cfg = TrainerConfig(16, 64, lr=1e-3, warmup_steps=4, dict_class="JumpReluAutoEncoder",
                        sparsity_penalty=1.0, dict_kwargs={"target_l0": 2.0, "bandwidth": 0.5,
                                                           "threshold_lr_scale": 7.0})
    trainer = Trainer(cfg)
    ae = trainer.dictionary
    trainer.start(X, X)
    before = {name: p.detach().clone() for name, p in ae.named_parameters()}
    trainer.step(0, X, X)
    lr = 1e-3 / 4  # the first warm-up step
    moved = (ae.threshold - before["threshold"]).abs()
    assert (moved > 0).sum() > 10  # thresholds with pre-activations within the kernel
    torch.testing.assert_close(moved[moved > 0], torch.full_like(moved[moved > 0], 7 * lr),
                               rtol=1e-3, atol=0)
    torch.testing.assert_close((ae.b_dec - before["b_dec"]).abs(),
                               torch.full((16,), lr), rtol=1e-3, atol=0)
    assert [g.get("lr_scale", 1.0) for g in trainer.optimizer.param_groups] == [1.0, 7.0]


def test_a_checkpoint_with_other_parameter_groups_is_refused_clearly():
    """A JumpReLU checkpoint from before the thresholds had their own group (one Adam group
    for every parameter) is refused, not resumed at another threshold rate."""
    X, _ = planted_dictionary_data(d=16, m=32, n=64, seed=0)
    cfg = TrainerConfig(16, 64, warmup_steps=1, dict_class="JumpReluAutoEncoder")
    trainer = Trainer(cfg)
    trainer.step(0, X, X)
    Trainer(cfg).load_state(trainer.state())  # this version's own state resumes
    old = trainer.state()
    old["optimizer"] = torch.optim.Adam(trainer.dictionary.parameters()).state_dict()
    with pytest.raises(ValueError, match="1 parameter group.*trains 2.*older version"):
        Trainer(cfg).load_state(old)


def test_gradient_clipping_bounds_the_gradient_norm(monkeypatch):
    trainer = Trainer(TrainerConfig(8, 32, grad_clip_norm=1e-3, warmup_steps=1))
    norms = []
    original = trainer.optimizer.step

    def spy(*args, **kwargs):
        grads = [p.grad for p in trainer.dictionary.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", spy)
    for step in range(3):
        x = 100 * torch.randn(64, 8)
        trainer.step(step, x, x)
    assert max(norms) <= 1e-3 * (1 + 1e-4)


def test_normalised_training_saves_a_dictionary_for_raw_activations(tmp_path):
    X, _ = planted_dictionary_data(d=16, m=32, n=20_000, seed=6)
    X = 50.0 * X + 3.0  # far from unit scale
    cfg = TrainerConfig(16, 64, lr=1e-2, sparsity_penalty=0.05, warmup_steps=10,
                        normalize_activations=True)
    trainer_dicts = train_dictionaries(batches(X, 500), [cfg], save_dir=tmp_path,
                                       progress=False)
    saved, config = load_dictionary(tmp_path)
    scale = config["run"]["activation_scale"]
    assert scale == pytest.approx(16 ** 0.5 / float(X[:500].norm(dim=-1).mean()), rel=1e-5)
    # The saved dictionary on raw x equals the trained one on scaled x, scaled back.
    trainer = Trainer(cfg)
    trainer.dictionary.load_state_dict(saved.state_dict())
    trainer.dictionary.scale_biases(scale)  # back to the space it was trained in
    x = X[:100]
    with torch.no_grad():
        torch.testing.assert_close(saved(x), trainer.dictionary(x * scale) / scale,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(trainer_dicts[0](x), saved(x))
        fve = 1 - (saved(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fve > 0.8


def test_dictionaries_on_several_submodules_from_one_stream(tmp_path, models, texts):
    model = models["pythia"]
    paths = ["gpt_neox.layers.0.mlp", "gpt_neox.layers.1.mlp"]
    buffer = ActivationBuffer(texts, model, paths, n_ctxs=20, ctx_len=32, out_batch_size=64,
                              refresh_batch_size=16, progress=False)
    configs = [TrainerConfig(64, 128, submodule=p, warmup_steps=2) for p in paths]
    dicts = train_dictionaries(buffer, configs, steps=6, save_dir=tmp_path, progress=False)
    for i, p in enumerate(paths):
        _, config = load_dictionary(tmp_path / f"trainer_{i}")
        assert config["trainer"]["submodule_name"] == p and config["trainer"]["layer"] == i
    assert not torch.equal(dicts[0].encoder.weight, dicts[1].encoder.weight)
    with pytest.raises(ValueError, match="set TrainerConfig.submodule"):
        train_dictionaries(buffer, [TrainerConfig(64, 128)], steps=1, progress=False)


def test_bf16_autocast_trains():
    X, _ = planted_dictionary_data(d=16, m=32, n=10_000, seed=7)
    trainer = Trainer(TrainerConfig(16, 64, lr=1e-2, sparsity_penalty=0.1, warmup_steps=5,
                                    autocast_dtype="bfloat16"))
    losses = [float(trainer.step(i, x, x).loss) for i, x in enumerate(batches(X, 250))]
    assert trainer.dictionary.encoder.weight.dtype == torch.float32
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])

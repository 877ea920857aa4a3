"""Interventions while generating, against an independent reference: the plain HF
``generate`` of the same model with hand-written PyTorch forward hooks doing the edit's
arithmetic. Greedy decoding, so equal arithmetic gives equal tokens; the empty intervention
must be the clean model bit for bit. Then the command line and the viewer's steer box."""

import json
import urllib.error
import urllib.request

import pytest
import torch

from dictionary_learning import steering
from dictionary_learning.cli.steer import COLUMN
from dictionary_learning.registry import DICTIONARY_CLASSES
from dictionary_learning.session import load_setting

from conftest import dictionary_kwargs

D, M = 64, 256
PROMPTS = ["Return the number of items", "The"]  # two lengths: a left-padded batch
NEW = 6
SUBMODULES = {"pythia": "gpt_neox.layers.0.mlp", "gpt2": "transformer.h.0.mlp",
              "llama": "model.layers.0.mlp"}


def make_dictionary(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cls = DICTIONARY_CLASSES[name]
    if name == "IdentityDict":
        return cls(D)
    kwargs = {"TokenNormalizedSAE": {"k": 0}, "Transcoder": {"k": 8}}.get(
        name, dictionary_kwargs(name, M))
    dictionary = cls(D, M, **kwargs).eval()
    if name == "Transcoder":
        with torch.no_grad():
            dictionary.W_skip.normal_(0, 0.05)
    return dictionary


def io_of(name: str) -> str:
    return "in_to_out" if name in ("MLPStretcher", "Transcoder") else "out"


# -- the reference: HF generate with hand-written hooks -------------------------------------


def prompt_batch(tokenizer, prompts):
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


def hf_generate(model, prompts, hook=None, module=None, io="out", temperature=0.0, seed=None,
                max_new_tokens=NEW):
    """Plain ``transformers`` generate; ``hook(x_enc, target, positions)`` replaces the
    module's activation at every forward, positions counted by hand from the calls."""
    hf, tokenizer = model._module, model.tokenizer
    ids, mask = prompt_batch(tokenizer, prompts)
    n_real = mask.sum(-1, keepdim=True)
    calls = []

    def positions(T):
        step = len(calls)
        calls.append(T)
        if step == 0:
            return torch.where(mask.bool(), mask.cumsum(-1) - 1, -1)
        return (n_real + step - 1).expand(-1, T)

    handles = []
    if hook is not None and io == "in":
        handles.append(module.register_forward_pre_hook(
            lambda m, args: (hook(args[0], args[0], positions(args[0].shape[1])), *args[1:])))
    elif hook is not None:
        def forward_hook(m, args, out):
            x_enc = args[0] if io == "in_to_out" else out
            return hook(x_enc, out, positions(out.shape[1]))
        handles.append(module.register_forward_hook(forward_hook))
    sampling = dict(do_sample=False, temperature=None, top_k=None, top_p=None) \
        if temperature == 0 else dict(do_sample=True, temperature=temperature, top_k=0,
                                      top_p=1.0)
    try:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id, **sampling)
    finally:
        for h in handles:
            h.remove()
    eos = tokenizer.eos_token_id
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


def hand_edit(kind, features, value=0.0, start=0):
    """An edit of features ``f [B, T, m]`` at positions >= start, written out."""
    def edit(f, pos):
        on = (pos >= start)[..., None]
        old = f[..., features]
        new = {"ablate": torch.zeros_like(old), "clamp": torch.full_like(old, value),
               "add": old + value, "scale": old * value}[kind]
        f[..., features] = torch.where(on, new, old)
        return f
    return edit


def by_definition(dictionary, edits):
    """x' = x̂(f') + (x - x̂(x)): the edited reconstruction plus the error term."""
    def recon(f, x):
        return dictionary.reconstruct(f, x) if hasattr(dictionary, "reconstruct") \
            else dictionary.decode(f)

    def hook(x_enc, target, pos):
        f = dictionary.encode(x_enc)
        f_new = f.clone()
        for edit in edits:
            f_new = edit(f_new, pos)
        return recon(f_new, x_enc) + (target - dictionary(x_enc))
    return hook


# -- every class: empty = clean bit for bit; an edit = the definition -----------------------


@pytest.mark.parametrize("name", sorted(DICTIONARY_CLASSES))
def test_every_class_empty_is_clean_and_edits_match_the_definition(models, name):
    model, sub = models["pythia"], SUBMODULES["pythia"]
    dictionary, io = make_dictionary(name), io_of(name)
    module = model._module.get_submodule(sub)
    clean = hf_generate(model, PROMPTS)

    empty = steering.generate(model, sub, dictionary, PROMPTS, steering.Interventions(), io=io,
                              max_new_tokens=NEW)
    assert empty.baseline.ids == empty.intervened.ids == clean
    nt = steering.logit_diff(model, sub, dictionary, PROMPTS, steering.Interventions(), io=io)
    assert torch.equal(nt.clean, nt.intervened)  # bit for bit, not approximately

    edits = (steering.clamp(0, 4.0) + steering.scale([1, 2], 3.0)
             + steering.add(5, 12.0, start=3) + steering.ablate([6, 7]))
    hand = [hand_edit("clamp", [0], 4.0), hand_edit("scale", [1, 2], 3.0),
            hand_edit("add", [5], 12.0, start=3), hand_edit("ablate", [6, 7])]
    got = steering.generate(model, sub, dictionary, PROMPTS, edits, io=io, max_new_tokens=NEW)
    assert got.baseline.ids == clean
    assert got.intervened.ids == hf_generate(model, PROMPTS, by_definition(dictionary, hand),
                                             module, io)
    nt = steering.logit_diff(model, sub, dictionary, PROMPTS, edits, io=io)
    assert nt.diff.abs().max() > 1e-4  # the edits change the model: the check can fail


# -- each kind, written as the decoder-direction arithmetic, io out and in ------------------


def direction_hook(dictionary, kind, feature, value, start=0):
    """The textbook forms with the decoder row d = W_dec[i]: ablate x - f_i d, clamp
    x + (v - f_i) d, add x + s d, scale x + (c - 1) f_i d."""
    d = dictionary.W_dec[feature]

    def hook(x_enc, target, pos):
        f_i = dictionary.encode(x_enc)[..., feature:feature + 1]
        coefficient = {"ablate": -f_i, "clamp": value - f_i,
                       "add": torch.full_like(f_i, value), "scale": (value - 1) * f_i}[kind]
        return target + torch.where((pos >= start)[..., None], coefficient, 0) * d
    return hook


@pytest.mark.parametrize("io", ["out", "in"])
@pytest.mark.parametrize("kind, value", [("ablate", 0.0), ("clamp", 6.0), ("add", 10.0),
                                         ("scale", 4.0)])
def test_each_intervention_equals_hooks_on_hf_generate(models, kind, value, io):
    from dictionary_learning import AutoEncoder

    model, sub = models["pythia"], SUBMODULES["pythia"]
    torch.manual_seed(1)
    ae = AutoEncoder(D, M)
    # A feature that fires on the prompts, so ablating and scaling it do something.
    feature = 7
    with torch.no_grad():
        ae.encoder.bias[feature] = 2.0
    edit = steering.ablate(feature) if kind == "ablate" else \
        getattr(steering, kind)(feature, value)
    got = steering.generate(model, sub, ae, PROMPTS, edit, io=io, max_new_tokens=NEW)
    module = model._module.get_submodule(sub)
    want = hf_generate(model, PROMPTS, direction_hook(ae, kind, feature, value), module, io)
    assert got.intervened.ids == want
    assert got.baseline.ids == hf_generate(model, PROMPTS)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_other_architectures_from_a_position_on(models, arch):
    from dictionary_learning import AutoEncoder

    model, sub = models[arch], SUBMODULES[arch]
    torch.manual_seed(2)
    ae = AutoEncoder(D, M)
    edits = steering.add(3, 25.0, start=5) + steering.ablate(4)
    got = steering.generate(model, sub, ae, PROMPTS, edits, max_new_tokens=NEW)
    hand = [hand_edit("add", [3], 25.0, start=5), hand_edit("ablate", [4])]
    module = model._module.get_submodule(sub)
    assert got.intervened.ids == hf_generate(model, PROMPTS, by_definition(ae, hand), module)
    assert got.baseline.ids == hf_generate(model, PROMPTS)
    assert got.intervened.ids != got.baseline.ids  # a large direction changes the tokens


def test_sampling_with_a_seed_equals_hf_sampling_and_keeps_the_callers_rng(models):
    from dictionary_learning import AutoEncoder

    model, sub = models["pythia"], SUBMODULES["pythia"]
    torch.manual_seed(3)
    ae = AutoEncoder(D, M)
    edit = steering.add(9, 6.0)
    state = torch.random.get_rng_state()
    got = steering.generate(model, sub, ae, PROMPTS, edit, temperature=0.8, seed=5,
                            max_new_tokens=NEW)
    assert torch.equal(torch.random.get_rng_state(), state)
    module = model._module.get_submodule(sub)
    hand = by_definition(ae, [hand_edit("add", [9], 6.0)])
    assert got.intervened.ids == hf_generate(model, PROMPTS, hand, module, temperature=0.8,
                                             seed=5)
    assert got.baseline.ids == hf_generate(model, PROMPTS, temperature=0.8, seed=5)


def test_logit_diff_equals_a_hooked_forward(models):
    from dictionary_learning import AutoEncoder

    model, sub = models["pythia"], SUBMODULES["pythia"]
    torch.manual_seed(4)
    ae = AutoEncoder(D, M)
    nt = steering.logit_diff(model, sub, ae, PROMPTS[0], steering.clamp(11, 5.0))
    hf = model._module
    ids, mask = prompt_batch(model.tokenizer, PROMPTS[:1])
    handle = hf.get_submodule(sub).register_forward_hook(
        lambda m, a, out: direction_hook(ae, "clamp", 11, 5.0)(out, out, mask.cumsum(-1) - 1))
    with torch.no_grad():
        patched = hf(input_ids=ids, attention_mask=mask).logits[:, -1].log_softmax(-1)
    handle.remove()
    with torch.no_grad():
        clean = hf(input_ids=ids, attention_mask=mask).logits[:, -1].log_softmax(-1)
    torch.testing.assert_close(nt.clean, clean, rtol=0, atol=1e-6)
    torch.testing.assert_close(nt.intervened, patched, rtol=0, atol=1e-5)
    torch.testing.assert_close(nt.diff, patched - clean, rtol=0, atol=1e-5)
    top = steering.top_changes(nt, model.tokenizer, k=3)
    change = (patched.exp() - clean.exp())[0]
    assert [c["id"] for c in top["raised"]] == change.topk(3).indices.tolist()
    assert [c["id"] for c in top["lowered"]] == (-change).topk(3).indices.tolist()


def test_bad_interventions_are_refused(models):
    from dictionary_learning import AutoEncoder

    model, sub = models["pythia"], SUBMODULES["pythia"]
    ae = AutoEncoder(D, M)
    with pytest.raises(ValueError, match="feature 256 out of range.*0..255"):
        steering.generate(model, sub, ae, "x", steering.add(256, 1.0))
    with pytest.raises(ValueError, match="finite value"):
        steering.clamp(1, float("nan"))
    with pytest.raises(TypeError, match="feature id"):
        steering.ablate([])
    with pytest.raises(ValueError, match="io must be one of"):
        steering.logit_diff(model, sub, ae, "x", steering.ablate(1), io="both")
    assert str(steering.add(12, 8) + steering.ablate([5, 7], start=2)) == \
        "add 8 to 12; ablate 5,7 from position 2"


# -- the command line and the viewer's steer box ---------------------------------------------


@pytest.fixture(scope="module")
def dict_folder(tmp_path_factory):
    from dictionary_learning import AutoEncoder

    from cli_helpers import nested_config, save_dictionary, shared_model_folder

    model_dir = shared_model_folder(tmp_path_factory)
    torch.manual_seed(5)
    folder = tmp_path_factory.mktemp("steer") / "dict"
    save_dictionary(folder, AutoEncoder(D, M), nested_config(model_dir, "gpt_neox.layers.1.mlp",
                                                               M))
    return folder


def test_steer_command_prints_both_continuations_and_the_changed_tokens(dict_folder, capsys):
    from dictionary_learning.cli import main

    assert main(["steer", str(dict_folder), "--prompt", "Return the", "--feature", "3",
                 "--add", "30", "--ablate", "5,7", "--max-new-tokens", "5", "--top", "3"]) == 0
    out = capsys.readouterr().out
    s = load_setting(dict_folder)
    edits = steering.ablate([5, 7]) + steering.add(3, 30.0)
    gen = steering.generate(s.model, s.submodule, s.dictionary, "Return the", edits,
                            max_new_tokens=5)
    assert "Intervention: ablate 5,7; add 30 to 3 (gpt_neox.layers.1.mlp, io=out); greedy" in out
    lines = out.split("-+-", 1)[1].split("\n\n")[0].splitlines()[1:]
    width = COLUMN

    def squeezed(text):
        return "".join(text.split())
    assert squeezed("".join(l[:width] for l in lines)) == squeezed(gen.baseline.text[0])
    assert squeezed("".join(l[width + 3:] for l in lines)) == squeezed(gen.intervened.text[0])
    assert out.count("raised ") == 3 and out.count("lowered ") == 3

    assert main(["steer", str(dict_folder), "--prompt", "x", "--add", "3"]) == 2
    assert "--add needs --feature" in capsys.readouterr().err
    assert main(["steer", str(dict_folder), "--prompt", "x", "--ablate", "999"]) == 2
    assert "feature 999 out of range" in capsys.readouterr().err


def post(url, body, headers=None):
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_viewer_steer_box_runs_the_same_code_only_from_its_own_page(dict_folder, tmp_path):
    from test_viewer import get_json, running

    from dictionary_learning.viewer.steer import SteerBackend
    from dictionary_learning.viewer.synthetic import write_synthetic_run

    run = write_synthetic_run(tmp_path / "run", n_features=M)
    s = load_setting(dict_folder)
    with running(run) as url:  # started without the model: no steer box
        assert get_json(f"{url}/api/steer")[1]["available"] is False
        assert post(f"{url}/api/steer", {"prompt": "x"})[0] == 404
    body = {"prompt": "Return the", "edits": [{"kind": "clamp", "features": [3], "value": 9}],
            "max_new_tokens": 4}
    with running(run, steer=SteerBackend(s)) as url:
        status, info = get_json(f"{url}/api/steer")
        assert info["available"] and info["dict_size"] == M
        status, answer = post(f"{url}/api/steer", body)
        assert status == 200
        gen = steering.generate(s.model, s.submodule, s.dictionary, "Return the",
                                steering.clamp(3, 9.0), max_new_tokens=4)
        assert answer["intervened"]["text"] == gen.intervened.text[0]
        assert answer["baseline"]["text"] == gen.baseline.text[0]
        assert "".join(answer["intervened"]["tokens"]) == gen.intervened.text[0]
        assert post(f"{url}/api/steer", body, {"Origin": "http://evil.example"})[0] == 403
        assert post(f"{url}/api/steer", body, {"Host": "evil.example:80"})[0] == 403
        assert post(f"{url}/api/steer", body, {"Content-Type": "text/plain"})[0] == 415
        bad = {**body, "edits": [{"kind": "add", "features": [M], "value": 1}]}
        status, error = post(f"{url}/api/steer", bad)
        assert status == 400 and f"0 to {M - 1}" in error["error"]
        assert post(f"{url}/api/steer", {**body, "max_new_tokens": 10**6})[0] == 400

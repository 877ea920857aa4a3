"""Cross-check the format converters against the original libraries (run by hand; pytest does
not collect this file: it needs sae-lens and eai-sparsify, which the project does not depend
on). Installed beside the project without touching its environment, e.g.::

    pip install --no-deps --target /tmp/x sae-lens==6.54.12 "transformer-lens>=2.16.1,<3" \\
        jaxtyping wadler-lindig typeguard simple-parsing docstring-parser fancy-einsum \\
        better-abc python-dotenv tenacity eai-sparsify==1.3.3 natsort schedulefree
    PYTHONPATH=/tmp/x .venv/bin/python tests/crosscheck_formats.py

(and with ``pip install --no-deps --target /tmp/old sae-lens==4.4.5`` first on the path for
pre-6.0 configs). Upstream saprmarks/dictionary_learning is compared when its package is
importable as ``upstream_dl`` (both packages share a name), e.g. from a checkout::

    git -C UPSTREAM archive HEAD dictionary_learning | tar -x -C /tmp/up
    mv /tmp/up/dictionary_learning /tmp/up/upstream_dl
    PYTHONPATH=/tmp/x:/tmp/up .venv/bin/python tests/crosscheck_formats.py

Released layouts (Gemma Scope 1 and 2,
Llama Scope, Goodfire, saprmarks folders of SAEBench) are compared with SAELens's own loaders
and ``from_pretrained`` on its registry's release ids, their Hub downloads served from a Hub
cache laid out here (``HF_HUB_OFFLINE=1``). Every line prints PASS/FAIL (INFO for measured
facts) with the largest differences; results are in the report of the formats work.
"""

import itertools
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(tempfile.mkdtemp())
os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(ROOT / "hub"))  # before any HF import

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")
import test_formats as T  # noqa: E402
import sae_lens  # noqa: E402
from sae_lens import SAE  # noqa: E402

from dictionary_learning.formats import save_saelens  # noqa: E402
from dictionary_learning.loading import load_dictionary  # noqa: E402

X = T.inputs()
V6 = int(sae_lens.__version__.split(".")[0]) >= 6
torch.manual_seed(0)


def report(tag, ours, f_ref, out_ref, x=X, tol=1e-4):
    with torch.no_grad():
        df = (ours.encode(x).float() - f_ref.float()).abs().max().item()
        dx = (ours(x).float() - out_ref.float()).abs().max().item()
    print("PASS" if max(df, dx) < tol else "FAIL", tag, type(ours).__name__,
          f"max|df|={df:.1e} max|dx|={dx:.1e}")


def saelens_folders_we_write():
    """Folders written from the documented keys (as the tests do), read by SAELens."""
    for arch, a, norm in itertools.product(["standard", "topk", "jumprelu", "gated"],
                                           [True, False], T.NORMS):
        folder = T.write_saelens(ROOT / f"w-{arch}-{a}-{norm}", T.saelens_weights(arch),
                                 T.v6_cfg(arch, a, norm))
        sae, options = SAE.load_from_disk(str(folder)), {}
        if norm == "expected_average_only_in":
            sae.fold_activation_norm_scaling_factor(2.5)
            options = {"norm_scaling_factor": 2.5}
        with torch.no_grad():
            report(f"ours->SAELens {arch} a={a} {norm}", load_dictionary(folder, **options)[0],
                   sae.encode(X), sae(X))


def saelens_folders_it_writes():
    """Folders written by SAELens's own save_model, read by load_dictionary."""
    for arch, a, norm in itertools.product(["standard", "topk", "jumprelu", "gated"],
                                           [True, False], ["none", "layer_norm",
                                                           "constant_norm_rescale"]):
        sae = SAE.from_dict({**T.v6_cfg(arch, a, norm), "metadata": {"hook_name": "h"}})
        with torch.no_grad():
            for name, p in sae.named_parameters():
                p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.25))
                if name == "threshold":
                    p.abs_()
        sae.save_model(str(ROOT / f"s-{arch}-{a}-{norm}"))
        with torch.no_grad():
            report(f"SAELens save_model->ours {arch} a={a} {norm}",
                   load_dictionary(ROOT / f"s-{arch}-{a}-{norm}")[0], sae.encode(X), sae(X))


def our_exports():
    for name, variant in T.EXPORT_CASES:
        ae = T.built(name, **variant)
        sae = SAE.load_from_disk(str(save_saelens(ae, ROOT / f"e-{name}-{sorted(variant)}")))
        with torch.no_grad():
            report(f"save_saelens->SAELens {name} {variant}", ae, sae.encode(X), sae(X))


def saelens_pre_6():
    """Pre-6.0 flat configs, as sae-lens 4.x reads them (``load_from_pretrained``)."""
    for arch, act, fsf, a, norm in [("standard", "relu", True, True, "none"),
                                    ("standard", "topk", True, True, "none"),
                                    ("standard", "relu", False, False, "none"),
                                    ("jumprelu", "relu", False, False, "none"),
                                    ("gated", "relu", False, True, "none"),
                                    ("standard", "relu", False, True, "layer_norm"),
                                    ("standard", "topk", False, False, "layer_norm")]:
        w = T.saelens_weights(arch, fsf=fsf)
        if fsf:
            w["scaling_factor"] = w.pop("finetuning_scaling_factor")
        cfg = {"architecture": arch, "d_in": T.D, "d_sae": T.M, "dtype": "float32",
               "device": "cpu", "model_name": "m", "hook_name": "blocks.0.hook_mlp_out",
               "hook_layer": 0, "hook_head_index": None, "activation_fn_str": act,
               "activation_fn_kwargs": {"k": T.K} if act == "topk" else {},
               "apply_b_dec_to_input": a, "finetuning_scaling_factor": fsf,
               "context_size": 128, "normalize_activations": norm, "prepend_bos": True,
               "dataset_path": "d", "dataset_trust_remote_code": False}
        folder = T.write_saelens(ROOT / f"p-{arch}{act}{fsf}{a}{norm}", w, cfg)
        sae = SAE.load_from_pretrained(str(folder))
        with torch.no_grad():
            report(f"pre-6 {arch} {act} fsf={fsf} a={a} {norm}", load_dictionary(folder)[0],
                   sae.encode(X), sae(X))


def sparsify_folders():
    from sparsify import SparseCoder, SparseCoderConfig

    for transcode, skip, dtype in itertools.product([False, True], [False, True],
                                                    [torch.float32, torch.bfloat16]):
        sc = SparseCoder(T.D, SparseCoderConfig(num_latents=T.M, k=T.K, transcode=transcode,
                                                skip_connection=skip), dtype=dtype)
        with torch.no_grad():
            for p in sc.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        folder = ROOT / "sparsify" / f"layers.{int(transcode)}{int(skip)}{str(dtype)[-2:]}"
        sc.save_to_disk(folder)
        ours = load_dictionary(folder, dtype=dtype)[0]
        xb = X.to(dtype)
        with torch.no_grad():
            top_acts, top_idx, _ = sc.encode(xb)
            f = torch.zeros(len(X), T.M, dtype=dtype).scatter(-1, top_idx.long(), top_acts)
            out = sc(xb).sae_out
        if dtype == torch.float32:
            report(f"sparsify save_to_disk->ours transcode={transcode} skip={skip} {dtype}",
                   ours, f, out, x=xb)
            continue
        with torch.no_grad():  # bf16: features bit for bit, outputs within one bf16 step
            df = (ours.encode(xb).float() - f.float()).abs().max().item()
            dx = (ours(xb).float() - out.float()).abs().max().item()
        steps = dx / (torch.finfo(dtype).eps * out.abs().max().item())
        print("PASS" if df == 0 and steps <= 1 else "FAIL", f"sparsify save_to_disk->ours "
              f"transcode={transcode} skip={skip} {dtype}", type(ours).__name__,
              f"max|df|={df:.1e} max|dx|={dx:.1e} ({steps:.2f} bf16 steps of max|out|)")


def saelens_bf16():
    """Measured, not claimed: SAELens folders loaded in bf16 by both (``dtype``)."""
    bf = torch.bfloat16
    for arch, a, norm in itertools.product(["standard", "topk", "jumprelu", "gated"],
                                           [True, False], ["none", "layer_norm"]):
        folder = T.write_saelens(ROOT / f"bf-{arch}-{a}-{norm}", T.saelens_weights(arch),
                                 T.v6_cfg(arch, a, norm))
        sae, ours, xb = (SAE.load_from_disk(str(folder), dtype="bfloat16"),
                         load_dictionary(folder, dtype=bf)[0], X.to(bf))
        with torch.no_grad():
            f, out = sae.encode(xb).float(), sae(xb).float()
            df = (ours.encode(xb).float() - f).abs().max().item()
            dx = (ours(xb).float() - out).abs().max().item()
        eps = torch.finfo(bf).eps
        print("INFO", f"SAELens bf16 {arch} a={a} {norm}", type(ours).__name__,
              f"max|df|={df:.1e} ({df / (eps * f.abs().max().item()):.1f} steps) "
              f"max|dx|={dx:.1e} ({dx / (eps * out.abs().max().item()):.1f} steps)")


def randomize_saelens(sae, decoder_norms):
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else D_SCALE))
        sae.W_dec.mul_(decoder_norms[:, None] / sae.W_dec.norm(dim=-1, keepdim=True))


D_SCALE = T.D ** -0.5


def saelens_topk_training_saes():
    """sae-lens 6's TopK and BatchTopK training SAEs with their default
    ``rescale_acts_by_decoder_norm=True``: the checkpoint (``save_model``: training cfg,
    decoder norms free) and the final model (``save_inference_model``)."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    for (cls, cfg_cls), a, norm in itertools.product(
            [(TopKTrainingSAE, TopKTrainingSAEConfig),
             (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig)], [True, False],
            ["none", "layer_norm"]):
        cfg = cfg_cls(d_in=T.D, d_sae=T.M, k=T.K, apply_b_dec_to_input=a,
                      normalize_activations=norm)
        assert cfg.rescale_acts_by_decoder_norm  # sae-lens's default
        sae = cls(cfg)
        randomize_saelens(sae, torch.rand(T.M) * 0.3 + 0.05)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold = torch.tensor(0.15, dtype=torch.double)
        tag = f"{cfg.architecture()} a={a} {norm}"
        ckpt, final = ROOT / f"ck-{tag}", ROOT / f"fi-{tag}"
        sae.save_model(str(ckpt))
        sae.save_inference_model(str(final))
        reference = SAE.load_from_disk(str(final))
        with torch.no_grad():
            f_ref, out_ref = reference.encode(X), reference(X)
            report(f"SAELens final model ({type(reference).__name__}) {tag}",
                   load_dictionary(final)[0], f_ref, out_ref)
            if cfg.architecture() == "topk":  # SAELens reads its own topk checkpoints too
                own = SAE.load_from_disk(str(ckpt))
                f_ref, out_ref = own.encode(X), own(X)
            report(f"SAELens checkpoint {tag}", load_dictionary(ckpt)[0], f_ref, out_ref)


# -- released layouts, through SAELens's own loaders and registry --------------------------

HUB = ROOT / "hub"
COMMIT = "c" * 40


def hub_folder(repo_id):
    storage = HUB / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(COMMIT)
    return storage / "snapshots" / COMMIT


def from_hub_cache(repo_id, filename=None, *args, subfolder=None, **kwargs):
    """Stands in for ``hf_hub_download`` in SAELens's loaders: the file of the Hub cache."""
    return str(hub_folder(repo_id) / (subfolder or "") / filename)


def shapes_from_hub_cache(repo_id, filename):
    from safetensors import safe_open

    with safe_open(from_hub_cache(repo_id, filename), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def write_release(conversion, folder, unit_decoder=True):
    """Tiny files in the release's layout; returns the tensors written."""
    g = torch.Generator().manual_seed(len(str(folder)))
    W_enc = torch.randn(T.D, T.M, generator=g) * D_SCALE
    W_dec = torch.randn(T.M, T.D, generator=g) * 0.3
    if unit_decoder:
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    b_enc, b_dec = torch.randn(T.M, generator=g) * 0.3, torch.randn(T.D, generator=g) * 0.3
    threshold = torch.rand(T.M, generator=g) * 0.5
    if conversion == "goodfire":
        folder.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"encoder_linear.weight": W_enc.T.contiguous(), "encoder_linear.bias": b_enc,
                    "decoder_linear.weight": W_dec.T.contiguous(),
                    "decoder_linear.bias": b_dec}, folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    if conversion == "gemma_2":
        np.savez(folder / "params.npz", W_enc=W_enc.numpy(), W_dec=W_dec.numpy(),
                 b_enc=b_enc.numpy(), b_dec=b_dec.numpy(), threshold=threshold.numpy())
    elif conversion == "gemma_3":
        from safetensors.torch import save_file

        save_file({"w_enc": W_enc, "w_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec,
                   "threshold": threshold}, folder / "params.safetensors")
        (folder / "config.json").write_text(json.dumps(
            {"architecture": "jump_relu", "model_name": "gemma-v3-4b-pt",
             "hf_hook_point_in": "model.layers.17.output"}))
    elif conversion == "llama_scope":
        from safetensors.torch import save_file

        (folder / "checkpoints").mkdir()
        save_file({"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc,
                   "decoder.weight": W_dec.T.contiguous(), "decoder.bias": b_dec},
                  folder / "checkpoints" / "final.safetensors")
        avg = math.sqrt(T.D) / 112.21917808219177  # the registry's norm_scaling_factor
        (folder / "hyperparams.json").write_text(json.dumps({
            "d_model": T.D, "d_sae": T.M, "act_fn": "jumprelu", "jump_relu_threshold": 0.3,
            "norm_activation": "dataset-wise", "apply_decoder_bias_to_pre_encoder": False,
            "dataset_average_activation_norm": {"in": avg, "out": avg},
            "sparsity_include_decoder_norm": True, "hook_point_in": "blocks.0.hook_attn_out",
            "hook_point_out": "blocks.0.hook_attn_out"}))
    elif conversion == "dictionary_learning_1":
        from dictionary_learning.registry import DICTIONARY_CLASSES

        ae = DICTIONARY_CLASSES["AutoEncoderTopK"](T.D, T.M, k=T.K)
        with torch.no_grad():
            ae.encoder.weight.copy_(W_enc.T)
            ae.encoder.bias.copy_(b_enc)
            ae.decoder.weight.copy_(W_dec.T)
            ae.b_dec.copy_(b_dec)
        torch.save(ae.state_dict(), folder / "ae.pt")
        (folder / "config.json").write_text(json.dumps({
            "trainer": {"dict_class": "AutoEncoderTopK", "k": T.K, "activation_dim": T.D,
                        "dict_size": T.M, "lm_name": "google/gemma-2-2b", "layer": 12,
                        "trainer_class": "TopKTrainer"}, "buffer": {"ctx_len": 128}}))


RELEASES = [("gemma_2", "gemma-scope-2b-pt-res-canonical", "layer_0/width_16k/canonical"),
            ("gemma_3", "gemma-scope-2-4b-pt-res", "layer_17_width_16k_l0_medium"),
            ("llama_scope", "llama_scope_lxa_32x", "l0a_32x"),
            ("goodfire", "goodfire-llama-3.1-8b-instruct", "layer_19"),
            ("dictionary_learning_1", "sae_bench_gemma-2-2b_topk_width-2pow12_date-1109",
             "blocks.12.hook_resid_post__trainer_0")]


def released_layouts():
    """``SAE.from_pretrained(release, sae_id)`` (its loaders reading the Hub cache) against
    ``load_dictionary(sae_id, release=release)`` (our registry lookup, offline Hub path)."""
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    loaders.hf_hub_download = from_hub_cache
    loaders.get_safetensors_tensor_shapes = shapes_from_hub_cache
    for conversion, release, sae_id in RELEASES:
        repo_id, path = get_repo_id_and_folder_name(release, sae_id)
        write_release(conversion, hub_folder(repo_id) / path)
        real = loaders.NAMED_PRETRAINED_SAE_LOADERS[conversion]

        def tiny(repo_id, folder_name, device, force_download, cfg_overrides, real=real):
            # loaders that hard-code the released widths take the tiny ones
            sizes = {"d_in": T.D, "d_sae": T.M} if conversion in ("gemma_2", "goodfire") else {}
            return real(repo_id, folder_name, device, force_download,
                        {**(cfg_overrides or {}), **sizes})

        sae = SAE.from_pretrained(release, sae_id, converter=tiny)
        ours, config = load_dictionary(sae_id, release=release)
        with torch.no_grad():
            f_ref, out_ref = sae.encode(X), sae(X)
        if conversion == "llama_scope":  # lm_saes's features: SAELens's / its input scale
            f_ref = f_ref / config["input_scale"]
        report(f"{conversion} release {release} {sae_id} (SAELens from_pretrained)", ours,
               f_ref, out_ref)


# -- upstream saprmarks/dictionary_learning -------------------------------------------------


def upstream_folders():
    try:
        import upstream_dl.utils as U
        from upstream_dl.dictionary import AutoEncoder as UpAutoEncoder
        from upstream_dl.dictionary import AutoEncoderNew as UpAutoEncoderNew
    except ImportError as e:
        print("SKIP upstream dictionary_learning not importable as upstream_dl:", e)
        return
    from dictionary_learning.training import TrainerConfig, train_dictionaries

    def folder_of(name, state_dict, dict_class, trainer_class, **trainer):
        folder = ROOT / "upstream" / name
        folder.mkdir(parents=True)
        torch.save(state_dict, folder / "ae.pt")
        (folder / "config.json").write_text(json.dumps({"trainer": {
            "dict_class": dict_class, "trainer_class": trainer_class, "activation_dim": T.D,
            "dict_size": T.M, "lm_name": "m", "layer": 3, **trainer}, "buffer": {}}))
        return folder

    torch.manual_seed(1)
    april = UpAutoEncoder(T.D, T.M)
    with torch.no_grad():
        for p in april.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        april.decoder.weight.mul_(torch.rand(T.M) * 0.3 + 0.05)  # free norms, ~0.1
    folder = folder_of("april", april.state_dict(), "AutoEncoder", "StandardTrainerAprilUpdate")
    ref, _ = U.load_dictionary(str(folder), "cpu")
    with torch.no_grad():
        report("upstream load_dictionary, StandardTrainerAprilUpdate AutoEncoder",
               load_dictionary(folder)[0], ref.encode(X), ref(X))
    new = UpAutoEncoderNew(T.D, T.M)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    folder = folder_of("new", new.state_dict(), "AutoEncoder", "StandardTrainer")
    try:
        U.load_dictionary(str(folder), "cpu")
        print("INFO upstream load_dictionary read the AutoEncoderNew folder")
    except RuntimeError as e:
        print("INFO upstream load_dictionary refuses the AutoEncoderNew folder whose config "
              f"says AutoEncoder ({type(e).__name__})")
    ref = UpAutoEncoderNew.from_pretrained(str(folder / "ae.pt"))
    with torch.no_grad():
        report("upstream AutoEncoderNew.from_pretrained, config says AutoEncoder",
               load_dictionary(folder)[0], ref.encode(X), ref(X))

    for name in ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE",
                 "JumpReluAutoEncoder", "GatedAutoEncoder"):  # our folders, upstream's loader
        ae = T.built(name)
        if hasattr(ae, "normalize_decoder") and name != "JumpReluAutoEncoder":
            ae.normalize_decoder()  # as trained here (upstream would normalise AutoEncoder)
        folder = ROOT / "upstream" / f"ours-{name}"
        folder.mkdir(parents=True)
        torch.save(ae.state_dict(), folder / "ae.pt")
        (folder / "config.json").write_text(json.dumps(
            {"trainer": {"dict_class": name, "trainer_class": "Trainer", **ae.config()},
             "buffer": {}}))
        ref, _ = U.load_dictionary(str(folder), "cpu")
        with torch.no_grad():
            report(f"upstream load_dictionary of our {name} folder", load_dictionary(folder)[0],
                   ref.encode(X), ref(X))

    def batches(n):
        g = torch.Generator().manual_seed(0)
        basis = torch.randn(T.M, T.D, generator=g)
        for _ in range(n):
            codes = torch.rand(128, T.M, generator=g) * (torch.rand(128, T.M, generator=g) < 0.08)
            yield codes @ basis

    for name, kwargs in [("BatchTopKSAE", {"k": T.K}),
                         ("MatryoshkaBatchTopKSAE", {"k": T.K, "group_sizes": [12, 12, 24]})]:
        run = ROOT / "upstream" / f"short-{name}"  # 30 steps, threshold_start_step 1000
        config = TrainerConfig(T.D, T.M, dict_class=name, dict_kwargs=kwargs, lr=3e-3,
                               warmup_steps=5)
        trained, = train_dictionaries(batches(30), [config], steps=30, save_dir=run,
                                      progress=False)
        ref, _ = U.load_dictionary(str(run), "cpu")
        x = torch.cat(list(batches(3)))
        with torch.no_grad():
            f_up, ours = ref.encode(x), load_dictionary(run)[0]
            report(f"our short {name} run read by upstream load_dictionary", ours, f_up,
                   ref(x), x=x)
            unestimated = (torch.relu(ours.pre_activations(x)) > 0).sum(-1).float().mean()
        print("INFO", f"{name} L0: trained k={T.K}, saved file (ours = upstream) "
              f"{float((f_up > 0).sum(-1).float().mean()):.1f}, had it been saved with "
              f"threshold -1, upstream {float(unestimated):.1f}")


if __name__ == "__main__":
    print("sae_lens", sae_lens.__version__)
    if V6:
        saelens_folders_we_write()
        saelens_folders_it_writes()
        our_exports()
        saelens_topk_training_saes()
        released_layouts()
        sparsify_folders()
        saelens_bf16()
        upstream_folders()
    else:
        saelens_pre_6()

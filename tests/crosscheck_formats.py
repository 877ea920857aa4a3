"""Cross-check the format converters against the original libraries (run by hand; pytest does
not collect this file: it needs sae-lens and eai-sparsify, which the project does not depend
on). Installed beside the project without touching its environment, e.g.::

    pip install --no-deps --target /tmp/x sae-lens==6.54.12 "transformer-lens>=2.16.1,<3" \\
        jaxtyping wadler-lindig typeguard simple-parsing docstring-parser fancy-einsum \\
        better-abc python-dotenv tenacity eai-sparsify==1.3.3 natsort schedulefree
    PYTHONPATH=/tmp/x .venv/bin/python tests/crosscheck_formats.py

(and with ``pip install --no-deps --target /tmp/old sae-lens==4.4.5`` first on the path for
pre-6.0 configs). Every line prints PASS/FAIL with the largest differences; measured results
are in the report of the formats work (all PASS with sae-lens 6.54.12 and 4.4.5, eai-sparsify
1.3.3).
"""

import itertools
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")
import test_formats as T  # noqa: E402
import sae_lens  # noqa: E402
from sae_lens import SAE  # noqa: E402

from dictionary_learning.formats import save_saelens  # noqa: E402
from dictionary_learning.loading import load_dictionary  # noqa: E402

ROOT, X = Path(tempfile.mkdtemp()), T.inputs()
V6 = int(sae_lens.__version__.split(".")[0]) >= 6


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
        if arch == "gated" and norm in ("layer_norm", "constant_norm_rescale"):
            continue
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
        if arch == "gated" and norm != "none":
            continue
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
        tol = 1e-4 if dtype == torch.float32 else 0.02 * out.abs().max().item()
        report(f"sparsify save_to_disk->ours transcode={transcode} skip={skip} {dtype}", ours,
               f, out, x=xb, tol=tol)


if __name__ == "__main__":
    print("sae_lens", sae_lens.__version__)
    if V6:
        saelens_folders_we_write()
        saelens_folders_it_writes()
        our_exports()
        sparsify_folders()
    else:
        saelens_pre_6()

"""``analyze``: top contexts, statistics and logit effects of a dictionary's features, written
as a run folder for the viewer (format in :mod:`dictionary_learning.analysis_run`). With
``--cache DIR`` the statistics and contexts come from an activation cache's rows; the model
still runs the logit effects."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..files import check_writable
from .common import CLIError, format_pairs, open_texts
from .evaluate import check_at_least, check_device_flags, check_memory, check_seed, run_data


def _settings(args: argparse.Namespace, dict_dir: Path, config: dict, cache=None) -> dict:
    """Model, submodule, io, ctx_len (the flags, else what the dictionary's folder records:
    :func:`~dictionary_learning.assess.read_target`, else what the ``cache`` records) and
    remove_bos. With a cache, the contexts are the cache's: its ctx_len and remove_bos."""
    from ..assess import fill_from_cache, read_target

    target = read_target(dict_dir, model=args.model, submodule=args.submodule, io=args.io,
                         ctx_len=args.ctx_len)
    if cache is not None:
        target = fill_from_cache(target, cache.manifest)
    for key, flag in (("model", "--model"), ("submodule", "--submodule")):
        if not getattr(target, key):
            raise CLIError(f"the dictionary's config does not name its {key}: pass {flag}")
    buffer = config.get("buffer", {})
    remove_bos = bool(buffer.get("remove_bos", False)) if args.remove_bos is None \
        else args.remove_bos
    settings = {"model": target.model, "submodule": target.submodule, "io": target.io,
                "ctx_len": target.ctx_len, "remove_bos": remove_bos}
    if cache is not None:
        settings.update(ctx_len=cache.manifest["ctx_len"],
                        remove_bos=cache.manifest["remove_bos"])
    return settings


def check_cache_flags(args: argparse.Namespace, manifest: dict) -> None:
    """With ``--cache`` the text and its contexts are the cache's: ``--data``, ``--ctx-len``
    and ``--remove-bos`` are refused when they say otherwise (one error for all)."""
    given = {"--data": (args.data, manifest.get("data")),
             "--ctx-len": (args.ctx_len, manifest["ctx_len"]),
             "--remove-bos": (args.remove_bos, manifest["remove_bos"])}
    clashes = [f"{flag} {ours} (the cache has {theirs})"
               for flag, (ours, theirs) in given.items() if ours is not None and ours != theirs]
    if clashes:
        raise CLIError(f"the cache {args.cache} was collected differently: "
                       f"{'; '.join(clashes)}: omit these options with --cache")


def check_arguments(args: argparse.Namespace) -> tuple[list[str], Path]:
    """Every flag, the dictionary's location and the output folder, before anything is
    read; returns the ranking metrics and the dictionary path."""
    from ..assess import find_dictionaries
    from ..interpret import RANKINGS

    check_at_least(args, {"n_tokens": 1, "batch_size": 1, "k": 1, "k_random": 1, "ctx_len": 1,
                          "window_before": 0, "window_after": 0, "ablation_features": 0})
    check_seed(args.seed)
    check_device_flags(args)
    rankings = args.rankings.split(",") if args.rankings else list(RANKINGS)
    if unknown := [r for r in rankings if r not in RANKINGS]:
        raise CLIError(f"unknown ranking metric(s) {unknown}; choose from {sorted(RANKINGS)}")
    dict_dir = Path(args.dict_dir).expanduser()
    if not dict_dir.exists():
        raise CLIError(f"no dictionary at {dict_dir}: pass a folder holding ae.pt "
                       "(and config.json), or the .pt file")
    if dict_dir.is_dir() and not any(p.suffix in (".pt", ".safetensors")
                                     for p in dict_dir.iterdir()):
        found = find_dictionaries([dict_dir])  # none: "no dictionary found under ..."
        shown = ", ".join(map(str, found[:3])) + (", ..." if len(found) > 3 else "")
        raise CLIError(f"{dict_dir} has no weights of its own, only {len(found)} "
                       f"dictionary folder(s) below it: pass one of them ({shown})")
    check_writable(Path(args.out).expanduser())
    return rankings, dict_dir


def _config_dict_size(config: dict) -> int | None:
    """The number of features a dictionary's config records (ours, flat, SAELens,
    sparsify), if any."""
    for section in (config.get("trainer", {}), config):
        for key in ("dict_size", "dictionary_size", "d_sae", "num_latents"):
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def check_analysis_memory(args: argparse.Namespace, dict_size: int, ctx_len: int) -> None:
    """The context collectors (``dict_size x (k + k_random) x window`` token ids and
    activations, doubled while merging a batch) and one batch of feature activations
    (``batch_size x ctx_len x dict_size``, a few copies) must fit in memory."""
    window = args.window_before + 1 + args.window_after
    collectors = 2 * dict_size * (args.k + args.k_random) * window * 8
    features = 3 * args.batch_size * ctx_len * dict_size * 4
    check_memory(collectors + features,
                 f"--k {args.k} and --k-random {args.k_random} contexts of {window} tokens "
                 f"for each of {dict_size:,} features, with --batch-size {args.batch_size} "
                 f"contexts of {ctx_len} tokens",
                 "pass a smaller --k, --k-random, --window-before, --window-after or "
                 "--batch-size")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis_run import analyze, write_run_folder
    from ..assess import folder_config
    from ..loading import load_dictionary
    from ..submodules import resolve_submodule, submodule_path
    from ..train_run import open_model

    start = time.perf_counter()
    # Every refusal below comes before the output folder is touched.
    rankings, dict_dir = check_arguments(args)
    config = folder_config(dict_dir)       # config files only: no weights read yet
    cache = None
    if args.cache is not None:
        from ..cache.contexts import fitting_keys, is_short_name, open_cache, resolve_name

        cache = open_cache(Path(args.cache).expanduser())
        check_cache_flags(args, cache.manifest)
    s = _settings(args, dict_dir, config, cache)
    dict_size = _config_dict_size(config)
    if dict_size is not None:
        check_analysis_memory(args, dict_size, s["ctx_len"])
    if cache is None and args.data is None:
        args.data = run_data([dict_dir]) or "stdlib"
    texts = None if cache is not None else open_texts(args.data, split=args.split,
                                                      text_field=args.text_field)
    dictionary, _ = load_dictionary(dict_dir, device=args.device)
    if dict_size is None:
        check_analysis_memory(args, dictionary.dict_size, s["ctx_len"])
    if cache is not None:  # a cache that does not fit fails before the model loads
        name = resolve_name(s["submodule"], cache.manifest)
        if not is_short_name(name):  # else only the model can tell (analyze checks then)
            fitting_keys(cache, name, s["io"], dictionary, str(dict_dir))
    model = open_model(s["model"], device=args.device)
    s["submodule"] = submodule_path(model, s["submodule"])       # "1.mlp" -> dotted path
    resolve_submodule(model, s["submodule"])            # a wrong name fails before any work
    torch.manual_seed(args.seed)
    result = analyze(model, s["submodule"], dictionary, texts, io=s["io"],
                     ctx_len=s["ctx_len"], batch_size=args.batch_size, n_tokens=args.n_tokens,
                     k_top=args.k, k_random=args.k_random, before=args.window_before,
                     after=args.window_after, rankings=rankings,
                     n_ablation=args.ablation_features,
                     apply_final_norm=not args.no_final_norm, remove_bos=s["remove_bos"],
                     seed=args.seed, cache=cache)
    info = {"dictionary": str(dict_dir.resolve()), "model": s["model"],
            "data": args.cache if cache is not None else args.data}
    paths = write_run_folder(result, args.out, model.tokenizer, info)
    alive = int((result.stats.summary()["n_fired"] > 0).sum())
    print(f"Analysed {result.n_tokens:,} tokens in {result.n_contexts:,} contexts: "
          f"{alive:,} of {dictionary.dict_size:,} features fired")
    print("Wrote")
    print(format_pairs([(p.name, str(p)) for p in paths]))
    print(f"Done in {time.perf_counter() - start:.1f} s")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="find what a dictionary's features respond to: top and "
                       "random contexts, statistics, logit effects; writes a run folder")
    p.add_argument("dict_dir", help="dictionary folder (ae.pt + config.json) or .pt file")
    p.add_argument("--data", default=None, help="'stdlib', a .txt/.jsonl/.jsonl.zst file or "
                   "folder, or a HF dataset name (default: the text the run was trained on, "
                   "from its train_args.json; else stdlib)")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="take the statistics and contexts from this activation cache's rows "
                   "(written by the `cache` command; contexts rebuilt from its token ids) "
                   "instead of running the model on --data; the model still runs the "
                   "ablations. It must hold the dictionary's submodule, io and width")
    p.add_argument("--split", default="train", help="dataset split (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="JSON field holding the text")
    p.add_argument("--n-tokens", type=int, default=100_000,
                   help="real tokens to analyse; with --cache, its first rows, in whole "
                   "batches of --batch-size contexts (default: %(default)s)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--model", help="model hub id, folder, or 'demo' (default: the dictionary's "
                   "config)")
    p.add_argument("--submodule", help="dotted path ('gpt_neox.layers.1.mlp') or layer.component "
                   "('1.mlp', '2.resid') (default: the dictionary's config)")
    p.add_argument("--io", choices=("out", "in", "in_to_out"),
                   help="which activation the dictionary reads (default: config, else out)")
    p.add_argument("--ctx-len", type=int, help="tokens per context (default: config, else 128)")
    p.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass")
    p.add_argument("--k", type=int, default=10, help="top contexts per feature (default: 10)")
    p.add_argument("--k-random", type=int, default=5,
                   help="random firing contexts per feature (default: 5)")
    p.add_argument("--window-before", type=int, default=24,
                   help="tokens kept before the max-activating token (default: 24)")
    p.add_argument("--window-after", type=int, default=8,
                   help="tokens kept after it (default: 8)")
    p.add_argument("--rankings", help="comma-separated ranking metrics, the first choosing the "
                   "ablated features (default: all registered: density,max_activation,"
                   "mean_activation)")
    p.add_argument("--ablation-features", type=int, default=10,
                   help="measure ablation effects for this many top-ranked features (default: 10)")
    p.add_argument("--no-final-norm", action="store_true",
                   help="logit lens without the final norm's weight")
    p.add_argument("--remove-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="skip each context's first token (default: as the dictionary was trained)")
    p.add_argument("--device", default="cpu", help="device for model and dictionary")
    p.add_argument("--seed", type=int, default=0, help="seed of the random contexts")
    p.set_defaults(func=run)

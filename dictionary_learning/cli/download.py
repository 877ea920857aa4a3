"""``download``: fetch the published pythia-70m-deduped dictionaries into their layout."""

from __future__ import annotations

import argparse

from .common import CLIError, format_pairs


def run(args: argparse.Namespace) -> int:
    from ..published import download

    try:
        folders, fetched = download(args.dest, set_name=args.set, repo_id=args.repo,
                                    components=args.components, archive=args.archive,
                                    cache_dir=args.cache_dir)
    except ConnectionError as e:
        raise CLIError(str(e)) from e
    state = "unpacked" if fetched else "already present, nothing downloaded"
    print(f"{len(folders)} dictionaries of set {args.set} in {args.dest} ({state})")
    print(format_pairs([(f.parent.name, str(f)) for f in folders]))
    print(f"\nEvaluate them: python -m dictionary_learning evaluate {args.dest} "
          "--data monology/pile-uncopyrighted")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("download", help="download the published pythia-70m-deduped "
                       "dictionaries (one ~2.4 GB archive) into dest/{component}/{set}/",
                       description="Fetch the published dictionaries for "
                       "EleutherAI/pythia-70m-deduped from the Hugging Face hub and unpack "
                       "them as DEST/{embed,attn_out_layerN,mlp_out_layerN,resid_out_layerN}/"
                       "SET/{ae.pt,config.json}. Skips what is already there.")
    p.add_argument("--set", default="10_32768", help="dictionary set (default: %(default)s; "
                   "the older 0_8192 and 1_32768 sets can no longer be downloaded)")
    p.add_argument("--dest", default="dictionaries/pythia-70m-deduped",
                   help="destination folder (default: %(default)s)")
    p.add_argument("--repo", default="saprmarks/pythia-70m-deduped-saes",
                   help="Hugging Face repo holding the archive (default: %(default)s)")
    p.add_argument("--components", nargs="+", metavar="NAME",
                   help="only these, e.g. mlp_out_layer1 resid_out_layer3 embed (default: all 19)")
    p.add_argument("--archive", metavar="PATH", help="unpack this already-downloaded archive "
                   "(zip or tar) instead of downloading")
    p.add_argument("--cache-dir", help="huggingface_hub cache folder for the archive "
                   "(default: the hub's own cache, HF_HOME)")
    p.set_defaults(func=run)

"""``steer``: continue a prompt with and without an intervention on a dictionary's features
(:mod:`dictionary_learning.steering`) and print both side by side, with the next tokens
whose probability the intervention changed most."""

from __future__ import annotations

import argparse
import math
import textwrap

from .common import CLIError, format_table
from .evaluate import check_device_flags, check_seed

COLUMN = 38  # characters of each side-by-side column


def feature_list(text: str) -> list[int]:
    """``"5,7"`` -> ``[5, 7]``."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        ids = []
    if not ids or any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"expected feature ids such as 12 or 5,7, got "
                                         f"{text!r}")
    return ids


def finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def interventions(args: argparse.Namespace):
    """The edits the flags ask for, in a fixed order: ablate, clamp, scale, add."""
    from .. import steering

    edits = steering.Interventions()
    valued = [(name, getattr(args, name)) for name in ("clamp", "scale", "add")
              if getattr(args, name) is not None]
    if valued and not args.feature:
        raise CLIError(f"--{valued[0][0]} needs --feature: the feature(s) it changes")
    if args.feature and not valued:
        raise CLIError("--feature needs --add, --clamp or --scale: what to do to it")
    if args.ablate:
        edits = edits + steering.ablate(args.ablate, start=args.from_position)
    for name, value in valued:
        edits = edits + getattr(steering, name)(args.feature, value, start=args.from_position)
    if not len(edits):
        raise CLIError("no intervention given: pass --feature F with --add, --clamp or "
                       "--scale, and/or --ablate F,G")
    return edits


def _shown(text: str) -> str:
    return text.replace("\r", "").replace("\n", " ↵ ")


def side_by_side(left: str, right: str, titles=("baseline", "intervened"),
                 width: int = COLUMN) -> str:
    """Two texts wrapped into columns of ``width`` characters."""
    a = textwrap.wrap(_shown(left), width, drop_whitespace=False) or [""]
    b = textwrap.wrap(_shown(right), width, drop_whitespace=False) or [""]
    lines = [f"{titles[0]:<{width}} | {titles[1]}", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(len(a), len(b))):
        lines.append(f"{a[i] if i < len(a) else '':<{width}} | {b[i] if i < len(b) else ''}")
    return "\n".join(lines)


def change_rows(changes: dict) -> list[dict]:
    rows = []
    for direction in ("raised", "lowered"):
        for c in changes[direction]:
            rows.append({"": direction, "token": repr(c["token"]), "p clean": c["p_clean"],
                         "p intervened": c["p_intervened"],
                         "change": c["p_intervened"] - c["p_clean"]})
    return rows


def run(args: argparse.Namespace) -> int:
    from .. import steering
    from ..session import load_setting

    check_seed(args.seed)
    check_device_flags(args)
    if args.max_new_tokens < 1 or args.top < 0 or args.from_position < 0:
        raise CLIError("--max-new-tokens must be at least 1, --top and --from-position 0 "
                       "or more")
    if args.temperature is not None and args.temperature <= 0:
        raise CLIError(f"--temperature must be above 0 (or use --greedy), got "
                       f"{args.temperature}")
    edits = interventions(args)
    s = load_setting(args.dict_dir, args.device or "cpu", model=args.model,
                     submodule=args.submodule, io=args.io)
    edits.check(s.dictionary.dict_size)
    temperature = args.temperature or 0.0
    for prompt in args.prompt:
        gen = steering.generate(s.model, s.submodule, s.dictionary, prompt, edits, io=s.io,
                                max_new_tokens=args.max_new_tokens, temperature=temperature,
                                seed=args.seed if temperature > 0 else None)
        print(f"Prompt: {prompt!r}")
        print(f"Intervention: {edits} ({s.submodule}, io={s.io}); "
              + ("greedy" if temperature == 0 else
                 f"sampled at temperature {temperature:g}, seed {args.seed}"))
        print()
        print(side_by_side(gen.baseline.text[0], gen.intervened.text[0]))
        if args.top:
            changes = steering.top_changes(
                steering.logit_diff(s.model, s.submodule, s.dictionary, prompt, edits,
                                    io=s.io), s.model.tokenizer, args.top)
            print()
            print("Next token after the prompt, most changed probabilities:")
            print(format_table(change_rows(changes)))
        print()
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("steer", help="generate with and without an intervention on "
                       "features (add a decoder direction, clamp, scale, ablate)",
                       description="Continue --prompt twice, with the clean model and with "
                       "the dictionary's features edited at every token (the edited "
                       "reconstruction plus the dictionary's error term), and print both "
                       "side by side, then the next tokens after the prompt whose "
                       "probability changed most. Edits apply in the order ablate, clamp, "
                       "scale, add.")
    p.add_argument("dict_dir", metavar="FOLDER", help="dictionary folder (any format "
                   "evaluate reads); its config names the model and submodule")
    p.add_argument("--prompt", action="append", required=True,
                   help="text to continue (repeat for several)")
    p.add_argument("--feature", type=feature_list, default=[],
                   help="feature id(s) that --add, --clamp and --scale change, e.g. 12 or 5,7")
    p.add_argument("--add", type=finite, help="add this many times the feature's decoder "
                   "direction (f += value)")
    p.add_argument("--clamp", type=finite, help="set the feature's activation to this value")
    p.add_argument("--scale", type=finite, help="multiply the feature's activation by this")
    p.add_argument("--ablate", type=feature_list, default=[], metavar="F[,G...]",
                   help="feature id(s) to set to 0")
    p.add_argument("--from-position", type=int, default=0, metavar="N",
                   help="edit only tokens at position N and after (0: the whole prompt and "
                   "every generated token; the prompt's tokens are 0, 1, ...)")
    p.add_argument("--max-new-tokens", type=int, default=30,
                   help="tokens to generate (default: %(default)s)")
    sampling = p.add_mutually_exclusive_group()
    sampling.add_argument("--greedy", action="store_true",
                          help="greedy decoding (the default)")
    sampling.add_argument("--temperature", type=float, default=None,
                          help="sample at this temperature instead")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both "
                   "runs (default: %(default)s)")
    p.add_argument("--top", type=int, default=5, help="show this many most raised and most "
                   "lowered next tokens (default: %(default)s; 0: none)")
    g = p.add_argument_group("what the dictionary reads (default: what its folder records)")
    g.add_argument("--model", help="HF hub id, local model folder, or 'demo'")
    g.add_argument("--submodule", help="dotted path (gpt_neox.layers.1.mlp) or 1.mlp")
    g.add_argument("--io", choices=("out", "in", "in_to_out"), help="which activation")
    p.add_argument("--device", default=None, help="default: cpu")
    p.set_defaults(func=run)

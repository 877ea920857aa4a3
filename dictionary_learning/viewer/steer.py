"""The viewer's steer box, server side: :func:`dictionary_learning.steering.generate` and
:func:`~dictionary_learning.steering.logit_diff` on the run's dictionary and its model,
for requests the page sends as JSON. Only a server started with the model has one
(``viewer RUN --steer``); every request is checked here before the model runs, and one
generation runs at a time.

Request: ``{"prompt": str, "edits": [{"kind": "add"|"clamp"|"scale"|"ablate",
"features": [ids], "value": number}], "max_new_tokens": int, "temperature": number (0:
greedy), "seed": int, "from_position": int}``. Answer: ``{"interventions": str,
"baseline": {"text", "tokens"}, "intervened": {"text", "tokens"}, "changes": {"raised",
"lowered"}}`` (tokens as strings; changes from :func:`~dictionary_learning.steering.
top_changes`).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 100
MAX_EDITS = 16
N_CHANGES = 8


def _integer(body: dict, key: str, default: int, low: int, high: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key!r} must be an integer from {low} to {high}, got {value!r}"[:200])
    return value


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}"[:200])
    return float(value)


class SteerBackend:
    """Runs steering requests on one dictionary and its model (a
    :class:`~dictionary_learning.session.Setting`)."""

    def __init__(self, setting):
        self.setting = setting
        self._lock = threading.Lock()

    def info(self) -> dict:
        s = self.setting
        return {"available": True, "model": s.model_name, "submodule": s.submodule,
                "io": s.io, "dict_size": s.dictionary.dict_size,
                "max_new_tokens": MAX_NEW_TOKENS, "max_prompt_chars": MAX_PROMPT_CHARS}

    def interventions(self, body: dict):
        from .. import steering

        edits = body.get("edits")
        if not isinstance(edits, list) or not 0 < len(edits) <= MAX_EDITS:
            raise ValueError(f"'edits' must be a list of 1 to {MAX_EDITS} edits")
        start = _integer(body, "from_position", 0, 0, 1 << 20)
        out = steering.Interventions()
        size = self.setting.dictionary.dict_size
        for edit in edits:
            if not isinstance(edit, dict) or edit.get("kind") not in steering.KINDS:
                raise ValueError(f"each edit needs a 'kind' among {', '.join(steering.KINDS)}")
            features = edit.get("features")
            if not isinstance(features, list) or not features or len(features) > size or \
                    any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size
                        for i in features):
                raise ValueError(f"'features' must be a list of feature ids from 0 to "
                                 f"{size - 1}")
            kind = edit["kind"]
            if kind == "ablate":
                out = out + steering.ablate(features, start=start)
            else:
                value = _number(edit.get("value"), f"the value of {kind}")
                out = out + getattr(steering, kind)(features, value, start=start)
        return out

    def run(self, body) -> dict:
        """Answer one request (a parsed JSON object); a ``ValueError`` for a bad one."""
        from .. import steering

        if not isinstance(body, dict):
            raise ValueError("the request must be a JSON object")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip() or \
                len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"'prompt' must be a text of 1 to {MAX_PROMPT_CHARS} characters")
        edits = self.interventions(body)
        max_new = _integer(body, "max_new_tokens", 30, 1, MAX_NEW_TOKENS)
        temperature = _number(body.get("temperature", 0), "'temperature'")
        if temperature < 0:
            raise ValueError("'temperature' must be 0 (greedy) or more")
        seed = _integer(body, "seed", 0, 0, 2**63 - 1)
        s = self.setting
        tokenizer = s.model.tokenizer
        with self._lock:  # one generation at a time: the model is shared
            gen = steering.generate(s.model, s.submodule, s.dictionary, prompt, edits,
                                    io=s.io, max_new_tokens=max_new, temperature=temperature,
                                    seed=seed if temperature > 0 else None)
            changes = steering.top_changes(
                steering.logit_diff(s.model, s.submodule, s.dictionary, prompt, edits,
                                    io=s.io), tokenizer, N_CHANGES)

        def side(c):
            return {"text": c.text[0], "tokens": [tokenizer.decode([t]) for t in c.ids[0]]}

        return {"prompt": prompt, "interventions": str(edits), "baseline": side(gen.baseline),
                "intervened": side(gen.intervened), "changes": changes}


def backend_for_run(metadata: dict, dictionary: str | Path | None = None, model=None,
                    device: str = "cpu") -> SteerBackend:
    """A backend for the dictionary an analysis run was made from (its metadata's
    ``dictionary`` folder, or ``dictionary``), on the model the run names (or ``model``),
    reading the run's submodule and io."""
    from ..session import load_setting

    folder = dictionary or metadata.get("dictionary")
    if not folder:
        raise ValueError("the run's metadata.json does not say which dictionary it was made "
                         "from: pass --dictionary DIR")
    if not Path(folder).expanduser().exists():
        raise FileNotFoundError(f"the run's dictionary {folder} is not there (moved?): pass "
                                "--dictionary DIR")
    setting = load_setting(folder, device, model=model or metadata.get("model"),
                           submodule=metadata.get("submodule"), io=metadata.get("io"))
    size = metadata.get("dict_size")
    if size is not None and size != setting.dictionary.dict_size:
        raise ValueError(f"the run has {size} features but the dictionary {folder} has "
                         f"{setting.dictionary.dict_size}: pass the --dictionary it was made "
                         "from")
    return SteerBackend(setting)

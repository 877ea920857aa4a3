#!/usr/bin/env python
"""Re-run the project's known fault list against the real command line, offline.

    .venv/bin/python scripts/fault_list.py [--quick] [--out DIR] [--jobs N] [--keep]

Builds a tiny local model and text in a temporary folder, trains one small finished run,
then runs every fault as its own ``python -m dictionary_learning ...`` process and
records: the exit status, whether stderr holds a traceback, the last stderr line (which
should be ``error: ...`` naming the flag or file at fault) and, for faults aimed at an
existing folder, whether that folder is byte-identical afterwards (names, bytes and modes of
every file). Then the resume rows: runs of a six-architecture sweep (padded and packed,
``--resample-steps 7``) stopped with SIGKILL or SIGINT at a random step after the first
checkpoint, resumed with ``train --resume`` and compared (``torch.equal`` over every
``ae.pt``'s state_dict) with the same command left alone. Plus a full disk and a read-only
file system (tmpfs mounts; rows say "not runnable here" where mounting is not allowed).

Prints a table and a totals line; writes both as JSON to ``--out`` (default: a new
temporary folder, never the repository).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SMALL = ["--submodule", "1.mlp", "--expansion", "4", "--batch-size", "128", "--ctx-len", "32",
         "--n-ctxs", "40", "--refresh-batch-size", "16", "--warmup-steps", "5",
         "--eval-texts", "30", "--eval-loss-texts", "8", "--no-progress"]
FINISHED = ["--steps", "20", "--save-steps", "5"]  # the finished run (and the disk-full one)
SWEEP = ["--arch", "relu,topk,batchtopk,jumprelu,gated,matryoshka", "--k", "8",
         "--resample-steps", "7"]
SWEEP_STEPS, SWEEP_SAVE = 24, 6
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
FAULT_TIMEOUT = 180


@dataclass
class Row:
    fault: str
    group: str = "fault"           # fault | kill | ctrl-c | disk
    exit: int | str | None = None
    traceback: bool = False
    error_line: str = ""
    expect_error: bool = True      # a fault: expect one `error:` line naming `names`
    names: list[str] = field(default_factory=list)
    named: bool | None = None
    unchanged: bool | None = None  # None: no existing folder was at stake
    destroyed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    exact: bool | None = None      # resume rows
    note: str = ""
    command: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: bool = False

    def finish(self) -> "Row":
        if self.expect_error and not self.skipped:
            self.named = self.error_line.startswith("error:") and any(
                n in self.error_line for n in self.names)
        return self


# ---------------------------------------------------------------- helpers


def cli(*args, timeout=FAULT_TIMEOUT) -> dict:
    """One ``python -m dictionary_learning ARGS`` process: exit status, stdout, stderr."""
    cmd = [sys.executable, "-m", "dictionary_learning", *map(str, args)]
    start = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout,
                           errors="replace", stdin=subprocess.DEVNULL)
        code, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        code = f"timeout {timeout}s"
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
            else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) \
            else (e.stderr or "")
    return {"exit": code, "out": out, "err": err, "cmd": cmd,
            "seconds": time.perf_counter() - start}


def last_line(text: str) -> str:
    lines = [seg.strip() for line in text.splitlines() for seg in line.split("\r")]
    lines = [s for s in lines if s]
    return lines[-1] if lines else ""


def record(row: Row, result: dict) -> Row:
    row.exit, row.seconds = result["exit"], round(result["seconds"], 1)
    row.traceback = "Traceback" in result["err"]
    row.error_line = last_line(result["err"])
    row.command = [c for c in result["cmd"][1:]]
    return row


def snapshot(folder: Path) -> dict | None:
    """Every entry under ``folder``: relative path -> (mode, SHA-256 of the bytes)."""
    if not folder.exists():
        return None
    snap = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        snap[str(p.relative_to(folder))] = (st.st_mode, digest)
    return snap


def compare(row: Row, before: dict | None, folder: Path) -> Row:
    after = snapshot(folder)
    if before is None:
        row.unchanged = after is None
        if after is not None:
            row.added = sorted(after) or ["(the folder itself)"]
        return row
    after = after or {}
    row.destroyed = sorted(k for k in before if after.get(k) != before[k])
    row.added = sorted(set(after) - set(before))
    row.unchanged = not row.destroyed and not row.added
    return row


def aimed_at(row: Row, folder: Path, *args, timeout=FAULT_TIMEOUT) -> Row:
    """Run ``args``; compare ``folder`` before and after."""
    before = snapshot(folder)
    record(row, cli(*args, timeout=timeout))
    return compare(row, before, folder).finish()


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def sweep_folders(run: Path) -> list[Path]:
    return sorted(p for p in run.glob("trainer_*") if p.is_dir()) or [run]


def load_states(run: Path) -> list[dict]:
    import torch

    return [torch.load(f / "ae.pt", map_location="cpu", weights_only=True)
            for f in sweep_folders(run)]


def states_equal(a: list[dict], b: list[dict]) -> tuple[int, int]:
    import torch

    same = sum(1 for sa, sb in zip(a, b) if sa.keys() == sb.keys()
               and all(torch.equal(sa[k], sb[k]) for k in sa))
    return same, max(len(a), len(b))


def metrics_step(run: Path) -> int:
    path = sweep_folders(run)[0] / "metrics.jsonl"
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def complete_checkpoint(run: Path) -> int | None:
    from dictionary_learning.saving import checkpoint_steps, stream_state_steps

    common = set(stream_state_steps(run))
    for f in sweep_folders(run):
        common &= set(checkpoint_steps(f))
    return max(common) if common else None


class Mounts:
    """tmpfs mounts made by this script (unmounted at the end)."""

    def __init__(self):
        self.points: list[Path] = []
        self.lock = threading.Lock()

    def mount(self, point: Path, options: str) -> str | None:
        point.mkdir(parents=True, exist_ok=True)
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                           capture_output=True, text=True)
        if p.returncode:
            return (p.stderr or p.stdout).strip() or f"mount exited {p.returncode}"
        with self.lock:
            self.points.append(point)
        return None

    def remount(self, point: Path, options: str) -> str | None:
        p = subprocess.run(["mount", "-o", f"remount,{options}", str(point)],
                           capture_output=True, text=True)
        return None if p.returncode == 0 else (p.stderr.strip() or "remount failed")

    def unmount_all(self):
        for point in reversed(self.points):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


MOUNTS = Mounts()

# ---------------------------------------------------------------- the fault list

FLAG_FAULTS = [
    (["--save-steps", "0"], ["--save-steps"]),
    (["--lr", "nan"], ["--lr"]),
    (["--lr", "inf"], ["--lr"]),
    (["--lr", "-1"], ["--lr"]),
    (["--k", "1000", "--dict-size", "256", "--arch", "topk"], ["--k"]),
    (["--k", "0", "--arch", "topk"], ["--k"]),
    (["--k", "-3", "--arch", "topk"], ["--k"]),
    (["--arch", "batchtopk", "--k", "257", "--dict-size", "256"], ["--k"]),
    (["--steps", "0"], ["--steps"]),
    (["--steps", "-5"], ["--steps"]),
    (["--dtype", "float64x"], ["--dtype", "float64x"]),
    (["--device", "cuda:7"], ["--device", "cuda:7"]),
    (["--n-ctxs", "100000000"], ["--n-ctxs"]),
]


class Faults:
    def __init__(self, work: Path, quick: bool, n_trials: int, rng: random.Random):
        self.work, self.quick, self.n_trials, self.rng = work, quick, n_trials, rng
        self.model = work / "model"
        self.data = work / "docs.jsonl"
        self.finished = work / "finished"
        self._n = 0
        self._lock = threading.Lock()

    def fresh(self, name: str) -> Path:
        with self._lock:
            self._n += 1
            return self.work / "rows" / f"{self._n:03d}_{name}"

    def new_run(self, save_dir: Path, *extra, data: Path | None = None,
                model: Path | None = None) -> list:
        return ["train", "--model", model or self.model, "--data", data or self.data,
                "--save-dir", save_dir, *SMALL, *FINISHED, *extra]

    # ------------------------------------------------------------ setup

    def build(self) -> None:
        from cli_helpers import build_model_folder, write_jsonl

        build_model_folder(self.model)
        texts = write_jsonl(self.data)
        import zstandard

        raw = self.data.read_bytes()
        self.zst_garbage = self.work / "garbage.jsonl.zst"
        self.zst_garbage.write_bytes(random.Random(1).randbytes(20_000))
        self.zst_truncated = self.work / "truncated.jsonl.zst"
        whole = zstandard.ZstdCompressor().compress(raw)
        self.zst_truncated.write_bytes(whole[: len(whole) * 2 // 5])
        self.latin1_first = self.work / "latin1_first.jsonl"
        self.latin1_first.write_bytes(b'{"text": "caf\xe9 au lait"}\n' + raw)
        lines = raw.splitlines(keepends=True)
        self.latin1_late = self.work / "latin1_late.jsonl"
        self.latin1_late.write_bytes(b"".join(lines[:70]) + b'{"text": "na\xefve"}\n'
                                     + b"".join(lines[70:]))
        self.no_weights = self.work / "model_no_weights"
        shutil.copytree(self.model, self.no_weights)
        for p in self.no_weights.iterdir():
            if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"):
                p.unlink()
        assert len(texts) == 200
        result = cli(*self.new_run(self.finished), timeout=600)
        if result["exit"] != 0:
            raise SystemExit(f"the finished run failed ({result['exit']}):\n{result['err']}")

    # ------------------------------------------------------------ rows

    def flag_rows(self) -> list:
        tasks = []
        for extra, names in FLAG_FAULTS:
            label = " ".join(extra)

            def into_finished(extra=extra, names=names, label=label):
                folder = copy_run(self.finished, self.fresh("flag"))
                return aimed_at(Row(f"train {label} (into finished run)",
                                    names=[*names, str(folder)]),
                                folder, *self.new_run(folder, *extra))

            def resume(extra=extra, names=names, label=label):
                folder = copy_run(self.finished, self.fresh("flag"))
                return aimed_at(Row(f"train --resume {label}", names=names), folder,
                                "train", "--resume", "--save-dir", folder, *extra,
                                "--no-progress")
            tasks += [into_finished, resume]

        def n_ctxs_fresh():
            folder = self.fresh("nctxs")
            return aimed_at(Row("train --n-ctxs 100000000 (new folder)", names=["--n-ctxs",
                                "n_ctxs"]), folder, *self.new_run(folder, "--n-ctxs",
                                                                  "100000000"))
        tasks.append(n_ctxs_fresh)
        return tasks

    def path_rows(self) -> list:
        def save_dir_is_file():
            path = self.fresh("file")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("not a folder\n")
            row = aimed_at(Row("train --save-dir naming a file", names=[str(path)]),
                           path.parent, *self.new_run(path))
            return row

        def read_only_new():
            point = self.fresh("ro")
            why = MOUNTS.mount(point, "ro,size=4m")
            if why:
                return Row("train --save-dir on a read-only mount", skipped=True,
                           note=f"not runnable here ({why})")
            folder = point / "run"
            return aimed_at(Row("train --save-dir on a read-only mount",
                                names=[str(point)]), point, *self.new_run(folder))

        def read_only_resume():
            point = self.fresh("ro_resume")
            why = MOUNTS.mount(point, "size=16m")
            if why:
                return Row("train --resume on a read-only mount", skipped=True,
                           note=f"not runnable here ({why})")
            folder = copy_run(self.finished, point / "run")
            why = MOUNTS.remount(point, "ro")
            if why:
                return Row("train --resume on a read-only mount", skipped=True,
                           note=f"not runnable here ({why})")
            return aimed_at(Row("train --resume --steps 25 on a read-only mount",
                                names=[str(point)]), folder, "train", "--resume",
                            "--save-dir", folder, "--steps", "25", "--no-progress")

        def data_row(label, data, expect_created=False):
            def task():
                folder = self.fresh("data")
                row = aimed_at(Row(label, names=[str(data)]), folder,
                               *self.new_run(folder, data=data))
                if expect_created and row.added:
                    row.unchanged, row.added = None, []
                    row.note = "new run folder written before the fault (expected)"
                return row
            return task

        def model_row():
            folder = self.fresh("model")
            return aimed_at(Row("train --model folder without weights",
                                names=[str(self.no_weights)]), folder,
                            *self.new_run(folder, model=self.no_weights))

        def resume_empty():
            folder = self.fresh("empty")
            folder.mkdir(parents=True)
            return aimed_at(Row("train --resume in an empty folder", names=[str(folder)]),
                            folder, "train", "--resume", "--save-dir", folder, "--no-progress")

        def resume_missing():
            folder = self.fresh("missing")
            return aimed_at(Row("train --resume in a folder that does not exist",
                                names=[str(folder)]), folder, "train", "--resume",
                            "--save-dir", folder, "--no-progress")

        def truncated_args():
            folder = copy_run(self.finished, self.fresh("args"))
            path = folder / "train_args.json"
            raw = path.read_bytes()
            path.write_bytes(raw[: len(raw) // 2])
            return aimed_at(Row("truncated train_args.json, train --resume --steps 25",
                                names=[str(path)]), folder, "train", "--resume", "--save-dir",
                            folder, "--steps", "25", "--no-progress")

        def payload(how):
            def task():
                folder = copy_run(self.finished, self.fresh("pickle"))
                marker = folder.parent / (folder.name + ".PAYLOAD_RAN")
                path = folder / "checkpoints" / "trainer_state_20.pt"
                obj = _Payload(f"touch {marker}")
                if how == "torch.save":
                    import torch

                    torch.save(obj, path)
                else:
                    path.write_bytes(pickle.dumps(obj))
                row = aimed_at(Row(f"trainer_state_20.pt = {how} pickle payload, "
                                   "--resume --steps 25", names=[str(path)]), folder,
                               "train", "--resume", "--save-dir", folder, "--steps", "25",
                               "--no-progress")
                if marker.exists():
                    row.note = "PAYLOAD RAN (os.system executed)"
                    row.destroyed.append("(payload executed)")
                return row
            return task

        def killed_before_checkpoint():
            folder = self.fresh("early_kill")
            cmd = [sys.executable, "-m", "dictionary_learning",
                   *map(str, self.new_run(folder, "--steps", "400", "--save-steps", "300"))]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=ENV, stdin=subprocess.DEVNULL)
            deadline = time.time() + 300
            while metrics_step(folder) < 2 and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            proc.kill()
            proc.wait()
            return aimed_at(Row("train --resume of a run killed before its first checkpoint",
                                names=[str(folder)]), folder, "train", "--resume",
                            "--save-dir", folder, "--no-progress")

        return [save_dir_is_file, read_only_new, read_only_resume,
                data_row(".jsonl.zst of garbage as --data", self.zst_garbage),
                data_row("truncated .jsonl.zst as --data", self.zst_truncated, True),
                data_row("non-UTF-8 first line in --data", self.latin1_first),
                data_row("non-UTF-8 line 71 in --data (mid-training)", self.latin1_late, True),
                model_row, resume_empty, resume_missing, truncated_args,
                payload("torch.save"), payload("pickle.dumps"), killed_before_checkpoint]

    def dictionary_rows(self) -> list:
        def bad_config(label, content: bytes):
            def task():
                folder = self.fresh("config")
                folder.mkdir(parents=True)
                shutil.copy2(self.finished / "ae.pt", folder / "ae.pt")
                (folder / "config.json").write_bytes(content)
                return aimed_at(Row(f"evaluate, config.json = {label}",
                                    names=[str(folder)]), folder, "evaluate", folder,
                                "--model", self.model, "--submodule", "1.mlp", "--data",
                                self.data, "--n-tokens", "256", "--no-loss")
            return task

        def on_run(label, names, *args, out=None):
            def task():
                folder = copy_run(self.finished, self.fresh("dict"))
                extra = [a if a != "OUT" else folder.parent / (folder.name + "_out")
                         for a in args]
                row = aimed_at(Row(label, names=names), folder, *[
                    a if a != "DICT" else folder for a in extra], timeout=60)
                if out and (folder.parent / (folder.name + "_out")).exists():
                    row.note = "--out folder was created"
                return row
            return task

        return [bad_config(label, content) for label, content in (
                    ("[]", b"[]"), ("true", b"true"), ("3", b"3"), ('"text"', b'"text"'),
                    ("non-UTF-8 bytes", b'{"trainer": {"dict_class": "AutoEncod\xe9r"}}'))] + [
            on_run("viewer --port 99999", ["--port", "99999"], "viewer", "DICT", "--port",
                   "99999"),
            on_run("evaluate --n-tokens 0", ["--n-tokens"], "evaluate", "DICT", "--data",
                   self.data, "--n-tokens", "0", "--no-loss"),
            on_run("evaluate --batch-size -1", ["--batch-size"], "evaluate", "DICT", "--data",
                   self.data, "--batch-size", "-1", "--n-tokens", "256", "--no-loss"),
            on_run("analyze --k 0", ["--k"], "analyze", "DICT", "--data", self.data, "--out",
                   "OUT", "--k", "0", "--n-tokens", "2000", out=True),
        ]

    def disk_full_rows(self) -> list:
        def task():
            point = self.fresh("full")
            label = "disk full during a checkpoint (tmpfs 2 MiB)"
            why = MOUNTS.mount(point, "size=2m")
            if why:
                return [Row(label, group="disk", skipped=True,
                            note=f"not runnable here ({why})")]
            folder = point / "run"
            row = record(Row(label, group="disk", names=[str(folder)]),
                         cli(*self.new_run(folder), timeout=300)).finish()
            done = complete_checkpoint(folder)
            from dictionary_learning import load_dictionary
            from dictionary_learning.saving import checkpoint_steps

            loadable, steps = 0, checkpoint_steps(folder)
            for s in steps:
                try:
                    load_dictionary(folder / "checkpoints" / f"ae_{s}.pt")
                    loadable += 1
                except Exception as e:  # noqa: BLE001 - reported in the row
                    row.note += f"ae_{s}.pt does not load ({type(e).__name__}); "
            row.note += (f"complete checkpoints {steps} ({loadable} load), resume point "
                         f"{done}")
            before = snapshot(folder)
            resumed = Row("  then, space freed (remount 64 MiB): train --resume",
                          group="disk", expect_error=False)
            why = MOUNTS.remount(point, "size=64m")
            if why:
                resumed.skipped, resumed.note = True, f"not runnable here ({why})"
                return [row, resumed]
            record(resumed, cli("train", "--resume", "--save-dir", folder, "--no-progress",
                                timeout=300))
            if before is not None:
                # No complete checkpoint may change or vanish. The weights file of the
                # checkpoint the full disk cut short (no trainer_state beside it) is
                # rewritten by the resumed run when it reaches that step again.
                after = snapshot(folder) or {}
                resumed.destroyed = sorted(
                    k for k in before if k.startswith("checkpoints/ae_")
                    and k.replace("/ae_", "/trainer_state_") in before
                    and after.get(k) != before[k])
            if resumed.exit == 0:
                same, total = states_equal(load_states(folder), load_states(self.finished))
                resumed.exact = same == total
                resumed.note = (f"ae.pt equals the uninterrupted run's: {same}/{total}")
            return [row, resumed]
        return [task]

    # ------------------------------------------------------------ resume rows

    def sweep_cmd(self, folder: Path, pack: bool) -> list:
        return ["train", "--model", self.model, "--data", self.data, "--save-dir", folder,
                *SMALL, *SWEEP, "--steps", str(SWEEP_STEPS), "--save-steps", str(SWEEP_SAVE),
                "--pack" if pack else "--no-pack"]

    def reference(self, pack: bool) -> Path:
        folder = self.work / f"reference_{'pack' if pack else 'pad'}"
        result = cli(*self.sweep_cmd(folder, pack), timeout=600)
        if result["exit"] != 0:
            raise RuntimeError(f"reference run failed: {last_line(result['err'])}")
        return folder

    def trial(self, how: str, i: int, pack: bool) -> Row:
        mode = "pack" if pack else "pad"
        label = f"{'kill -9' if how == 'kill' else 'Ctrl-C'} #{i + 1} ({mode}), resume"
        row = Row(label, group=how, expect_error=False)
        folder = self.fresh(f"{how}_{mode}")
        rng = random.Random(self.rng.random())
        target = rng.randint(SWEEP_SAVE + 1, SWEEP_STEPS - 3)
        delay = rng.uniform(0, 0.6)
        cmd = [sys.executable, "-m", "dictionary_learning", *map(str, self.sweep_cmd(folder, pack))]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=ENV, stdin=subprocess.DEVNULL, errors="replace")
        deadline = time.time() + 400
        while metrics_step(folder) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        at = metrics_step(folder)
        if proc.poll() is not None:
            _, err = proc.communicate()
            row.note = f"run ended ({proc.returncode}) before the signal: {last_line(err)}"
            row.exit = proc.returncode
            return row
        proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            err += "\n(did not stop within 300 s of SIGINT)"
        problems = []
        if "Traceback" in err:
            row.traceback = True
            problems.append("traceback when stopped")
        ckpt = complete_checkpoint(folder)
        if how == "ctrl-c":
            if proc.returncode != 130:
                problems.append(f"exit {proc.returncode} on Ctrl-C, expected 130")
            if "continue it with: --resume" not in err:
                problems.append("no '--resume' hint")
            if ckpt is None or ckpt < at:
                problems.append(f"no checkpoint at the step it stopped (latest {ckpt})")
        result = cli("train", "--resume", "--save-dir", folder, "--no-progress", timeout=600)
        record(row, result)
        row.traceback = row.traceback or "Traceback" in result["err"]
        row.command = [*map(str, self.sweep_cmd(folder, pack)[:1]), "...", how, "at step",
                       str(at), "; then train --resume"]
        row._folder, row._pack = folder, pack  # compared once the references exist
        row.note = (f"signal at step {at}, resumed from {ckpt}"
                    + (f"; {'; '.join(problems)}" if problems else ""))
        row._problems = problems
        return row


class _Payload:
    """Unpickling this runs ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ---------------------------------------------------------------- report


def table(rows: list[Row]) -> str:
    def yn(v):
        return "-" if v is None else ("yes" if v else "NO")

    cells = []
    for r in rows:
        if r.skipped:
            cells.append([r.fault, "-", "-", r.note, "-"])
            continue
        line = r.error_line if r.expect_error else r.note
        if r.expect_error and r.note:
            line = f"{line}  [{r.note}]"
        if r.expect_error and r.named is False:
            line = "UNNAMED: " + line
        if r.exact is not None:
            line = f"{'EXACT' if r.exact else 'NOT EXACT'}: {line}"
        if len(line) > 100:
            line = line[:97] + "..."
        tb = "YES" if r.traceback else "no"
        unchanged = yn(r.unchanged)
        if r.destroyed:
            unchanged = f"NO ({len(r.destroyed)} destroyed)"
        elif r.unchanged is False:
            unchanged = f"NO ({len(r.added)} added)"
        cells.append([r.fault, str(r.exit), tb, line, unchanged])
    head = ["fault", "exit", "traceback?", "error line / result", "folder unchanged?"]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    widths[3] = min(widths[3], 100)
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)),
           "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(out)


def totals(rows: list[Row]) -> dict:
    run = [r for r in rows if not r.skipped]
    kill = [r for r in run if r.group == "kill"]
    ctrl = [r for r in run if r.group == "ctrl-c"]
    return {
        "exact_kill": sum(bool(r.exact) for r in kill), "trials_kill": len(kill),
        "exact_ctrl_c": sum(bool(r.exact) for r in ctrl), "trials_ctrl_c": len(ctrl),
        "destroyed_files": sum(len(r.destroyed) for r in run),
        "tracebacks": sum(r.traceback for r in run),
        "unnamed_errors": sum(r.named is False for r in run),
        "unexpected_exits": sum(1 for r in run if (r.expect_error and r.exit in (0, 1))
                                or (not r.expect_error and r.exit != 0)
                                or isinstance(r.exit, str)),
        "skipped": [r.fault for r in rows if r.skipped],
    }


def totals_line(t: dict) -> str:
    return (f"exact resumes: {t['exact_kill']}/{t['trials_kill']} (kill -9), "
            f"{t['exact_ctrl_c']}/{t['trials_ctrl_c']} (Ctrl-C); destroyed files: "
            f"{t['destroyed_files']}; tracebacks: {t['tracebacks']}; unnamed errors: "
            f"{t['unnamed_errors']}")


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="2 interrupted runs per signal instead of 5")
    p.add_argument("--trials", type=int, default=None, help="interrupted runs per signal")
    p.add_argument("--out", default=None, help="folder for fault_list.json (default: a new "
                   "temporary folder)")
    p.add_argument("--jobs", type=int, default=2, help="processes run at once (default 2)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random stop moments")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    n_trials = args.trials if args.trials is not None else (2 if args.quick else 5)
    out = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="fault_list_out_"))
    if out == ROOT or ROOT in out.parents:
        p.error(f"--out {out} is inside the repository: choose a folder outside it")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fault_list_"))
    faults = Faults(work, args.quick, n_trials, random.Random(seed))
    rows: list[Row] = []
    try:
        print(f"work folder {work}; seed {seed}; building the model, the data and the "
              "finished run ...", flush=True)
        faults.build()
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            refs = {pack: pool.submit(faults.reference, pack) for pack in (False, True)}
            trial_futs = [pool.submit(faults.trial, how, i, pack=bool(i % 2))
                          for i in range(n_trials) for how in ("kill", "ctrl-c")]
            other = [pool.submit(t) for t in faults.disk_full_rows()]
            tasks = faults.flag_rows() + faults.path_rows() + faults.dictionary_rows()
            fault_futs = [pool.submit(t) for t in tasks]
            for f in fault_futs:
                rows.append(f.result())
                print(f"  {rows[-1].fault}: exit {rows[-1].exit}", flush=True)
            for f in other:
                rows.extend(f.result())
            ref_states = {pack: load_states(f.result()) for pack, f in refs.items()}
            trial_rows = [f.result() for f in trial_futs]
        for row in trial_rows:
            if hasattr(row, "_folder") and row.exit == 0:
                same, total = states_equal(load_states(row._folder), ref_states[row._pack])
                row.exact = same == total and not row._problems
                row.note += f"; ae.pt equal: {same}/{total}"
            else:
                row.exact = False
            rows.append(row)
    finally:
        MOUNTS.unmount_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows.sort(key=lambda r: ["fault", "disk", "kill", "ctrl-c"].index(r.group))
    elapsed = time.perf_counter() - start
    t = totals(rows)
    print()
    print(table(rows))
    print()
    print(totals_line(t))
    if t["unexpected_exits"]:
        print(f"unexpected exit statuses: {t['unexpected_exits']}")
    if t["skipped"]:
        print(f"not runnable here: {', '.join(t['skipped'])}")
    print(f"runtime: {elapsed:.0f} s ({'quick, ' if args.quick else ''}{n_trials} trials per "
          f"signal, seed {seed})")
    out.mkdir(parents=True, exist_ok=True)
    report = {"totals": t, "totals_line": totals_line(t), "runtime_s": round(elapsed, 1),
              "seed": seed, "quick": args.quick, "trials": n_trials,
              "rows": [{k: v for k, v in asdict(r).items()} for r in rows]}
    (out / "fault_list.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"JSON: {out / 'fault_list.json'}" + (f"; work folder kept: {work}" if args.keep
                                                 else ""))
    bad = t["destroyed_files"] or t["tracebacks"] or t["unnamed_errors"] or \
        t["exact_kill"] < t["trials_kill"] or t["exact_ctrl_c"] < t["trials_ctrl_c"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

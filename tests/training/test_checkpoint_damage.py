"""Training checkpoints on a bad disk: a write that fails mid-save (file-size limit, full disk) is one line naming
the file and the errno with nothing left; `--resume` passes over a damaged newest checkpoint to the newest intact
one and ends with the uninterrupted weights (or stops naming the file when none is intact); what a killed save
left is cleared at the next start, by its exact names."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import save_tiny_model, synthetic_task, write_jsonl
from safetensors.torch import load_file, save_file

from loramix.cli import main
from loramix.training.checkpoints import (
    OPTIMIZER_NAME,
    STATE_NAME,
    TRAINABLE_NAME,
    prune_checkpoints,
    resume_from,
    save_checkpoint,
    truncate_metrics,
)

SETTINGS = ["--rank", "4", "--max-steps", "6", "--save-steps", "2", "--batch-size", "8", "--lr", "1e-2",
            "--warmup-steps", "1", "--lr-scheduler", "cosine", "--seed", "5", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny base, its data, and the uninterrupted run (checkpoints at steps 2 and 4, the adapter after 6)."""
    root = tmp_path_factory.mktemp("damage")
    save_tiny_model(root / "base")
    write_jsonl(root / "rev.jsonl", synthetic_task("rev", 48, seed=0))
    assert main(_train_args(root, root / "reference")) == 0
    return root


def _train_args(root, out, *extra) -> list[str]:
    return ["train-expert", "--base", str(root / "base"), "--data", str(root / "rev.jsonl"), "--output", str(out),
            *SETTINGS, *extra]


def _adapter(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def _assert_same_weights(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= tol, key


def _cut_short(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _stopped_run(run, tmp_path, *steps):
    """An output folder as a run stopped after the last of `steps` left it (the reference's checkpoints)."""
    out = tmp_path / "resumed"
    out.mkdir()
    for step in steps:
        shutil.copytree(run / "reference" / f"checkpoint-{step}", out / f"checkpoint-{step}")
    shutil.copy(run / "reference" / "training_args.json", out / "training_args.json")
    return out


# ---- case 4: a write that fails in the middle of a save ----------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and EFBIG as Linux has them")
def test_a_file_size_limit_during_a_save_is_one_line_naming_the_file(run, tmp_path):
    reference = run / "reference" / "checkpoint-2"
    trainable, optimizer = (os.path.getsize(reference / name) for name in (TRAINABLE_NAME, OPTIMIZER_NAME))
    limit = (trainable + optimizer) // 2  # every file of the checkpoint fits except the optimizer state
    others = {name: os.path.getsize(reference / name) for name in os.listdir(reference) if name != OPTIMIZER_NAME}
    assert max(others.values()) < limit < optimizer, others

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "full"
    result = subprocess.run([sys.executable, "-m", "loramix.cli", *_train_args(run, out)], preexec_fn=limited,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("loramix train-expert: ")]
    assert lines == [f"loramix train-expert: [Errno {errno.EFBIG}] File too large (EFBIG) writing "
                     f"{out / 'checkpoint-2' / OPTIMIZER_NAME}; checkpoint-2 was not saved (nothing of it is left)"]
    assert not [name for name in os.listdir(out) if "checkpoint" in name or name.startswith(".")], os.listdir(out)


def test_a_full_disk_during_a_save_names_the_file_and_leaves_nothing(run, tmp_path, monkeypatch, capsys):
    import loramix.training.checkpoints as checkpoints

    def full_disk(tensors, path, metadata=None):
        if os.path.basename(path) == TRAINABLE_NAME:
            open(path, "wb").write(b"\0" * 100)  # what reached the disk before it filled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a write's error names no file
        save_file(tensors, path, metadata)

    monkeypatch.setattr(checkpoints, "save_file", full_disk)
    out = tmp_path / "full"
    assert main(_train_args(run, out)) == 2
    err = capsys.readouterr().err  # besides transformers' progress bars
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("loramix")] == [
        f"loramix train-expert: [Errno {errno.ENOSPC}] No space left on device (ENOSPC) writing "
        f"{out / 'checkpoint-2' / TRAINABLE_NAME}; checkpoint-2 was not saved (nothing of it is left)"]
    assert not [name for name in os.listdir(out) if "checkpoint" in name or name.startswith(".")], os.listdir(out)


# ---- case 5: resuming from a damaged newest checkpoint -----------------------------------------------------------
def _no_optimizer_groups(path):
    state = json.loads(open(path).read())
    del state["optimizer"]["param_groups"]
    open(path, "w").write(json.dumps(state))


DAMAGES = {
    "optimizer cut short": (OPTIMIZER_NAME, _cut_short),
    "state truncated": (STATE_NAME, _cut_short),
    "trainable missing": (TRAINABLE_NAME, os.remove),
    "state without the optimizer's groups": (STATE_NAME, _no_optimizer_groups),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_falls_back_to_the_newest_intact_checkpoint_and_ends_exact(run, tmp_path, damage, capsys):
    name, spoil = DAMAGES[damage]
    out = _stopped_run(run, tmp_path, 2, 4)
    spoil(out / "checkpoint-4" / name)
    assert main(_train_args(run, out, "--resume")) == 0
    logged = capsys.readouterr().out
    assert f"--resume: {out / 'checkpoint-4' / name}: " in logged, logged
    assert "falling back to the checkpoint before checkpoint-4" in logged
    assert f"resuming from {out / 'checkpoint-2'} (step 2 of 6)" in logged
    _assert_same_weights(_adapter(run / "reference"), _adapter(out))
    # the run saved step 4 again: the damaged checkpoint is replaced by an intact one
    _assert_same_weights(load_file(out / "checkpoint-4" / OPTIMIZER_NAME),
                         load_file(run / "reference" / "checkpoint-4" / OPTIMIZER_NAME))


@pytest.mark.parametrize("damage", ["optimizer cut short", "state truncated"])
def test_resume_without_an_intact_checkpoint_is_one_line_naming_the_file(run, tmp_path, damage, capsys):
    name, spoil = DAMAGES[damage]
    out = _stopped_run(run, tmp_path, 4)
    spoil(out / "checkpoint-4" / name)
    assert main(_train_args(run, out, "--resume")) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("loramix")]
    assert len(lines) == 1 and lines[0].startswith(
        f"loramix train-expert: --resume: no intact checkpoint in {out}; the newest is damaged: "
        f"{out / 'checkpoint-4' / name}: "), lines
    # it did not start from scratch: no new checkpoint, no final model
    assert sorted(os.listdir(out)) == ["checkpoint-4", "training_args.json"]


class _Toy:
    """The least a task is to checkpoints: trainable parameters and a save."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(4, 3)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)

    def trainable(self):
        return dict(self.model.named_parameters())

    def save(self, folder):
        save_file({k: v.detach().contiguous() for k, v in self.model.state_dict().items()},
                  os.path.join(folder, "model.safetensors"))

    def step(self):
        self.model(torch.ones(2, 4)).square().sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


def _rewrite_tensors(change):
    def spoil(path):
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
    return spoil


def _rewrite_state(change):
    def spoil(path):
        state = json.loads(open(path).read())
        change(state)
        open(path, "w").write(json.dumps(state))
    return spoil


FILE_DAMAGES = {
    "optimizer moment of another shape": (OPTIMIZER_NAME, _rewrite_tensors(
        lambda t: t.update({"0.exp_avg": torch.zeros(2, 2)}))),
    "optimizer tensor misnamed": (OPTIMIZER_NAME, _rewrite_tensors(
        lambda t: t.update({"x.exp_avg": t.pop("0.exp_avg")}))),
    "optimizer state of a parameter it lacks": (OPTIMIZER_NAME, _rewrite_tensors(
        lambda t: t.update({"7.exp_avg": torch.zeros(1)}))),
    "trainable cut short": (TRAINABLE_NAME, _cut_short),
    "state missing": (STATE_NAME, os.remove),
    "state not an object": (STATE_NAME, lambda p: open(p, "w").write("[]")),
    "step not a number": (STATE_NAME, _rewrite_state(lambda s: s.update(step="4"))),
    "state without a signature": (STATE_NAME, _rewrite_state(lambda s: s.pop("signature"))),
    "state without optimizer": (STATE_NAME, _rewrite_state(lambda s: s.pop("optimizer"))),
    "optimizer entries not objects": (STATE_NAME, _rewrite_state(lambda s: s["optimizer"].update(plain={"0": 1}))),
    "loss scale not numbers": (STATE_NAME, _rewrite_state(lambda s: s["grad_scaler"].update(scale="big"))),
}


@pytest.mark.parametrize("damage", FILE_DAMAGES)
def test_each_damaged_file_is_named_and_passed_over_untouched(tmp_path, damage):
    """Every file is checked before anything is loaded: after passing over a damaged checkpoint, the model and
    optimizer hold exactly the older checkpoint's state."""
    toy, scaler = _Toy(0), torch.amp.GradScaler("cpu")
    for step in (1, 2):
        toy.step()
        if step == 1:
            expected = {k: v.detach().clone() for k, v in toy.trainable().items()}
            expected_moments = {k: v.clone() for k, v in toy.optimizer.state_dict()["state"][0].items()}
        save_checkpoint(str(tmp_path), step, toy, toy.optimizer, {"seed": 0}, grad_scaler=scaler)
    name, spoil = FILE_DAMAGES[damage]
    spoil(tmp_path / "checkpoint-2" / name)
    fresh, messages = _Toy(1), []
    found = resume_from(str(tmp_path), fresh, fresh.optimizer, {"seed": 0}, torch.amp.GradScaler("cpu"),
                        log=messages.append)
    assert found == (str(tmp_path / "checkpoint-1"), 1)
    assert len(messages) == 1 and messages[0].startswith(f"--resume: {tmp_path / 'checkpoint-2' / name}: "), messages
    _assert_same_weights(expected, fresh.trainable(), tol=0.0)
    _assert_same_weights(expected_moments, fresh.optimizer.state_dict()["state"][0], tol=0.0)


def test_other_settings_stop_the_resume_instead_of_falling_back(tmp_path):
    toy = _Toy(0)
    toy.step()
    save_checkpoint(str(tmp_path), 1, toy, toy.optimizer, {"seed": 0})
    other = _Toy(1)
    before = {k: v.detach().clone() for k, v in other.trainable().items()}
    with pytest.raises(ValueError, match="made with seed=0, this run has 3"):
        resume_from(str(tmp_path), other, other.optimizer, {"seed": 3})
    wider = _Toy(1)
    wider.model = torch.nn.Linear(4, 5)  # the same names, other shapes (a gate of another size)
    wider.optimizer = torch.optim.AdamW(wider.model.parameters())
    with pytest.raises(ValueError, match=r"trainable.safetensors: weight has shape \[3, 4\], this model's is \[5, 4\]"):
        resume_from(str(tmp_path), wider, wider.optimizer, {"seed": 0})
    _assert_same_weights(before, other.trainable(), tol=0.0)


def test_pruning_after_a_fallback_keeps_the_newest_intact_checkpoints(tmp_path):
    """Resumed from checkpoint-2 past a damaged checkpoint-6, the save of step 4 with --save-total-limit 1 keeps
    checkpoint-4 (not the damaged newer one, which the run replaces when it gets there)."""
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    prune_checkpoints(str(tmp_path), 1, newest=4)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-6"]


def test_a_metrics_line_whose_step_is_not_a_number_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 1.0}\n{"step": "3", "loss": 0.9}\n{"step": 4, "loss": 0.8}\n')
    with pytest.raises(ValueError, match=f"{path}: record 2 has step '3', not a number"):
        truncate_metrics(str(path), 2)


# ---- case 6: what a killed save left -----------------------------------------------------------------------------
STALE = [".checkpoint-4.k2j_9x0a", ".checkpoint-12.abcdefgh", ".final.zz00yy11", "checkpoint-2.old",
         ".metrics.jsonl.q1w2e3r4", ".training_args.json.a_b_c_d_"]
LOOK_ALIKES = [".checkpoint-4.abcd", ".checkpoint-4.ABCDEFGH", ".checkpoint-x.abcdefgh", "checkpoint-4.bak",
               "my.checkpoint-4.abcdefgh", ".final.abc", ".notes.jsonl.abcdefgh", ".checkpoint-4.abcdefgh.keep"]


@pytest.mark.parametrize("resume", [False, True])
def test_a_killed_saves_temporaries_are_cleared_and_named(run, tmp_path, resume, capsys):
    out = _stopped_run(run, tmp_path, 2)  # a killed run's folder, resumed or started afresh
    for name in STALE + LOOK_ALIKES:
        if name.startswith(".metrics") or name.startswith(".training_args") or name == ".notes.jsonl.abcdefgh":
            (out / name).write_text('{"step": 1')
        else:
            (out / name).mkdir()
            (out / name / TRAINABLE_NAME).write_bytes(b"half")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    os.symlink(elsewhere, out / ".checkpoint-6.abcdefgh")  # the pattern, but a link: never followed or removed
    assert main(_train_args(run, out, *(["--resume"] if resume else []))) == 0
    logged = capsys.readouterr().out
    left = set(os.listdir(out))
    assert not left & set(STALE), left & set(STALE)
    assert set(LOOK_ALIKES) | {".checkpoint-6.abcdefgh"} <= left
    assert (elsewhere / "keep.txt").read_text() == "mine"
    line = f"removed what a killed save left in {out}: {', '.join(sorted(STALE))}"
    assert line in logged.splitlines(), logged
    _assert_same_weights(_adapter(run / "reference"), _adapter(out))


def test_a_checkpoint_killed_while_being_replaced_is_put_back(run, tmp_path, capsys):
    """Killed between replace_dir's two renames: the older `checkpoint-2.old` is back in place, the new copy in
    its temporary folder is removed, and the resume ends exact."""
    out = _stopped_run(run, tmp_path, 2)
    os.rename(out / "checkpoint-2", out / "checkpoint-2.old")
    shutil.copytree(out / "checkpoint-2.old", out / ".checkpoint-2.abcd1234")
    assert main(_train_args(run, out, "--resume")) == 0
    logged = capsys.readouterr().out.splitlines()
    assert f"put back {out / 'checkpoint-2'} (a run was killed while replacing it)" in logged
    assert f"removed what a killed save left in {out}: .checkpoint-2.abcd1234" in logged
    assert f"resuming from {out / 'checkpoint-2'} (step 2 of 6)" in logged
    assert not [name for name in os.listdir(out) if name.startswith(".") or name.endswith(".old")]
    _assert_same_weights(_adapter(run / "reference"), _adapter(out))


def test_the_run_logs_on_a_full_disk_name_their_file(tmp_path, monkeypatch):
    """metrics.jsonl (appended) and training_args.json (written atomically) name the file and the errno too; a
    Rust writer's "os error N" is read as the errno."""
    import builtins

    from loramix.files import append_jsonl, atomic_write_text, write_failure

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(builtins, "open", lambda *a, **k: Full(real_open(*a, **k)))
    log, args = tmp_path / "metrics.jsonl", tmp_path / "training_args.json"
    full = rf"^\[Errno {errno.ENOSPC}\] No space left on device \(ENOSPC\) writing "
    with pytest.raises(OSError, match=full + re.escape(str(log)) + "$"):
        append_jsonl(str(log), {"step": 1})
    with pytest.raises(OSError, match=rf"ENOSPC\) writing {re.escape(str(args))}; the old file, if any, is unchanged$"):
        atomic_write_text(str(args), "{}")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # the temporary of the atomic write is gone
    rust = write_failure(Exception("Error while serializing: I/O error: File too large (os error 27)"), "x.bin")
    assert (rust.errno, str(rust)) == (errno.EFBIG, f"[Errno {errno.EFBIG}] File too large (EFBIG) writing x.bin")
    assert write_failure(ValueError("exit code: 1"), "x.bin") is None
    assert write_failure(FileNotFoundError(errno.ENOENT, "No such file", "/a/b"), "x.bin") is None

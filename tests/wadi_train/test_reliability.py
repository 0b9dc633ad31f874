"""Reliability: kill -9 then --resume is bit-exact; hostile inputs give one clean error line;
`validate` reports what the teacher's folder and structure say about the config, all at once.

Every input is generated here (tiny models, seeded); nothing binary is committed.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny import TINY_UNET, tiny_config
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

from wadi_train.checkpoint import latest_checkpoint, load_checkpoint
from wadi_train.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
STEPS = 6


def _invoke(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def _write_config(d: Path, data: dict[str, Any]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- kill -9 at random points, then --resume ------------------------------------------------
def _cli(*args: object, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "wadi_train.cli", *map(str, args)], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


def _wait_until(cond: Callable[[], bool], proc: subprocess.Popen[bytes], limit: float = 180.0, poll: float = 0.0005) -> bool:
    """Poll `cond` until true (True) or the process ends first (False)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return cond()
        time.sleep(poll)
    proc.kill()
    raise AssertionError("the trainer neither reached the kill point nor finished in time")


def _published_step(ckpt_dir: Path) -> int:
    try:
        return int((ckpt_dir / "latest").read_text().strip().removeprefix("step-"))
    except (OSError, ValueError):
        return 0


def _leftovers(ckpt_dir: Path) -> list[str]:
    """What an interrupted save leaves (`.tmp-*` writes, `.old-*` folders set aside)."""
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith((".tmp-", ".old-"))) if ckpt_dir.is_dir() else []


def _kill_at(proc: subprocess.Popen[bytes], ckpt_dir: Path, point: tuple[str, int, float]) -> bool:
    """SIGKILL once step `after` is published: `delay` seconds later ("step"), or as soon as the
    next save is writing its step folder ("save"). Returns False when the run finished first."""
    kind, after, delay = point
    if not _wait_until(lambda: _published_step(ckpt_dir) >= after, proc):
        return False
    if kind == "save":
        if not _wait_until(lambda: any(n.startswith(".tmp-step-") for n in _leftovers(ckpt_dir)), proc):
            return False
    else:
        time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    return True


def _train_here(cfg: dict[str, Any], resume: bool = False) -> Path:
    """Train in this process, single-threaded like the CLI subprocesses (float sums depend on
    the thread count)."""
    from wadi_train.config import from_dict
    from wadi_train.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(from_dict(cfg), resume=resume).run_dir
    finally:
        torch.set_num_threads(threads)


def _assert_same_final(ref_run: Path, run: Path) -> None:
    a, b = load_checkpoint(latest_checkpoint(ref_run)), load_checkpoint(latest_checkpoint(run))
    assert a.step == b.step == STEPS
    assert a.tensors.keys() == b.tensors.keys() >= {"student", "fake", "ema"}
    for group in a.tensors:
        assert a.tensors[group].keys() == b.tensors[group].keys(), group
        for k, v in a.tensors[group].items():
            assert torch.equal(v, b.tensors[group][k]), f"{group}/{k} differs after kill + resume"
    for name, opt in a.optimizers.items():
        for pid, state in opt["state"].items():
            for key, v in state.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b.optimizers[name]["state"][pid][key])), (name, pid, key)


def _kill_and_resume(tmp_path: Path, teacher: Path, points: list[tuple[str, int, float]], finish_here: bool = False) -> dict[str, Any]:
    """Run the CLI, SIGKILL it at each point in turn and `--resume` until done (with
    `finish_here`, the first resume runs in this process: one subprocess start less); compare
    with the uninterrupted run. Returns what happened: kills, mid-save kills, launches."""
    cfg = tiny_config(tmp_path / "ref", teacher, train={"steps": STEPS, "checkpoint_every": 1})
    ref_run = _train_here(cfg)
    cfg["output_dir"] = str(tmp_path / "killed")
    config = _write_config(tmp_path, cfg)
    run, log = Path(cfg["output_dir"]), tmp_path / "cli.log"
    ckpt_dir = run / "checkpoints"
    stats: dict[str, Any] = {"kills": 0, "mid_save": 0, "launches": 0, "landed": []}
    pending = list(points)
    while True:
        resume = latest_checkpoint(run) is not None  # also cleans up what a killed save left
        proc = _cli("run", config, "-q", *(["--resume"] if resume else []), log=log)
        stats["launches"] += 1
        if pending and _kill_at(proc, ckpt_dir, pending.pop(0)):
            left, published = _leftovers(ckpt_dir), _published_step(ckpt_dir)
            stats["kills"] += 1
            stats["mid_save"] += bool(left)
            stats["landed"].append(f"after step {published} was published, " + (f"mid-save: {left}" if left else "during a step"))
            ck = latest_checkpoint(run)  # the previous checkpoint is usable, whatever was in flight
            assert _leftovers(ckpt_dir) == [], "latest_checkpoint did not clean up"
            if published:
                assert ck is not None and load_checkpoint(ck).step >= published, (left, ck)
            if finish_here:
                _train_here(cfg, resume=ck is not None)
                break
            continue
        assert proc.wait(300) == 0, log.read_text()[-3000:]
        break
    _assert_same_final(ref_run, run)
    return stats


def test_kill9_mid_save_then_resume_is_bit_exact(tmp_path: Path, tiny_teacher: Path) -> None:
    stats = _kill_and_resume(tmp_path, tiny_teacher, [("save", 2, 0.0)], finish_here=True)
    assert stats["kills"] == 1, stats
    print(f"kill -9 mid-save: {stats}")


@pytest.mark.slow
def test_kill9_at_random_points_then_resume_is_bit_exact(tmp_path: Path, tiny_teacher: Path) -> None:
    rng = random.Random(20260)
    points = [("step", 1, rng.uniform(0.0, 0.5)), ("step", 3, rng.uniform(0.0, 0.5)), ("save", 4, 0.0)]
    stats = _kill_and_resume(tmp_path, tiny_teacher, points)
    assert stats["kills"] >= 2 and stats["mid_save"] >= 1, stats
    print(f"kill -9 at {points}: {stats}")


# -- hostile and malformed inputs -----------------------------------------------------------
class Evil:
    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.sentinel}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    """A 2-step run with a checkpoint after each step, and its export (`trained/export`)."""
    from wadi_train.config import from_dict
    from wadi_train.export import export_run
    from wadi_train.train import train

    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(root, tiny_teacher, train={"steps": 2, "checkpoint_every": 1})
    _write_config(root, cfg)
    res = train(from_dict(cfg))
    export_run(res.run_dir, root / "export")
    return root


class Ctx:
    """What a case builds on: a scratch folder, the tiny teacher, a trained run and its export."""

    def __init__(self, d: Path, teacher: Path, trained: Path):
        self.d, self.teacher, self.trained = d, teacher, trained

    def config(self, **sections: dict[str, Any]) -> Path:
        return _write_config(self.d, tiny_config(self.d, self.teacher, **sections))

    def weights(self, name: str, data: bytes | None = None) -> Path:
        path = self.d / name
        if data is None:
            shutil.copy(self.teacher, path)
        else:
            path.write_bytes(data)
        return path

    def copy(self, what: str) -> Path:
        return Path(shutil.copytree(self.trained / what, self.d / what))


Case = Callable[[Ctx], tuple[list[list[object]], str, Path]]  # (commands, needle, file named)


def _weights_case(make: Callable[[Ctx], Path], needle: str) -> Case:
    def case(c: Ctx) -> tuple[list[list[object]], str, Path]:
        bad = make(c)
        return [["run", c.config(model={"weights": str(bad)}), "-q"]], needle, bad
    return case


def _truncated(c: Ctx) -> Path:
    path = c.weights("teacher.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _torch_pickle(c: Ctx) -> Path:
    torch.save(load_file(c.teacher), c.d / "teacher.pt")
    return c.d / "teacher.pt"


def _evil_pickle(c: Ctx) -> Path:
    with (c.d / "teacher.ckpt").open("wb") as fh:
        pickle.dump({"state_dict": Evil(str(c.d / "PWNED"))}, fh)
    return c.d / "teacher.ckpt"


def _renamed_keys(c: Ctx) -> Path:
    save_file({f"unet.{k}": v for k, v in load_file(c.teacher).items()}, c.d / "teacher.safetensors")
    return c.d / "teacher.safetensors"


def _other_config(c: Ctx) -> Path:
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_config({**TINY_UNET, "block_out_channels": [8, 16]})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, c.d / "teacher.safetensors")
    return c.d / "teacher.safetensors"


def _pretrained(c: Ctx, folder: Path, *commands: str) -> tuple[list[list[object]], str, Path]:
    data = tiny_config(c.d, c.teacher)
    data["model"] = {"pretrained": str(folder), "num_classes": 10}
    config = _write_config(c.d, data)
    return [[cmd, config] for cmd in commands], "", folder


def _empty_pretrained(c: Ctx) -> tuple[list[list[object]], str, Path]:
    (c.d / "model").mkdir()
    (c.d / "model" / "notes.txt").write_text("no model here")
    cmds, _, folder = _pretrained(c, c.d / "model", "validate", "run")
    return cmds, "config.json not found", folder


def _corrupt_pretrained(c: Ctx) -> tuple[list[list[object]], str, Path]:
    folder = c.d / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY_UNET}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(256))
    cmds, _, _ = _pretrained(c, folder, "run")
    return cmds, "could not load a UNet2DConditionModel", folder


def _raw_config(text: str, needle: str) -> Case:
    def case(c: Ctx) -> tuple[list[list[object]], str, Path]:
        path = c.d / "config.yaml"
        path.write_text(text)
        return [["validate", path], ["run", path]], needle, path
    return case


def _prompts(content: str | None, command: str, needle: str) -> Case:
    def case(c: Ctx) -> tuple[list[list[object]], str, Path]:
        path = c.d / "prompts.txt"
        if content is not None:
            path.write_text(content)
        return [[command, c.config(model={"conditioning": "text"}, data={"prompts": str(path)})]], needle, path
    return case


def _ranks(content: str) -> Case:
    def case(c: Ctx) -> tuple[list[list[object]], str, Path]:
        path = c.d / "ranks.json"
        path.write_text(content)
        config = c.config(adapter={"ranks_file": str(path)})
        return [["validate", config], ["run", config, "-q"]], "not a weightlens ranks.json", path
    return case


def _export_case(damage: Callable[[Path], Path], needle: str) -> Case:
    def case(c: Ctx) -> tuple[list[list[object]], str, Path]:
        folder = c.copy("export")
        return [["generate", folder, "-o", c.d / "grid.png"]], needle, damage(folder)
    return case


def _broken_record(folder: Path) -> Path:
    (folder / "wadi_export.json").write_text('{"family": "unet2d_condition", ')
    return folder / "wadi_export.json"


def _model_removed(folder: Path) -> Path:
    shutil.rmtree(folder / "model")
    return folder / "model"


def _no_checkpoint(c: Ctx) -> tuple[list[list[object]], str, Path]:
    run = c.copy("run")
    shutil.rmtree(run / "checkpoints")
    return [["export", run, "-o", c.d / "out"]], "no checkpoint found", run


def _export_under_a_file(c: Ctx) -> tuple[list[list[object]], str, Path]:
    (c.d / "afile").write_text("x")
    return [["export", c.trained / "run", "-o", c.d / "afile" / "out"]], "is a file, not a folder", c.d / "afile"


def _flipped_byte(c: Ctx) -> tuple[list[list[object]], str, Path]:
    run = c.copy("run")
    bad = run / "checkpoints" / "step-000002" / "student.safetensors"
    raw = bytearray(bad.read_bytes())
    raw[-3] ^= 0x01  # a bit in the last tensor: same size, so only the sha256 can tell
    bad.write_bytes(bytes(raw))
    config = c.config(train={"steps": 3, "checkpoint_every": 1})
    return [["run", config, f"output_dir={run}", "--resume", "-q"]], "fails its sha256 check", bad


def _output_under_a_file(c: Ctx) -> tuple[list[list[object]], str, Path]:
    (c.d / "afile").write_text("x")
    return [["run", c.config(), f"output_dir={c.d / 'afile' / 'run'}", "-q"]], "is a file, not a folder", c.d / "afile"


CORPUS: dict[str, Case] = {
    "weights truncated": _weights_case(_truncated, "not a readable safetensors file"),
    "weights random bytes": _weights_case(lambda c: c.weights("teacher.safetensors", os.urandom(512)), "not a readable safetensors file"),
    "weights a folder": _weights_case(lambda c: c.d, "model.weights is a folder"),
    "weights a torch pickle": _weights_case(_torch_pickle, "torch/pickle checkpoint"),
    "weights an os.system pickle": _weights_case(_evil_pickle, "torch/pickle checkpoint"),
    "weights with renamed keys": _weights_case(_renamed_keys, "unexpected keys for this model config"),
    "weights of another model config": _weights_case(_other_config, "wrong shape"),
    "pretrained folder with no model": _empty_pretrained,
    "pretrained folder with corrupt weights": _corrupt_pretrained,
    "config not YAML": _raw_config("model: {config: [1, 2\n", "not valid YAML"),
    "config not a mapping": _raw_config("- model\n- adapter\n", "expected a mapping"),
    "prompts file missing": _prompts(None, "validate", "no such file"),
    "prompts file empty": _prompts("\n\n", "run", "no prompts found"),
    "ranks.json not JSON": _ranks("{'rank_pattern': oops"),
    "ranks.json lacks keys": _ranks(json.dumps({"method": "lorad", "default_rank": 4})),
    "generate on a non-export": lambda c: ([["generate", c.d, "-o", c.d / "g.png"]], "not a wadi-train export", c.d),
    "generate on a broken export record": _export_case(_broken_record, "not a readable export record"),
    "generate on an export without its model": _export_case(_model_removed, "the exported model is missing"),
    "export with no checkpoint": _no_checkpoint,
    "export -o under a file": _export_under_a_file,
    "resume from a checkpoint with a flipped byte": _flipped_byte,
    "output_dir under a file": _output_under_a_file,
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_hostile_input_is_one_clean_error(case: str, tmp_path: Path, tiny_teacher: Path, trained: Path) -> None:
    commands, needle, named = CORPUS[case](Ctx(tmp_path, tiny_teacher, trained))
    for args in commands:
        res = _invoke(*args)
        assert res.exit_code == 1, (case, args[0], res.output)
        assert isinstance(res.exception, SystemExit), (case, res.exception)
        text = res.output.replace("\n", "")  # rich may wrap a long path
        assert "Traceback" not in text and "error:" in text, (case, res.output)
        message = res.output[res.output.index("error:"):].strip().splitlines()
        assert len(message) <= 2, (case, res.output)  # one line, or validate's header + the problem
        assert needle in " ".join(res.output.split()), (case, args[0], needle, res.output)
        assert str(named) in text, (case, args[0], named, res.output)
    assert not (tmp_path / "PWNED").exists(), "a pickle ran code"


def test_corrupt_checkpoint_names_the_fallback_and_the_hint_works(tmp_path: Path, tiny_teacher: Path, trained: Path) -> None:
    commands, _, bad = _flipped_byte(Ctx(tmp_path, tiny_teacher, trained))
    text = _invoke(*commands[0]).output.replace("\n", "")
    assert str(bad.parent.parent / "step-000001") in text and "previous checkpoint" in text, text
    assert f"rename it to {bad.parent.name}.damaged" in text, text
    bad.parent.rename(bad.parent.with_name(bad.parent.name + ".damaged"))
    res = _invoke(*commands[0])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(latest_checkpoint(bad.parent.parent.parent)).step == 3


# -- validate: the teacher's folder and structure, every problem at once --------------------
def test_validate_reports_model_aware_problems_at_once(tmp_path: Path, tiny_teacher: Path) -> None:
    """v-prediction scheduler vs an epsilon config, ranks.json naming missing modules, a rank
    beyond min(out, in/2), an odd input width, target regexes matching nothing or not regexes,
    an unwritable output_dir, plus an ordinary range error: one `validate`, one message."""
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "scheduler").mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    # an odd-width Linear: encoder_hid_proj (7 -> cross_attention_dim)
    (pipe / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY_UNET, "encoder_hid_dim": 7, "encoder_hid_dim_type": "text_proj", "cross_attention_dim": 16}))
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", "prediction_type": "v_prediction"}))
    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({"method": "lorad", "target_modules": ["encoder_hid_proj", "down_blocks.0.attentions.0.to_q", "down_blocks.9.attentions.0.to_q"], "rank_pattern": {"down_blocks.0.attentions.0.to_q": 64, "mid_block.attentions.0.to_k": 4}, "default_rank": 4}))
    (tmp_path / "afile").write_text("x")
    data = tiny_config(tmp_path, tiny_teacher, adapter={"ranks_file": str(ranks), "allow_excess_rank": False}, fake={"target_modules": r".*\.to_zz"}, vsd={"t_min": 990})
    data["model"] = {"pretrained": str(pipe), "num_classes": 10, "prediction_type": "epsilon"}
    data["output_dir"] = str(tmp_path / "afile" / "run")
    config = _write_config(tmp_path, data)
    res = _invoke("validate", config)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit) and "Traceback" not in res.output, res.output
    text = " ".join(res.output.split())
    assert "5 problem(s)" in text, text
    for fragment in ("model.prediction_type = 'epsilon'", "says 'v_prediction'", "set model.prediction_type=v_prediction", "t_min must not exceed t_max", "is a file, not a folder"):
        assert fragment in text, (fragment, text)
    assert "2 module name(s) are not in the model" in text and "down_blocks.9.attentions.0.to_q" in text and "mid_block.attentions.0.to_k" in text
    assert "fake.target_modules" in text and "matches no Linear" in text

    # names fixed: now the ranks themselves are checked (rank and odd width), and bad regexes
    ranks.write_text(json.dumps({"method": "lorad", "target_modules": ["encoder_hid_proj", "down_blocks.0.attentions.0.to_q"], "rank_pattern": {"down_blocks.0.attentions.0.to_q": 64}, "default_rank": 4}))
    res = _invoke("validate", config, "model.prediction_type=v_prediction", "vsd.t_min=20", f"output_dir={tmp_path / 'run'}", "fake.target_modules=.*(to_q")
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and "3 problem(s)" in text, text
    assert "odd input width" in text and "'encoder_hid_proj'" in text, text
    assert "rank 64 > min(out, in/2) = 8" in text and "adapter.allow_excess_rank=true" in text, text
    assert "fake.target_modules = '.*(to_q': not a valid regular expression" in text, text


def test_validate_checks_scheduler_options(tmp_path: Path, tiny_teacher: Path) -> None:
    from wadi_train.config import from_dict, validate

    cfg = from_dict(tiny_config(tmp_path, tiny_teacher, model={"scheduler": {"beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "beta_strat": 0.1}}))
    problems = validate(cfg)
    assert len(problems) == 2, problems
    assert problems[0].startswith("model.scheduler.beta_strat: not a DDPMScheduler option; valid: ") and "beta_start" in problems[0]
    assert "model.scheduler.prediction_type = 'v_prediction' but model.prediction_type = 'epsilon'" in problems[1]


def test_validate_target_regex_matching_nothing(tmp_path: Path, tiny_teacher: Path) -> None:
    from wadi_train.config import from_dict, validate

    cfg = from_dict(tiny_config(tmp_path, tiny_teacher, adapter={"target_modules": r"down_blocks\.7\..*"}))
    problems = validate(cfg)
    assert len(problems) == 1 and problems[0].startswith("adapter.target_modules = ") and "matches no" in problems[0], problems
    for method in ("lora", "dora"):
        problems = validate(from_dict(tiny_config(tmp_path, tiny_teacher, adapter={"method": method, "target_modules": "nope"})))
        assert len(problems) == 1 and "matches no nn.Linear" in problems[0], problems

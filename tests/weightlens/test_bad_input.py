"""Hostile and malformed inputs: one line naming the file and the problem, exit 1, no traceback.

Every case is generated here; nothing binary is committed.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from weightlens.cli import app

runner = CliRunner()
GOOD = {"a.weight": torch.randn(8, 6), "b.weight": torch.randn(4, 4), "b.bias": torch.randn(4)}


def _header_file(path: Path, header: object, data: bytes = b"", claimed: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", claimed if claimed is not None else len(raw)) + raw + data)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class Evil:
    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.sentinel}",))


def truncated(d: Path) -> Path:
    save_file(GOOD, d / "x.safetensors")
    raw = (d / "x.safetensors").read_bytes()
    (d / "x.safetensors").write_bytes(raw[:-40])
    return d / "x.safetensors"


def huge_header(d: Path) -> Path:
    p = _header_file(d / "x.safetensors", {}, claimed=300 * 1024 * 1024)
    with p.open("r+b") as fh:  # a sparse 400 MB file: the claim fits, the limit must stop it
        fh.truncate(400 * 1024 * 1024)
    return p


def evil_pickle(d: Path) -> Path:
    with (d / "x.ckpt").open("wb") as fh:
        pickle.dump({"state_dict": Evil(str(d / "PWNED"))}, fh)
    return d / "x.ckpt"


def evil_torch_zip(d: Path) -> Path:
    torch.save({"w": torch.zeros(2, 2)}, d / "x.pt")
    with zipfile.ZipFile(d / "x.pt") as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    data_name = next(n for n in members if n.endswith("data.pkl"))
    members[data_name] = pickle.dumps(Evil(str(d / "PWNED")), protocol=2)
    with zipfile.ZipFile(d / "x.pt", "w") as zf:
        for n, b in members.items():
            zf.writestr(n, b)
    return d / "x.pt"


def not_torch_zip(d: Path) -> Path:
    with zipfile.ZipFile(d / "x.pt", "w") as zf:
        zf.writestr("readme.txt", "hello")
    return d / "x.pt"


def missing_shard(d: Path) -> Path:
    (d / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "gone.safetensors"}}))
    return d / "m.safetensors.index.json"


def empty_dir(d: Path) -> Path:
    (d / "folder").mkdir()
    (d / "folder" / "notes.txt").write_text("no weights here")
    return d / "folder"


def _overlap(d: Path) -> Path:
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    return _header_file(d / "x.safetensors", {"a": entry, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)


CORPUS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing file": (lambda d: d / "nope.safetensors", "no such file"),
    "empty file": (lambda d: _write(d / "x.safetensors", b""), "too short"),
    "empty pickle": (lambda d: _write(d / "x.ckpt", b""), "empty file"),
    "truncated": (truncated, "truncated"),
    "header longer than file": (lambda d: _header_file(d / "x.safetensors", {}, claimed=10_000), "larger than the file"),
    "header not json": (lambda d: _header_file(d / "x.safetensors", b"{not json!"), "not valid JSON"),
    "header not object": (lambda d: _header_file(d / "x.safetensors", [1, 2]), "not a JSON object"),
    "offsets out of range": (lambda d: _header_file(d / "x.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "out of range"),
    "offsets overlap": (_overlap, "overlap"),
    "unknown dtype": (lambda d: _header_file(d / "x.safetensors", {"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "unknown dtype"),
    "malformed entry": (lambda d: _header_file(d / "x.safetensors", {"a": {"dtype": "F32"}}), "malformed"),
    "huge header": (huge_header, "exceeds"),
    "os.system pickle": (evil_pickle, "nothing was executed"),
    "os.system in torch zip": (evil_torch_zip, "wants to call code"),
    "zip not torch": (not_torch_zip, "not a readable torch checkpoint"),
    "random bytes .bin": (lambda d: _write(d / "x.bin", os.urandom(64)), "not a readable torch checkpoint"),
    "text file": (lambda d: _write(d / "x.txt", b"hello world"), "not a checkpoint"),
    "no weights in folder": (empty_dir, "holds no weights"),
    "missing shard": (missing_shard, "missing shard"),
    "pickle without tensors": (lambda d: torch.save({"epoch": 3}, d / "x.pt") or d / "x.pt", "holds no tensors"),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_bad_checkpoint_is_one_clean_line(case: str, tmp_path: Path) -> None:
    make, needle = CORPUS[case]
    bad = make(tmp_path)
    save_file(GOOD, tmp_path / "good.safetensors")
    for args in (["compare", str(bad), str(tmp_path / "good.safetensors")], ["inspect", str(bad)]):
        res = runner.invoke(app, args + (["-o", str(tmp_path / "out"), "-q"] if args[0] == "compare" else []))
        assert res.exit_code == 1, (case, res.output)
        assert needle in res.output, (case, res.output)
        assert str(bad) in res.output.replace("\n", "")
        assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    assert not (tmp_path / "PWNED").exists(), "a pickle ran code"


def _compare(tmp_path: Path, t: dict, s: dict, *extra: str):  # type: ignore[no-untyped-def]
    save_file(t, tmp_path / "t.safetensors")
    save_file(s, tmp_path / "s.safetensors")
    return runner.invoke(app, ["compare", str(tmp_path / "t.safetensors"), str(tmp_path / "s.safetensors"), "-o", str(tmp_path / "out"), "-q", "--no-report", *extra])


def test_keys_that_never_align(tmp_path: Path) -> None:
    res = _compare(tmp_path, {"x.weight": torch.randn(4, 4)}, {"y.weight": torch.randn(4, 4)})
    assert res.exit_code == 1 and "no key names match" in res.output and "--map" in res.output


def test_map_option_fixes_alignment(tmp_path: Path) -> None:
    res = _compare(tmp_path, {"x.weight": torch.randn(4, 4)}, {"y.weight": torch.randn(4, 4)}, "--map", "^y=x")
    assert res.exit_code == 0, res.output


def test_every_shape_mismatched(tmp_path: Path) -> None:
    res = _compare(tmp_path, {"x.weight": torch.randn(4, 4)}, {"x.weight": torch.randn(4, 6)})
    assert res.exit_code == 1 and "every shape differs" in res.output


def test_nan_inf_zero_rows_odd_widths_become_alerts(tmp_path: Path) -> None:
    t = {"nan.weight": torch.randn(6, 8), "zero.weight": torch.randn(6, 8), "odd.weight": torch.randn(6, 7), "row.weight": torch.randn(1, 8), "col.weight": torch.randn(8, 1)}
    s = {k: v * 1.01 + 0.01 for k, v in t.items()}
    s["nan.weight"][1, 2] = float("nan")
    s["nan.weight"][3, 0] = float("inf")
    t["zero.weight"][2] = 0
    res = _compare(tmp_path, t, s)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    codes = {a["code"] for a in summary["alerts"]}
    assert {"nonfinite", "zero_rows", "odd_width"} <= codes
    assert summary["norm_rel_mean"] is not None and summary["dir_mean"] is not None  # finite, NaN excluded


def test_output_path_not_writable(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    res = _compare(tmp_path, GOOD, {k: v + 0.1 for k, v in GOOD.items()})
    assert res.exit_code == 0
    res = runner.invoke(app, ["compare", str(tmp_path / "t.safetensors"), str(tmp_path / "s.safetensors"), "-o", str(tmp_path / "afile" / "sub"), "-q"])
    assert res.exit_code == 1 and "afile" in res.output and "Traceback" not in res.output


def test_key_with_path_separators_writes_nothing_outside(tmp_path: Path) -> None:
    t = {"../../escape.weight": torch.randn(4, 4), **GOOD}
    res = _compare(tmp_path, t, {k: v + 0.1 for k, v in t.items()})
    assert res.exit_code == 0, res.output
    assert not (tmp_path.parent / "escape.weight").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["layers.csv", "vectors.csv", "summary.json", "ranks.json", "spectra.npz"])

"""Relative `data.sources` paths, and the hidden temporary folders an interrupted prepare leaves."""
import dataclasses
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from omnimoe import data
from omnimoe.data.prepare import temp_folders
from omnimoe.data.prepare import write as prepare
from omnimoe.data.config import DataConfig, Source
from omnimoe.train.cli import main

CFG = DataConfig(seq_len=64, image_patch=2, image_side=8, image_codebook=16, audio_codebook=16,
                 prefetch=0)
PINNED = [f"data.{k}={getattr(CFG, k)}" for k in ("seq_len", "image_patch", "image_side",
                                                    "image_codebook", "audio_codebook")]


def write_text_manifest(folder, n=6):
  folder.mkdir(parents=True, exist_ok=True)
  manifest = folder / "manifest.jsonl"
  manifest.write_text("".join(f'{{"text": "line {i} of the relative test"}}\n' for i in range(n)))
  return manifest


def decoded(batch):
  vocab = data.dataset_info(CFG, 0).vocab
  return vocab.decode_text(batch["tokens"].reshape(-1))


def test_a_relative_source_path_is_read_from_the_current_directory(tmp_path, monkeypatch):
  manifest = write_text_manifest(tmp_path / "files")
  prepare.prepare(manifest, tmp_path / "work" / "prep", CFG)
  monkeypatch.chdir(tmp_path / "work")
  cfg = dataclasses.replace(CFG, sources=(Source("prep"),))
  it = data.train_iterator(cfg, batch_size=2, seed=0)
  batch = next(it)
  it.close()
  assert b"of the relative test" in decoded(batch)
  # The same relative name from another directory is another folder: refused, naming where it looked.
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError) as e:
    data.train_iterator(cfg, batch_size=2, seed=0)
  message = str(e.value)
  assert f"'{tmp_path / 'prep'}' is not a prepared folder (it does not exist" in message
  assert "relative path 'prep' is read from the current directory" in message
  assert "\n" not in message


def test_train_with_a_missing_relative_source_exits_2_naming_the_absolute_path(tmp_path, monkeypatch,
                                                                             capsys):
  monkeypatch.chdir(tmp_path)
  code = main(["train", "data.sources=[{path: mydata, weight: 1}]", "--workdir", str(tmp_path / "run")])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
  assert f"'{tmp_path / 'mydata'}' is not a prepared folder (it does not exist" in err


def _leave_temp(out, kind):
  """A child process makes the temp folder a prepare of `out` would (temp_folders.name), writes a
  file into it and dies without cleaning up, as a killed `omnimoe prepare` does. Returns it."""
  code = textwrap.dedent(f"""
      import os, pathlib
      from omnimoe.data.prepare import temp_folders
      tmp = temp_folders.name(pathlib.Path({str(out)!r}), {kind!r}, os.getpid())
      tmp.mkdir()
      (tmp / "records-00000.array_record").write_bytes(b"half written")
      print(tmp)
      os._exit(9)
  """)
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 9, done.stderr
  path = pathlib.Path(done.stdout.strip())
  assert path.is_dir() and path.name.startswith(f".{out.name}.{kind}-")
  return path


def test_a_rerun_removes_the_temp_folders_of_a_killed_prepare(tmp_path, capsys):
  manifest = write_text_manifest(tmp_path / "files")
  out = tmp_path / "prep"
  stale = [_leave_temp(out, "partial"), _leave_temp(out, "old")]
  other = _leave_temp(tmp_path / "another", "partial")        # another --out: not ours to remove
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    running = temp_folders.name(out, "partial", live.pid)  # a prepare still running: left alone
    running.mkdir()
    assert main(["prepare", str(manifest), "--out", str(out), *PINNED]) == 0
    assert "prepared 6 examples" in capsys.readouterr().out
    assert not any(p.exists() for p in stale)
    assert other.is_dir() and running.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")) == [
        running.name]
  finally:
    live.kill()
    live.wait()
  assert temp_folders.remove_stale(out) == [running]   # once its process has ended
  assert (out / "card.json").is_file()
  cfg = dataclasses.replace(CFG, sources=(Source(str(out)),))
  batches = data.eval_batches(cfg, batch_size=2, seed=0, num_batches=1)
  assert np.any(batches[0]["tokens"])

"""Pictures of what a run taught to draw and sound generates (docs/generation.md):

    python -m omnimoe.train.media_pictures --workdir DIR --out FOLDER

`digits.png`: for 0..9, the image generated for "the digit <word>" (greedy, one forced image)
above the first held-out real digit; `tone.png`: the log-mel frames of the tone generated for
"the digit seven" after Griffin-Lim, next to a fresh real tone of 7.
"""
import argparse
import pathlib

import numpy as np

from omnimoe.data.builtin import dtmf
from omnimoe.data.builtin.captions import WORDS
from omnimoe.data.prepare.log_mel import log_mel
from omnimoe.train import config as config_lib, loop, media_out, media_scores
from omnimoe.train.media_evals import MediaEvals


def _figure(**kw):
  """A matplotlib Figure on the Agg canvas (no GUI backend), as train/report.py draws."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(**kw)
  FigureCanvasAgg(fig)
  return fig


def pictures(workdir, out) -> list[pathlib.Path]:
  cfg = config_lib.load(str(pathlib.Path(workdir) / "config.yaml"), [])
  step, state, setup, _, _ = loop.restore_latest(cfg, workdir)
  evals = MediaEvals(cfg, setup)
  params, router = state["params"], state.get("router")
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  codes, _ = evals.generate("image", params, router)
  real, digits = media_scores.digit_images("heldout", cfg.data)
  fig = _figure(figsize=(10, 2.4))
  axes = fig.subplots(2, 10)
  for d in range(10):
    drawn = media_out.image_pixels(codes[d], evals.mix.codebooks["image"], cfg.data)
    axes[0, d].imshow(drawn[..., 0], cmap="gray_r", vmin=0, vmax=1)
    axes[1, d].imshow(real[np.flatnonzero(digits == d)[0]][..., 0], cmap="gray_r", vmin=0, vmax=1)
    axes[0, d].set_title(WORDS[d], fontsize=8)
  for a in axes.ravel():
    a.set_xticks([]), a.set_yticks([])
  axes[0, 0].set_ylabel("generated", fontsize=8)
  axes[1, 0].set_ylabel("real", fontsize=8)
  fig.suptitle(f"'the digit <word>' -> image (step {step}, greedy)", fontsize=9)
  fig.savefig(out / "digits.png", dpi=100, bbox_inches="tight")
  tones, _ = evals.generate("audio", params, router)
  wave = media_out.audio_waveform(tones[7], evals.mix.codebooks["audio"], cfg.data)
  fresh = dtmf.synthesize(7, np.random.default_rng(0), cfg.data)
  fig = _figure(figsize=(7, 2.6))
  axes = fig.subplots(1, 2)
  for a, w, title in ((axes[0], wave, "generated for 'the digit seven'"), (axes[1], fresh, "a real 7")):
    a.imshow(log_mel(w, cfg.data).T, origin="lower", aspect="auto", cmap="magma")
    a.set_title(title, fontsize=8)
    a.set_xlabel("frame", fontsize=8)
  axes[0].set_ylabel("mel band", fontsize=8)
  fig.savefig(out / "tone.png", dpi=100, bbox_inches="tight")
  return [out / "digits.png", out / "tone.png"]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  a = p.parse_args(argv)
  for path in pictures(a.workdir, a.out):
    print(path)


if __name__ == "__main__":
  main()

"""`omnimoe`: the command line. It parses, then delegates to train.loop or data.prepare; nothing
else lives here.

  omnimoe train   [CONFIG] [--workdir DIR] [key=value ...]
  omnimoe eval    [CONFIG] --workdir DIR [--effort low,medium,high] [key=value ...]
  omnimoe prepare MANIFEST.jsonl --out DIR [--skip-bad] [CONFIG] [key=value ...]
  omnimoe plan    [CONFIG] [--devices N] [--platform cpu|gpu|tpu] [--lengths L,...]
                  [--placement placement.json] [key=value ...]
  omnimoe config  [CONFIG] [key=value ...]
  omnimoe report  --workdir DIR [--out DIR] [--last N]
  omnimoe placement --workdir DIR --groups G [--out DIR2]
  omnimoe generate --workdir DIR [--prompt TEXT] [--image PNG] [--audio WAV] [--media image|audio]
                   [--out DIR] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
                   [--seed S] [--effort LEVEL] [--samples N] [key=value ...]
  omnimoe import-hf HF_DIR --out DIR [CONFIG] [key=value ...]
  omnimoe export-hf --workdir DIR --out HF_DIR [--dtype bfloat16|float16|float32]

CONFIG is a YAML file or the name of a shipped config (`tiny`, `configs/tiny.yaml` from any folder;
see train/config_files.py).

Exit codes: 0 done, 2 bad config or arguments, 3 bad data, 4 non-finite loss.
"""
import argparse
import json
import pathlib
import sys

from omnimoe.train import config as config_lib

EXIT_OK, EXIT_USAGE, EXIT_DATA, EXIT_NONFINITE = 0, 2, 3, 4


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="omnimoe", description="Train a multimodal sparse MoE transformer.")
  sub = p.add_subparsers(dest="command", required=True)
  for name, help_ in [("train", "train (or resume) a run"),
                      ("eval", "evaluate the latest checkpoint of a run"),
                      ("prepare", "turn a JSONL manifest of text/image/audio files into a "
                                  "prepared folder (ArrayRecord shards, codebooks, card.json)"),
                      ("plan", "per-device memory, FLOPs per token and collective bytes of a "
                               "config's mesh, from an ahead-of-time compile on simulated devices"),
                      ("config", "print the resolved config")]:
    _add_options(sub.add_parser(name, help=help_), name)
  r = sub.add_parser("report", help="draw expert-load heatmaps and loss curves from a run's "
                                    "metrics.jsonl (PNG files)")
  r.add_argument("--workdir", required=True, help="the run directory (reads its metrics.jsonl)")
  r.add_argument("--out", help="folder for the PNG files (default: the workdir)")
  r.add_argument("--last", type=int, default=10,
                 help="expert load is averaged over this many last logged steps (default 10)")
  r.set_defaults(args=[])
  pl = sub.add_parser("placement", help="group experts that serve the same tokens (from the run's "
                                        "co-activation statistics) and write the latest checkpoint "
                                        "with its experts renumbered to match")
  pl.add_argument("--workdir", required=True, help="the run (its coactivation.npz and checkpoints)")
  pl.add_argument("--groups", type=int, required=True,
                  help="G: expert groups (devices or racks), each of num_experts / G experts")
  pl.add_argument("--out", help="the placed run's folder (default: WORKDIR-g<G>)")
  pl.set_defaults(args=[])
  _add_hf(sub)
  _generate_options(sub.add_parser("generate", help="continue a prompt with the latest checkpoint "
                                                    "of a run: text, images (PNG), sounds (WAV)"))
  return p


def _add_hf(sub) -> None:
  """import-hf and export-hf (train/hf_import.py, train/hf_export.py)."""
  i = sub.add_parser("import-hf", help="a Hugging Face Qwen3-MoE folder -> an omnimoe run folder "
                                       "(config.yaml and a checkpoint at step 0)")
  i.add_argument("hf_dir", metavar="HF_DIR", help="config.json and *.safetensors")
  i.add_argument("--out", required=True, help="the run folder to write (new or empty)")
  i.add_argument("args", nargs="*", metavar="CONFIG | key=value",
                 help="an optional config first, then overrides (not of the model keys that "
                      "config.json sets)")
  e = sub.add_parser("export-hf", help="the text part of a run's latest checkpoint -> a Hugging "
                                       "Face Qwen3-MoE folder")
  e.add_argument("--workdir", required=True, help="the run folder")
  e.add_argument("--out", required=True, help="the folder to write (new or empty)")
  e.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                 help="the tensors' dtype (default bfloat16)")
  e.set_defaults(args=[])


def _generate_options(g: argparse.ArgumentParser) -> None:
  g.add_argument("--workdir", required=True, help="the run (its config.yaml and checkpoints)")
  g.add_argument("--prompt", default="", help="text of the prompt (after the image/sound)")
  g.add_argument("--image", metavar="PNG", help="an image at the start of the prompt")
  g.add_argument("--audio", metavar="WAV", help="a sound at the start of the prompt")
  g.add_argument("--media", choices=("image", "audio", "video"),
                 help="start the generation with one whole item of this modality (video: one clip "
                      "with its sound)")
  g.add_argument("--out", help="folder for generated images, sounds and clips (default "
                                "WORKDIR/generated)")
  g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
  g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  g.add_argument("--top-k", type=int, default=0, help="sample among the k most probable ids (0 = all)")
  g.add_argument("--top-p", type=float, default=1.0, help="nucleus: the most probable ids of this "
                                                          "mass (1 = all)")
  g.add_argument("--seed", type=int, default=0, help="sampling seed")
  g.add_argument("--effort", default="medium",
                 help="none, low, medium (as trained), high, xhigh or an active fraction "
                      "(see docs/generation.md)")
  g.add_argument("--samples", type=int, default=1,
                 help="draw N samples in one batch and keep the one of highest mean log-prob")
  g.add_argument("args", nargs="*", metavar="key=value", help="overrides of the run's config")


def _add_options(s: argparse.ArgumentParser, name: str) -> None:
  """The arguments of the commands that take a config."""
  if name == "prepare":
    s.add_argument("manifest", metavar="MANIFEST.jsonl", help="one example per line")
    s.add_argument("--out", required=True, help="the prepared folder to write")
    s.add_argument("--skip-bad", action="store_true",
                   help="skip bad lines (listed in card.json) instead of stopping with exit 3")
  s.add_argument("args", nargs="*", metavar="CONFIG | key=value",
                 help="an optional config first (a YAML file, or a shipped config's name such "
                      "as tiny), then key.sub=value overrides")
  if name == "plan":
    s.add_argument("--devices", type=int,
                   help="simulated CPU devices (default: what the mesh sizes and rack_size imply)")
    s.add_argument("--platform", choices=("cpu", "gpu", "tpu"), default="cpu",
                   help="plan the choices made on this platform (model.moe.dispatch=auto is "
                        "ragged_all_to_all on gpu/tpu with an expert axis; default cpu)")
    s.add_argument("--lengths", metavar="L1,L2,...",
                   help="also tabulate memory per device at these sequence lengths under both "
                        "model.context_parallel strategies (one compile each)")
    s.add_argument("--placement", metavar="placement.json",
                   help="with --platform gpu|tpu: the ragged all-to-all bytes implied by the "
                        "identity, random and learned placements of `omnimoe placement`")
  if name in ("train", "eval"):
    s.add_argument("--workdir", help="run directory (default: runs/<config name>)")
    s.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="multi-host: address of process 0 (all processes pass the same)")
    s.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    s.add_argument("--process-id", type=int, help="multi-host: this process's index")
  if name == "train":
    s.add_argument("--init-from", metavar="DIR",
                   help="start a new run from the weights of an `omnimoe import-hf` folder (the "
                        "config key train.init_from)")
    s.add_argument("--profile-steps", metavar="A:B",
                   help="write a jax.profiler trace of steps A..B (inclusive) into "
                        "<workdir>/profile, for TensorBoard's profiler or ui.perfetto.dev")
  if name == "eval":
    s.add_argument("--effort", metavar="LIST",
                   help="evaluate at several active fractions without retraining: comma-separated "
                        "low (half the trained fraction), medium (as trained), high (double) or "
                        "fractions such as 0.25 (see train/effort.py)")


def _parse(argv: list[str] | None) -> argparse.Namespace:
  """Like parse_args, but overrides may also follow options (`CONFIG --workdir D key=value`)."""
  parser = _parser()
  ns, extra = parser.parse_known_args(argv)
  stray = [a for a in extra if a.startswith("-") or "=" not in a]
  if stray:
    parser.error(f"unrecognized arguments: {' '.join(stray)}")
  ns.args = [*ns.args, *extra]
  return ns


def _split(args: list[str]) -> tuple[str | None, list[str]]:
  """First argument without '=' is the config file; the rest must be overrides."""
  path = None
  if args and "=" not in args[0]:
    path, args = args[0], args[1:]
  for a in args:
    if "=" not in a:
      raise config_lib.ConfigError(f"unexpected argument '{a}': give one config file, then key=value")
  return path, args


def _fail(code: int, message: str) -> int:
  print(f"omnimoe: error: {message}", file=sys.stderr)
  return code


def _prepare(ns: argparse.Namespace, cfg) -> int:
  from omnimoe.data.prepare import write as prepare  # no jax needed to prepare data
  try:
    card = prepare.prepare(ns.manifest, ns.out, cfg.data, skip_bad=ns.skip_bad)
  except prepare.BadData as e:
    return _fail(EXIT_DATA, f"bad data: {e}")
  except ValueError as e:   # PrepareError, or data settings that cannot work
    return _fail(EXIT_USAGE, str(e))
  print(prepare.summary(card, ns.out))
  return EXIT_OK


def _plan_devices(cfg) -> int:
  """Devices a mesh spells out: racks (across sizes, or 1) x devices per rack (within sizes or rack_size)."""
  import math
  across, within = vars(cfg.mesh.across_racks).values(), vars(cfg.mesh.within_rack).values()
  per_rack = cfg.mesh.rack_size or (math.prod(within) if -1 not in within else 1)
  return (math.prod(across) if -1 not in across else 1) * per_rack


def _plan(ns: argparse.Namespace, cfg) -> int:
  import os
  devices = ns.devices or _plan_devices(cfg)
  os.environ["JAX_PLATFORMS"] = "cpu"   # read when the first backend starts, not at import
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={devices}")
  import jax
  from omnimoe.train import plan
  if len(jax.devices()) != devices:
    return _fail(EXIT_USAGE, f"plan needs {devices} simulated devices but JAX already started with "
                             f"{len(jax.devices())}; run it as its own command")
  if cfg.model.moe.dispatch == "ragged_all_to_all" and ns.platform == "cpu":
    return _fail(EXIT_USAGE, "model.moe.dispatch=ragged_all_to_all runs on GPU or TPU only; plan it "
                             "for one with --platform gpu (or tpu)")
  try:
    lengths = [int(x) for x in ns.lengths.split(",")] if ns.lengths else []
  except ValueError:
    return _fail(EXIT_USAGE, f"--lengths takes comma-separated integers, got {ns.lengths!r}")
  try:
    placement = json.loads(pathlib.Path(ns.placement).read_text()) if ns.placement else None
  except (OSError, ValueError) as e:
    return _fail(EXIT_USAGE, f"--placement {ns.placement}: cannot read it ({e})")
  try:
    print(plan.describe(plan.plan(cfg, ns.platform, placement)))
    if lengths:
      print(plan.describe_lengths(plan.length_table(cfg, lengths, ns.platform)))
  except config_lib.ConfigError as e:
    return _fail(EXIT_USAGE, str(e))
  return EXIT_OK


def _report(ns: argparse.Namespace) -> int:
  from omnimoe.train import report  # matplotlib, no jax
  if ns.args:
    return _fail(EXIT_USAGE, f"report takes no config or overrides, got '{' '.join(ns.args)}'")
  try:
    for path in report.report(ns.workdir, ns.out, last=ns.last):
      print(path)
  except report.ReportError as e:
    return _fail(EXIT_USAGE, str(e))
  return EXIT_OK


def _placement(ns: argparse.Namespace) -> int:
  from omnimoe.train import coactivation, placement
  if ns.args:
    return _fail(EXIT_USAGE, f"placement takes no config or overrides, got '{' '.join(ns.args)}'")
  try:
    print(placement.describe(placement.place(ns.workdir, ns.groups, ns.out)))
  except (placement.PlacementError, coactivation.StatisticsError, config_lib.ConfigError) as e:
    return _fail(EXIT_USAGE, str(e))
  return EXIT_OK


def _generate(ns: argparse.Namespace) -> int:
  run_config = pathlib.Path(ns.workdir) / "config.yaml"
  if not run_config.is_file():
    return _fail(EXIT_USAGE, f"no run in '{ns.workdir}': {run_config} is missing")
  try:
    cfg = config_lib.load(str(run_config), _split(["_", *ns.args])[1])
  except config_lib.ConfigError as e:
    return _fail(EXIT_USAGE, str(e))
  from omnimoe.train import generate_run, loop   # jax only once the arguments are good
  req = generate_run.Request(
      prompt=ns.prompt, image=ns.image, audio=ns.audio, media=ns.media, out=ns.out,
      max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_k=ns.top_k,
      top_p=ns.top_p, seed=ns.seed, effort=ns.effort, samples=ns.samples)
  try:
    for line in generate_run.generate(cfg, ns.workdir, req):
      print(line)
  except generate_run.MediaError as e:
    return _fail(EXIT_DATA, f"bad media: {e}")
  except (loop.WorkdirError, config_lib.ConfigError) as e:
    return _fail(EXIT_USAGE, str(e))
  return EXIT_OK


def _hf(ns: argparse.Namespace) -> int:
  from omnimoe.train import hf_export, hf_import
  try:
    if ns.command == "export-hf":
      if ns.args:
        return _fail(EXIT_USAGE, f"export-hf takes no config or overrides, got '{' '.join(ns.args)}'")
      print(hf_export.describe(hf_export.export_hf(ns.workdir, ns.out, ns.dtype), ns.out))
    else:
      path, overrides = _split(ns.args)
      print(hf_import.describe(hf_import.import_hf(ns.hf_dir, ns.out, path, overrides), ns.out))
  except hf_import.HfDataError as e:
    return _fail(EXIT_DATA, str(e))
  except (hf_import.HfError, config_lib.ConfigError) as e:
    return _fail(EXIT_USAGE, str(e))
  return EXIT_OK


def _load(ns: argparse.Namespace):
  """-> (the config file or name given, or None; the resolved config)."""
  path, overrides = _split(ns.args)
  if getattr(ns, "init_from", None):
    overrides = [*overrides, f"train.init_from={json.dumps(ns.init_from)}"]
  workdir = getattr(ns, "workdir", None)
  if ns.command == "eval" and path is None and workdir and (pathlib.Path(workdir) / "config.yaml").is_file():
    path = str(pathlib.Path(workdir) / "config.yaml")   # the run's own resolved config
  return path, config_lib.load(path, overrides)


def main(argv: list[str] | None = None) -> int:
  ns = _parse(argv)
  if ns.command == "report":
    return _report(ns)
  if ns.command == "placement":
    return _placement(ns)
  if ns.command == "generate":
    return _generate(ns)
  if ns.command in ("import-hf", "export-hf"):
    return _hf(ns)
  try:
    path, cfg = _load(ns)
  except config_lib.ConfigError as e:
    return _fail(EXIT_USAGE, str(e))
  if ns.command == "config":
    print(config_lib.dump(cfg), end="")
    return EXIT_OK
  if ns.command == "prepare":
    return _prepare(ns, cfg)
  if ns.command == "plan":
    return _plan(ns, cfg)
  if ns.command == "eval" and not ns.workdir:
    return _fail(EXIT_USAGE, "eval needs --workdir DIR (the run to evaluate)")
  return _train_or_eval(ns, cfg, ns.workdir or f"runs/{pathlib.Path(path).stem if path else 'tiny'}")


def _train_or_eval(ns: argparse.Namespace, cfg, workdir: str) -> int:
  from omnimoe.train import distributed, loop, profiling  # heavy imports (jax) only once the arguments are good
  try:
    distributed.initialize(ns.coordinator_address, ns.num_processes, ns.process_id)
    from omnimoe.model.expert_parallel import resolve_dispatch
    resolve_dispatch(cfg.model.moe.dispatch, None, cfg.model.moe.num_experts)   # ragged on CPU: one line, exit 2
  except ValueError as e:
    return _fail(EXIT_USAGE, str(e))
  try:
    if ns.command == "train":
      profile = profiling.parse_profile_steps(ns.profile_steps, cfg.train.steps)
      print(loop.train(cfg, workdir, profile=profile).describe())
    elif ns.effort:
      from omnimoe.train import effort
      labels = effort.parse_efforts(ns.effort)
      print(json.dumps(effort.evaluate_efforts(cfg, workdir, labels,
                                               log=lambda line: print(line, file=sys.stderr)),
                       indent=1))
    else:
      step, metrics, notes = loop.evaluate(cfg, workdir)
      print(json.dumps({"step": step, **metrics, **({"notes": list(notes)} if notes else {})},
                       indent=1))
  except (loop.WorkdirError, config_lib.ConfigError) as e:
    return _fail(EXIT_USAGE, str(e))
  except loop.NonFiniteLoss as e:
    return _fail(EXIT_NONFINITE, str(e))
  return EXIT_OK


if __name__ == "__main__":
  sys.exit(main())

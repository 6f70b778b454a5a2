"""Peak host memory of `omnimoe import-hf` against the size of the checkpoint it converts.

    python -m bench.hf_import_memory --json runs/hf_import_memory.json
    python -m bench.hf_import_memory --layers 4 --experts 16 --d-model 512 --vocab 32768

Writes two bfloat16 Qwen3-MoE folders with transformers (needs the `test` extra): a scaled-down one
of the given size and a tiny one of the same code path (64k parameters), converts each in its own
`omnimoe import-hf` process on this machine's CPU devices, and reports each process's peak
resident memory (ru_maxrss). The difference is what the model's size costs; it is compared with
the checkpoint's bytes on disk and with the float32 parameters omnimoe writes (4 bytes per
parameter; the import writes no optimizer state). On CPU the devices' arrays live in host memory,
so the parameters themselves are part of the host's peak here; on GPU or TPU they are not.
"""
import sys

if __package__ in (None, ""):   # `python bench/hf_import_memory.py`
  import pathlib
  sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)

import argparse
import json
import pathlib
import resource
import subprocess
import tempfile


def write(folder: pathlib.Path, *, layers: int, experts: int, d_model: int, vocab: int) -> int:
  """A random bfloat16 Qwen3-MoE (first layer dense); returns its parameter count."""
  import torch
  import transformers
  cfg = transformers.Qwen3MoeConfig(
      vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
      moe_intermediate_size=d_model // 2, num_hidden_layers=layers, num_attention_heads=8,
      num_key_value_heads=4, head_dim=d_model // 8, num_experts=experts, num_experts_per_tok=2,
      norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
  model.save_pretrained(folder, max_shard_size="200MB")
  return sum(p.numel() for p in model.parameters())


def peak_rss_of_import(folder: pathlib.Path, out: pathlib.Path) -> int:
  """Peak resident bytes of one `omnimoe import-hf` process (Linux: ru_maxrss is in KiB)."""
  code = ("import sys; from omnimoe.train.cli import main; import resource, json; rc = main(sys.argv[1:]); "
          "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
  proc = subprocess.run([sys.executable, "-c", code, "import-hf", str(folder), "--out", str(out)],
                        capture_output=True, text=True, check=True)
  line = [x for x in proc.stdout.splitlines() if x.startswith("PEAK")][-1]
  return int(line.split()[1]) * 1024


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--experts", type=int, default=16)
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--json", help="also write the result here")
  ns = p.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    n = write(tmp / "big", layers=ns.layers, experts=ns.experts, d_model=ns.d_model, vocab=ns.vocab)
    write(tmp / "tiny", layers=2, experts=4, d_model=32, vocab=512)
    disk = sum(f.stat().st_size for f in (tmp / "big").glob("*.safetensors"))
    tiny = peak_rss_of_import(tmp / "tiny", tmp / "tiny_run")
    big = peak_rss_of_import(tmp / "big", tmp / "big_run")
  result = {"parameters": n, "checkpoint_bytes": disk, "float32_parameter_bytes": 4 * n,
            "peak_rss_tiny": tiny, "peak_rss": big, "peak_rss_for_the_model": big - tiny,
            "bytes_per_parameter": (big - tiny) / n, "over_checkpoint": (big - tiny) / disk,
            "over_float32_parameters": (big - tiny) / (4 * n), "config": vars(ns)}
  print(json.dumps(result, indent=1))
  if ns.json:
    pathlib.Path(ns.json).write_text(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())

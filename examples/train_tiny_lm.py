"""A tiny decoder-only language model on jaxattn, trained on CPU, then sampled with a KV cache.

The task is copying: a sequence is `[BOS] a_1 .. a_n [SEP] a_1 .. a_n` with n
random tokens, and the model learns to predict the copy (the loss counts the
n copied tokens only). With RoPE the copy is a fixed relative offset (n + 1
back), which a small model learns in a few hundred steps.

The model (pre-LN transformer, Radford et al., 2019; RoPE, Su et al., 2021):
token embedding, `num_layers` blocks of
`x += multi_head_attention(ln(x))` (causal, GQA, RoPE) and
`x += mlp(ln(x))`, a final layer norm, and logits through the tied
embedding. Training uses optax's AdamW with warm-up and cosine decay.

Generation, greedy, two ways:
  full forward  the model on the whole padded sequence for every new token;
  cached        one prefill, then one token per step through
                `jaxattn.layers.multi_head_attention_decode` and a `KVCache`
                per layer (jitted once, cache donated, no retrace per step).
The prompts are ragged (row b already holds r_b answer tokens), so every
row sits at its own position. The script checks that both give the same
tokens, and reports how many copies are right.

    pip install optax                  # or: pip install -e ".[examples]"
    python examples/train_tiny_lm.py   # ~300 steps, well under a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

try:
  import optax
except ImportError as e:
  raise SystemExit('train_tiny_lm.py needs optax, from the examples extra: pip install -e ".[examples]"') from e

from jaxattn import decode
from jaxattn.layers import (MultiHeadParams, init_multi_head_attention, multi_head_attention,
                            multi_head_attention_decode)
from jaxattn.rope import RopeConfig

LOSS_THRESHOLD = 0.05  # the final training loss must fall below this


@dataclasses.dataclass(frozen=True)
class Config:
  """Static sizes of the task and the model (hashable: a jit static argument)."""
  num_symbols: int = 16     # a_i in [0, 16); BOS = 16, SEP = 17
  copy_length: int = 8      # n
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int = 2     # GQA: 2 query heads per key/value head
  head_dim: int = 16
  d_mlp: int = 256
  num_layers: int = 2
  rope: RopeConfig = RopeConfig()

  @property
  def vocab(self) -> int:
    return self.num_symbols + 2

  @property
  def bos(self) -> int:
    return self.num_symbols

  @property
  def sep(self) -> int:
    return self.num_symbols + 1

  @property
  def seq_len(self) -> int:
    return 2 * self.copy_length + 2


class BlockParams(NamedTuple):
  ln1_scale: jax.Array
  ln1_bias: jax.Array
  attention: MultiHeadParams
  ln2_scale: jax.Array
  ln2_bias: jax.Array
  w_in: jax.Array     # (D, F)
  b_in: jax.Array
  w_out: jax.Array    # (F, D)
  b_out: jax.Array


class LMParams(NamedTuple):
  embed: jax.Array    # (V, D), tied with the output projection
  blocks: tuple
  ln_scale: jax.Array
  ln_bias: jax.Array


def init_params(key, config: Config) -> LMParams:
  """Random parameters: normal(0, 1/fan_in) kernels and embedding, zero biases, unit norms."""
  D, F = config.d_model, config.d_mlp
  keys = jax.random.split(key, 1 + config.num_layers)
  blocks = []
  for k in keys[1:]:
    ka, k1, k2 = jax.random.split(k, 3)
    blocks.append(BlockParams(
        ln1_scale=jnp.ones(D), ln1_bias=jnp.zeros(D),
        attention=init_multi_head_attention(
            ka, d_model=D, num_heads=config.num_heads, head_dim=config.head_dim,
            num_kv_heads=config.num_kv_heads),
        ln2_scale=jnp.ones(D), ln2_bias=jnp.zeros(D),
        w_in=jax.random.normal(k1, (D, F)) / np.sqrt(D), b_in=jnp.zeros(F),
        w_out=jax.random.normal(k2, (F, D)) / np.sqrt(F), b_out=jnp.zeros(D)))
  return LMParams(embed=jax.random.normal(keys[0], (config.vocab, D)) / np.sqrt(D),
                  blocks=tuple(blocks), ln_scale=jnp.ones(D), ln_bias=jnp.zeros(D))


def _lead(a, ndim):
  """`a` with leading 1-dims up to `ndim` (explicit: rank promotion may be an error)."""
  return a.reshape((1,) * (ndim - a.ndim) + a.shape)


def layer_norm(x, scale, bias, eps=1e-5):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * _lead(scale, x.ndim) + _lead(bias, x.ndim)


def _mlp(p: BlockParams, x):
  h = jax.nn.gelu(x @ p.w_in + _lead(p.b_in, x.ndim))
  return h @ p.w_out + _lead(p.b_out, x.ndim)


def _logits(params: LMParams, x):
  return layer_norm(x, params.ln_scale, params.ln_bias) @ params.embed.T


def forward(params: LMParams, tokens, config: Config):
  """Logits (B, T, V) of every position of tokens (B, T): the full causal forward."""
  x = params.embed[tokens]
  for p in params.blocks:
    h = layer_norm(x, p.ln1_scale, p.ln1_bias)
    x = x + jax.vmap(lambda h: multi_head_attention(p.attention, h, is_causal=True,
                                                    rope=config.rope))(h)
    x = x + _mlp(p, layer_norm(x, p.ln2_scale, p.ln2_bias))
  return _logits(params, x)


def forward_cached(params: LMParams, tokens, caches, config: Config, seq_lengths=None):
  """Logits (B, T, V) of T new tokens per row, attending to and extending the caches.

  Row b's tokens sit at positions caches[0].lengths[b] + t; `seq_lengths`
  marks right padding of a ragged prefill.
  """
  x = params.embed[tokens]
  new_caches = []
  for p, cache in zip(params.blocks, caches):
    h = layer_norm(x, p.ln1_scale, p.ln1_bias)
    y, cache = multi_head_attention_decode(p.attention, h, cache,
                                           seq_lengths=seq_lengths, rope=config.rope)
    x = x + y
    x = x + _mlp(p, layer_norm(x, p.ln2_scale, p.ln2_bias))
    new_caches.append(cache)
  return _logits(params, x), tuple(new_caches)


# ---------------------------------------------------------------------------
# data and training


def sample_batch(key, batch: int, config: Config):
  """int32 (B, 2n + 2) sequences [BOS] a [SEP] a."""
  a = jax.random.randint(key, (batch, config.copy_length), 0, config.num_symbols)
  col = lambda v: jnp.full((batch, 1), v, jnp.int32)
  return jnp.concatenate([col(config.bos), a, col(config.sep), a], axis=1).astype(jnp.int32)


def loss_fn(params, seqs, config: Config):
  """Mean cross-entropy of the n copied tokens, each predicted from all before it."""
  logits = forward(params, seqs[:, :-1], config)
  targets = seqs[:, 1:]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  n = config.copy_length
  return jnp.mean(ce[:, -n:])


def make_optimizer(steps: int, learning_rate: float = 3e-3):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps=max(1, steps // 10), decay_steps=steps,
      end_value=learning_rate / 10)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


def train(config: Config = Config(), *, steps: int = 300, batch: int = 64, seed: int = 0,
          log_every: int = 50, log=print):
  """Trains from scratch; returns (params, losses) with one loss per step."""
  optimizer = make_optimizer(steps)

  @jax.jit
  def step(params, opt_state, key):
    seqs = sample_batch(key, batch, config)
    loss, grads = jax.value_and_grad(loss_fn)(params, seqs, config)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key_init, key_data = jax.random.split(jax.random.key(seed))
  params = init_params(key_init, config)
  opt_state = optimizer.init(params)
  losses = []
  t0 = time.perf_counter()
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key_data, i))
    if log is not None and (i % log_every == 0 or i == steps - 1):
      losses.append(float(loss))
      log(f"step {i:4d}  loss {float(loss):.4f}  ({time.perf_counter() - t0:.1f} s)")
    else:
      losses.append(loss)
  return params, [float(l) for l in losses]


# ---------------------------------------------------------------------------
# greedy generation


def ragged_prompts(key, batch: int, config: Config):
  """Prompts [BOS] a [SEP] a_1 .. a_{r_b}: (B, 2n + 2) tokens, lengths n + 2 + r_b, answers a."""
  seqs = np.asarray(sample_batch(key, batch, config))
  n = config.copy_length
  r = np.arange(batch) % n  # 0 .. n-1 answer tokens already given
  lengths = (n + 2 + r).astype(np.int32)
  prompts = np.where(np.arange(seqs.shape[1])[None, :] < lengths[:, None], seqs, 0)
  return prompts.astype(np.int32), lengths, seqs[:, n + 2:]


@functools.partial(jax.jit, static_argnames="config")
def _next_full(params, seqs, lengths, config: Config):
  """Greedy next token of each row from the full forward of the padded sequences."""
  logits = forward(params, seqs, config)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return jnp.argmax(last, axis=-1).astype(jnp.int32)


def greedy_full(params, prompts, lengths, config: Config, steps: int):
  """Greedy decoding with a full forward per token (no cache): (B, steps) tokens."""
  seqs = np.zeros((prompts.shape[0], config.seq_len + steps), np.int32)
  seqs[:, :prompts.shape[1]] = prompts
  lengths = np.array(lengths)
  out = []
  for _ in range(steps):
    tok = np.asarray(_next_full(params, jnp.asarray(seqs), jnp.asarray(lengths), config))
    seqs[np.arange(len(lengths)), lengths] = tok
    lengths += 1
    out.append(tok)
  return np.stack(out, axis=1)


def greedy_cached(params, prompts, lengths, config: Config, steps: int):
  """Greedy decoding with a KV cache: one ragged prefill, then one token per step."""
  B = prompts.shape[0]
  caches = tuple(
      decode.init_kv_cache(B, config.seq_len + steps, config.num_kv_heads, config.head_dim)
      for _ in range(config.num_layers))

  @jax.jit
  def prefill(params, tokens, lengths, caches):
    logits, caches = forward_cached(params, tokens, caches, config, seq_lengths=lengths)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return jnp.argmax(last, axis=-1).astype(jnp.int32), caches

  # The caches are donated: each step writes its token in place.
  @functools.partial(jax.jit, donate_argnums=(2,))
  def step(params, tokens, caches):
    logits, caches = forward_cached(params, tokens[:, None], caches, config)
    return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), caches

  tok, caches = prefill(params, jnp.asarray(prompts), jnp.asarray(lengths), caches)
  out = [tok]
  for _ in range(steps - 1):
    tok, caches = step(params, tok, caches)
    out.append(tok)
  return np.stack([np.asarray(t) for t in out], axis=1)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  config = Config()
  print(f"copy task: n={config.copy_length}, vocab {config.vocab}; model D={config.d_model}, "
        f"{config.num_layers} layers, {config.num_heads}/{config.num_kv_heads} heads (GQA), RoPE")
  t0 = time.perf_counter()
  params, losses = train(config, steps=a.steps, batch=a.batch, seed=a.seed)
  final = float(np.mean(losses[-10:]))
  print(f"trained {a.steps} steps in {time.perf_counter() - t0:.1f} s; loss {losses[0]:.3f} -> "
        f"{final:.4f} (mean of the last 10 steps; threshold {LOSS_THRESHOLD})")

  prompts, lengths, answers = ragged_prompts(jax.random.key(a.seed + 1), 16, config)
  steps = config.seq_len - int(lengths.min())  # enough to finish the shortest prompt
  full = greedy_full(params, prompts, lengths, config, steps)
  cached = greedy_cached(params, prompts, lengths, config, steps)
  same = bool(np.array_equal(full, cached))
  # Tokens that complete each row's copy: answers from position r_b on.
  n = config.copy_length
  r = lengths - (n + 2)
  correct = [np.array_equal(cached[b, :n - r[b]], answers[b, r[b]:]) for b in range(len(r))]
  print(f"greedy decoding of {len(r)} ragged prompts ({steps} tokens each): cached == full "
        f"forward token for token: {same}; copies right: {sum(correct)}/{len(correct)}")
  ok = same and final < LOSS_THRESHOLD
  print("OK" if ok else "FAILED")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())

"""The shape letters, defined once for the whole package.

Array names carry their shape after an underscore, letters joined by `x`: `x_BxQxD` is a
`[batch, queries, model dim]` array, `tokens_R` a vector of one entry per decoding row. Docstrings
write the same shapes as `[B, Q, D]`. Each letter means one thing everywhere:

  B  batch: examples in a batch
  S  source length (tokens of the source / encoder input)
  T  target length (target tokens; the tokens generated when decoding)
  Q  queries: the tokens one call computes (S, T, S + T in a decoder-only LM, 1 per decoding step)
  C  context slots: real-token keys a call attends to (a decoding cache's capacity), or a history
     of tokens already seen when decoding (C0: the prompt part of it)
  M  keys a query may attend to: P prefix slots + C real-token slots
  L  layers
  H  attention (query) heads
  N  key/value heads (N = H unless attention is grouped-query)
  G  queries per key/value head: H / N
  K  head dim
  P  prefix length: virtual tokens (a bank's longest prefix)
  J  prefixes in a prefix bank
  E  numbers one virtual token carries in all layers of a placement: 2 * L * H * K (keys and values)
  D  model dim (hidden size; embedding width)
  F  MLP width (the LM's feed-forward layer, or the prefix reparameterization MLP)
  V  vocabulary
  W  beams
  R  rows a decoding step sees: B * W (beam-major per example)

Letters written together without `x` are one flattened axis (`w_DxHK`: `[D, H * K]`). Matrices of a
checkpoint keep torch's `O` (out) and `I` (in) features, as `w_OxI`.
"""

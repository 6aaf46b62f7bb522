"""Adapters: what tfopt knows about models from other libraries, each in one module.

- `tfopt.adapters.keras_hub`: keras-hub transformer backbones and causal LMs for
  `tfopt.shrink` (whole blocks, feed-forward units, attention heads). keras-hub
  stays optional: the module imports it only when it is handed a keras-hub model.
- `tfopt.adapters.keras_hub_quantization`: quantization-aware forms of keras-hub's
  encoder layers (TransformerEncoder, ReversibleEmbedding, PositionEmbedding), which
  `tfopt.quantize_model` registers when it is handed a model holding keras-hub layers
  (a BertBackbone, a classifier on one): an int8 export is then full integer.
"""

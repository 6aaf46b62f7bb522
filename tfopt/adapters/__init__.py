"""Adapters: what tfopt knows about models from other libraries, each in one module.

- `tfopt.adapters.keras_hub`: keras-hub transformer backbones and causal LMs for
  `tfopt.shrink` (whole blocks, feed-forward units, attention heads). keras-hub
  stays optional: the module imports it only when it is handed a keras-hub model.
"""

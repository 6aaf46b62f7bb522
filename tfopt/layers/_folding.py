"""BatchNormalization folding for quantization-aware layers.

A BatchNormalization that follows a layer (with a linear activation) is
folded into it during QAT, so that the int8 kernel in the exported file is the
one that trained: the layer quantizes `kernel * gamma / sqrt(variance + eps)`
(scaled per output channel, along the axes its `tfopt.geometry` entry gives)
and adds the folded bias. The BN's weights live on the layer, named
`bn_gamma`, `bn_beta`, `bn_moving_mean`, `bn_moving_variance`.
"""

from keras import ops

from tfopt import _backend, _keras_internal

__all__ = ["BatchNormFolding"]


class BatchNormFolding:
    """The folded BatchNormalization of one layer.

    Args:
        layer: the tfopt layer it folds into.
        spec: the layer's `tfopt.geometry.WeightSpec` with `fold=True`.
        config: `{"epsilon", "center", "scale", "momentum"}` of the BatchNormalization.
    """

    def __init__(self, layer, spec, config):
        self.layer = layer
        self.spec = spec
        self.config = dict(config)

    @property
    def epsilon(self):
        return self.config.get("epsilon", 1e-3)

    @property
    def center(self):
        return self.config.get("center", True)

    @property
    def scale_trained(self):
        return self.config.get("scale", True)

    @property
    def momentum(self):
        return float(self.config.get("momentum", 0.99))

    def build(self):
        """Adds the BN's four weights to the layer (after the layer's own)."""
        layer = self.layer
        channels = (self.spec.channels(self.spec.variable(layer).shape),)
        layer.bn_gamma = layer.add_weight(name="bn_gamma", shape=channels, initializer="ones",
                                          trainable=self.scale_trained)
        layer.bn_beta = layer.add_weight(name="bn_beta", shape=channels, initializer="zeros",
                                         trainable=self.center)
        # Replica-local: every replica writes the same reduced moments to its own copy.
        local = _keras_internal.add_replica_local_weight
        layer.bn_moving_mean = local(layer, "bn_moving_mean", channels, "float32", "zeros", autocast=False)
        layer.bn_moving_variance = local(layer, "bn_moving_variance", channels, "float32", "ones", autocast=False)

    def variables(self):
        layer = self.layer
        return [("bn_gamma", layer.bn_gamma), ("bn_beta", layer.bn_beta),
                ("bn_moving_mean", layer.bn_moving_mean), ("bn_moving_variance", layer.bn_moving_variance)]

    def set_from(self, bn):
        """Copies the weights of a `keras.layers.BatchNormalization` (ones and
        zeros for a gamma or beta it does not have)."""
        layer = self.layer
        channels = layer.bn_moving_mean.shape
        layer.bn_gamma.assign(ops.convert_to_numpy(bn.gamma) if bn.scale else ops.ones(channels))
        layer.bn_beta.assign(ops.convert_to_numpy(bn.beta) if bn.center else ops.zeros(channels))
        layer.bn_moving_mean.assign(ops.convert_to_numpy(bn.moving_mean))
        layer.bn_moving_variance.assign(ops.convert_to_numpy(bn.moving_variance))

    # --- the folded values ---------------------------------------------------------------
    def channel_scale(self):
        """`gamma / sqrt(variance + epsilon)` per output channel."""
        layer = self.layer
        gamma = ops.convert_to_tensor(layer.bn_gamma) if self.scale_trained else 1.0
        return gamma / ops.sqrt(ops.convert_to_tensor(layer.bn_moving_variance) + self.epsilon)

    def folded_bias(self):
        layer = self.layer
        scale = self.channel_scale()
        bias = ops.convert_to_tensor(layer.bias) if getattr(layer, "bias", None) is not None else 0.0
        beta = ops.convert_to_tensor(layer.bn_beta) if self.center else 0.0
        return beta + (bias - ops.convert_to_tensor(layer.bn_moving_mean)) * scale

    def fold(self, kernel):
        """The kernel scaled per output channel."""
        return kernel * ops.reshape(self.channel_scale(), self.spec.channel_shape(kernel.shape))

    # --- training --------------------------------------------------------------------------
    def update_statistics(self, outputs, folded_bias, active):
        """Moves the statistics towards this batch's while `active` (a bool tensor).

        The statistics are those of the unfolded layer's output `z = conv(x, W) + b`.
        Since `outputs = conv(x, Q(W * s)) + folded_bias` with a per-channel
        scale `s`, they are estimated as `mean(outputs - folded_bias) / s + b`
        and `var(outputs) / s**2` (the quantization error of the kernel aside),
        so no second, float convolution runs. Batch moments are reduced over all
        replicas (as a synchronized BatchNormalization), so every replica holds
        the same statistics."""
        layer = self.layer
        y = ops.stop_gradient(ops.cast(outputs, "float32") - ops.cast(folded_bias, "float32"))
        y = ops.reshape(y, (-1, y.shape[-1]))
        count = ops.reshape(ops.cast(ops.shape(y)[0], "float32"), (1,))
        scale = ops.stop_gradient(ops.cast(self.channel_scale(), "float32"))
        bias = ops.cast(ops.convert_to_tensor(layer.bias), "float32") if getattr(layer, "bias", None) is not None else 0.0
        old_mean = ops.convert_to_tensor(layer.bn_moving_mean)
        old_var = ops.convert_to_tensor(layer.bn_moving_variance)
        momentum = self.momentum

        def apply(reduced):
            total, squares, n = reduced
            n = ops.reshape(n, ())
            mean_y = total / n
            var_y = ops.maximum(squares / n - ops.square(mean_y), 0.0)
            usable = ops.greater(ops.abs(scale), 1e-6)
            safe = ops.where(usable, scale, 1.0)
            if active is not None:
                usable = ops.logical_and(usable, active)
            new_mean = momentum * old_mean + (1.0 - momentum) * (mean_y / safe + bias)
            new_var = momentum * old_var + (1.0 - momentum) * (var_y / ops.square(safe))
            return [(layer.bn_moving_mean, ops.where(usable, new_mean, old_mean)),
                    (layer.bn_moving_variance, ops.where(usable, new_var, old_var))]

        # Summed over all replicas (as a synchronized BatchNormalization), with
        # every other statistic of the step in one collective.
        _backend.reduce_statistics([ops.sum(y, axis=0), ops.sum(ops.square(y), axis=0), count],
                                   ["sum", "sum", "sum"], apply)

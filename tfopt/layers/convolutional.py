"""tfopt twins of Keras's convolution layers (axes in `tfopt.geometry`).

Under quantization-aware training, the twins of 1-D and separable
convolutions compute in the form LiteRT runs in integer (`IntegerConv`):
a 1-D convolution as a 2-D one over a height of 1 (LiteRT has no 1-D
convolution; the converter's own expansion of a per-channel quantized kernel
fails to convert or to run), a 3-D one as a 2-D one over depth slices
(LiteRT's CONV_3D is float only), a separable one as its depthwise op, an
activation range, then its pointwise op (the two ops LiteRT runs). The float
result is the Keras layer's.
"""

import keras
from keras import ops

from tfopt import _backend, geometry
from tfopt.layers.base import twin

__all__ = [
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
]



class IntegerConv:
    """Mixin of the twins of convolutions whose quantization-aware forward pass
    takes LiteRT's integer form (module docstring). Their quantized kernels
    arrive in LiteRT's layout (`tfopt.geometry.WeightSpec.litert_layout`):
    `(1, k, ...)` for 1-D layers, `(kh, kw, kd * in, out)` for 3-D ones."""

    def integer_call(self, inputs, training=None, step=None, times=None):
        x, padding = inputs, self.padding
        if padding == "causal":
            x, padding = ops.pad(x, self._compute_causal_padding()), "valid"
        strides, dilation = tuple(self.strides), tuple(self.dilation_rate)
        one_d = self.rank == 1
        height = 1 if self.data_format == "channels_last" else 2
        if one_d:
            x, strides, dilation = ops.expand_dims(x, height), (1,) + strides, (1,) + dilation

        def kernel(value):  # the layer's kernel in the layout of `x`
            if one_d and len(value.shape) == 3:
                return geometry.expand_height(self, value)
            if self.rank == 3 and len(value.shape) == 5:
                return geometry.unroll_depth(self, value)
            return value

        conv = dict(padding=padding, data_format=self.data_format)
        if hasattr(self, "pointwise_kernel"):
            x = ops.depthwise_conv(x, kernel(self.depthwise_kernel), strides, dilation_rate=dilation, **conv)
            x = self.intermediate("depthwise", x, training, step, times)
            x = ops.conv(x, kernel(self.pointwise_kernel), 1, "valid", self.data_format)
        elif hasattr(self, "depth_multiplier"):
            x = ops.depthwise_conv(x, kernel(self.kernel), strides, dilation_rate=dilation, **conv)
        elif self.rank == 3:
            return self._depth_slices_call(x, kernel(self.kernel), strides, padding, dilation)
        else:
            x = _backend.conv(x, kernel(self.kernel), strides, padding, self.data_format, dilation)
        if one_d:
            x = ops.squeeze(x, height)
        return self._bias_activation(x, self.data_format == "channels_first")

    def _bias_activation(self, x, channels_first):
        if self.use_bias:
            x = x + ops.reshape(self.bias, (-1,) + (1,) * (len(x.shape) - 2) if channels_first else (-1,))
        return x if self.activation is None else self.activation(x)

    def _depth_slices_call(self, x, kernel, strides, padding, dilation):
        """A 3-D convolution (bias and activation included) as a 2-D one: the
        `kd` depth slices each output depth reads are stacked on the channel
        axis, output depths on the batch axis, with the kernel from
        `tfopt.geometry.unroll_depth`."""
        if len(kernel.shape) == 5:  # a grouped layer: no 2-D form
            x = ops.conv(x, kernel, strides, padding, self.data_format, dilation)
            return self._bias_activation(x, self.data_format == "channels_first")
        channels_first = self.data_format == "channels_first"
        if channels_first:
            x = ops.transpose(x, (0, 2, 3, 4, 1))
        kd, (sd, sh, sw), (dd, dh, dw) = self.kernel_size[0], strides, dilation
        depth = x.shape[1]
        if depth is None:
            raise ValueError(
                f"Layer '{self.name}' (Conv3D) under quantization-aware training needs a known input "
                f"depth (it runs as a 2-D convolution over depth slices). Received: input shape "
                f"{tuple(x.shape)}. Fix: give the model's Input a fixed depth.")
        span = (kd - 1) * dd + 1
        if padding == "same":
            out = -(-depth // sd)
            total = max((out - 1) * sd + span - depth, 0)
            x = ops.pad(x, ((0, 0), (total // 2, total - total // 2), (0, 0), (0, 0), (0, 0)))
            depth += total
        out = (depth - span) // sd + 1
        stop = (out - 1) * sd + 1
        x = ops.concatenate([x[:, j * dd : j * dd + stop : sd] for j in range(kd)], axis=-1)
        h, w, c = x.shape[2], x.shape[3], x.shape[4]
        y = _backend.conv(ops.reshape(x, (-1, h, w, c)), kernel, (sh, sw), padding, "channels_last", (dh, dw))
        # Bias and activation before the reshape, so that the converter fuses them into the convolution.
        y = self._bias_activation(y, False)
        y = ops.reshape(y, (-1, out) + tuple(y.shape[1:]))
        return ops.transpose(y, (0, 4, 1, 2, 3)) if channels_first else y


Conv1D = twin(keras.layers.Conv1D, module=__name__, mixin=IntegerConv)
Conv2D = twin(keras.layers.Conv2D, module=__name__, mixin=IntegerConv)
Conv3D = twin(keras.layers.Conv3D, module=__name__, mixin=IntegerConv)
Conv1DTranspose = twin(keras.layers.Conv1DTranspose, module=__name__)
Conv2DTranspose = twin(keras.layers.Conv2DTranspose, module=__name__)
Conv3DTranspose = twin(keras.layers.Conv3DTranspose, module=__name__)
DepthwiseConv1D = twin(keras.layers.DepthwiseConv1D, module=__name__, mixin=IntegerConv)
DepthwiseConv2D = twin(keras.layers.DepthwiseConv2D, module=__name__)
SeparableConv1D = twin(keras.layers.SeparableConv1D, module=__name__, mixin=IntegerConv)
SeparableConv2D = twin(keras.layers.SeparableConv2D, module=__name__, mixin=IntegerConv)
SeparableConv1D.INTERMEDIATE_RANGES = SeparableConv2D.INTERMEDIATE_RANGES = ("depthwise",)

Conv2D.__doc__ += """
    Example:
    >>> import keras, numpy as np, tfopt
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     tfopt.layers.Conv2D(4, (3, 3), activation="relu", pruning_schedule="baseline"),
    ...     keras.layers.Flatten(),
    ...     keras.layers.Dense(10),
    ... ])
    >>> model.compile("adam", "mse")
    >>> _ = model.fit(np.ones((4, 8, 8, 1)), np.ones((4, 10)), verbose=0)
    >>> round(float((model.layers[0].kernel.numpy() == 0).mean()), 2)
    0.5
"""

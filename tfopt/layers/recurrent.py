"""tfopt twins of Keras's recurrent layers: LSTM, GRU (pruning and
quantization-aware training), SimpleRNN (pruning).

Their `kernel` and `recurrent_kernel` (held by the layer's `cell`) are pruned,
each with its own mask (`kernel_mask`, `recurrent_kernel_mask`) and one
`pruning_step`; the `tfopt.geometry` entries say so.

Under `quantization_aware=`, LSTM and GRU compute the recurrence themselves,
unrolled, in the ops LiteRT runs an unrolled recurrent layer in (the form
`tfopt.export` converts, `tfopt/layers/litert_forms.py`), with a fake-quant op
on every tensor the converted graph holds, so that an int8 export without
`representative_data` is full-integer:

- the input projection `x @ kernel + bias` of every step at once (one int8
  FULLY_CONNECTED), a range of its own (`input_projection`);
- per step, the recurrent projection `h @ recurrent_kernel` (FULLY_CONNECTED),
  the gate pre-activations (ADD), the cell and candidate products (MUL, ADD),
  each with a range shared by all steps (`INTERMEDIATE_RANGES`);
- sigmoid and tanh outputs at the fixed ranges LiteRT's int8 LOGISTIC
  ([0, 255/256], scale 1/256) and TANH ([-1, 127/128], scale 1/128) produce;
- the hidden state `h` (the layer's output, every step) at the layer's output
  range.

Both kernels are fake-quantized per tensor (per-channel ranges on a
FULLY_CONNECTED weight make the converter fail). The first step starts from
zero state, so its recurrent terms are left out (no op on a constant zero).
A GRU's new state is `hh + z * (h - hh)` (Keras: `z * h + (1 - z) * hh`,
the same value): LiteRT has no integer op on the constant 1. A GRU with
`reset_after=True` adds the update and reset parts of its recurrent bias to
its input bias (the same sums, one constant fewer per step).

Not supported under `quantization_aware=` (refused with a message):
dropout, recurrent dropout, `stateful`, `return_state`, activations other
than "sigmoid" and "tanh", masks, an `initial_state`, binary and ternary
weights.
"""

import keras
from keras import ops

from tfopt import _state, quantizers
from tfopt.layers.base import twin
from tfopt.layers.quantize_activation import track_and_quantize, when_started

__all__ = ["LSTM", "GRU", "SimpleRNN"]

# LiteRT's int8 LOGISTIC and TANH write their outputs on fixed scales.
_FIXED_RANGES = {"sigmoid": (0.0, 255.0 / 256.0), "tanh": (-1.0, 127.0 / 128.0)}


def _activation_name(fn):
    name = keras.activations.serialize(fn)
    return name if isinstance(name, str) else getattr(fn, "__name__", repr(fn))


class QuantizedRecurrence:
    """Mixin of the LSTM and GRU twins: the quantization-aware forward pass
    (module docstring). Subclasses give `_steps(...)`."""

    #: `tfopt.quantize_model` keeps the layer's activations (it computes them itself).
    computes_own_activations = True

    def _check_quantizable(self, quantization_aware):
        where = f"Layer '{self.name}' ({type(self).__name__})"
        fix = (" Fix: leave `quantization_aware` off for this layer (with `tfopt.quantize_model`, "
               f"`overrides={{'{self.name}': None}}` keeps it float, with a range after it).")
        problems = []
        if self.dropout or self.recurrent_dropout:
            problems.append(f"dropout={self.dropout!r}, recurrent_dropout={self.recurrent_dropout!r} (expected 0: "
                            "the quantization-aware recurrence applies no dropout)")
        if self.stateful:
            problems.append("stateful=True (expected False)")
        if self.return_state:
            problems.append("return_state=True (expected False)")
        for argument in ("activation", "recurrent_activation"):
            name = _activation_name(getattr(self.cell, argument))
            if name not in _FIXED_RANGES:
                problems.append(f"{argument}={name!r} (expected 'sigmoid' or 'tanh', the activations LiteRT "
                                "runs in int8 on fixed ranges)")
        spec = self.weight_quant_spec
        if spec is not None and not quantizers.get_mode(spec.mode).converter_folds:
            problems.append(f"weight mode {spec.mode!r} (expected affine int8/int4/int2 weights)")
        if problems:
            raise ValueError(
                f"{where}: quantization_aware={quantization_aware!r} is not supported with "
                + "; ".join(problems) + "." + fix)

    # --- the quantization-aware forward pass -------------------------------------------
    def call(self, sequences, initial_state=None, mask=None, training=False):
        if self.output_quant_spec is None:
            return self.keras_class.call(self, sequences, initial_state=initial_state, mask=mask, training=training)
        if initial_state is not None or mask is not None:
            given = "an initial_state" if initial_state is not None else "a mask (from Masking or mask_zero=True)"
            raise ValueError(
                f"Layer '{self.name}' ({type(self).__name__}) got {given}, which its quantization-aware "
                "recurrence does not take (it starts from zero state and reads every step). Fix: leave "
                f"`quantization_aware` off for this layer (`overrides={{'{self.name}': None}}` in "
                "tfopt.quantize_model), or remove the mask.")
        step = ops.convert_to_tensor(self.output_range_updates)  # before this call's update
        times = self.quantization_times()
        x = ops.cast(sequences, "float32")
        count = x.shape[1]
        if count is None:
            raise ValueError(
                f"Layer '{self.name}' ({type(self).__name__}) got inputs of shape {tuple(sequences.shape)}; its "
                "quantization-aware recurrence is unrolled and needs a fixed number of steps. Fix: give the "
                "model's Input a fixed sequence length, e.g. keras.Input((steps, features)).")

        seen = {}  # range name -> the tensors it quantized in this call, every step

        def quantize(name, tensor):
            ranges = self._range_weights(name)
            out = when_started(step, times, lambda: quantizers.quantize_activation(
                tensor, ops.minimum(ops.convert_to_tensor(ranges[0]), 0.0),
                ops.maximum(ops.convert_to_tensor(ranges[1]), 1e-6), self.output_quant_spec), tensor)
            if training:  # the very first training batch passes through (it sets the range)
                out = ops.cond(ops.equal(ops.convert_to_tensor(ranges[2]), 0), lambda: tensor, lambda: out)
                seen.setdefault(name, []).append(tensor)
            return out

        def weight(value):
            return self._quantized_weight(value, step, times)

        def activation(fn, tensor):
            lo, hi = _FIXED_RANGES[_activation_name(fn)]
            out = fn(tensor)
            return when_started(step, times, lambda: quantizers.quantize_activation(
                out, ops.convert_to_tensor(lo), ops.convert_to_tensor(hi), self.output_quant_spec), out)

        # (With go_backwards, outputs are in the order of the steps, as Keras returns them.)
        outputs = self._steps(x, count, quantize, weight, activation)
        for name, tensors in seen.items():
            # One update per range from all the steps' extremes (updated per step, the
            # range would follow the first step's tensor and clip the later ones).
            extremes = ops.stack([ops.stop_gradient(f(t)) for t in tensors for f in (ops.min, ops.max)])
            track_and_quantize(extremes, self._range_weights(name), self.output_quant_spec, momentum=0.99,
                               update=True, times=times, step=step)
        result = ops.stack(outputs, axis=1) if self.return_sequences else outputs[-1]
        return ops.cast(result, self.compute_dtype)

    def _range_weights(self, name):
        if name == "output":
            return self.output_range_min, self.output_range_max, self.output_range_updates
        return self._intermediate_ranges[name]

    def _quantized_weight(self, value, step, times):
        """Per-tensor fake quantization (a FULLY_CONNECTED weight) of `value`."""
        w = ops.cast(ops.convert_to_tensor(value), "float32")
        spec = quantizers.QuantSpec(**{**self.weight_quant_spec.get_config(), "per_channel": False})
        return when_started(step, times, lambda: quantizers.quantize_weight(w, spec, -1), w)

    def _input_projection(self, x, kernel, bias, quantize):
        z = ops.einsum("btf,fg->btg", x, kernel)
        if bias is not None:
            z = z + bias
        return quantize("input_projection", z)

    def _order(self, count):
        return range(count - 1, -1, -1) if self.go_backwards else range(count)


class _LSTMSteps(QuantizedRecurrence):
    INTERMEDIATE_RANGES = ("input_projection", "recurrent_projection", "gates", "forget_cell", "input_cell", "cell")

    def _steps(self, x, count, quantize, weight, activation):
        cell = self.cell
        kernel, recurrent = weight(cell.kernel), weight(cell.recurrent_kernel)
        bias = ops.cast(cell.bias, "float32") if cell.use_bias else None
        projected = self._input_projection(x, kernel, bias, quantize)
        h = c = None
        outputs = []
        for t in self._order(count):
            z = projected[:, t]
            if h is not None:
                z = quantize("gates", z + quantize("recurrent_projection", ops.matmul(h, recurrent)))
            if c is None:
                # The zero cell needs no forget gate. (A SPLIT with an unused output
                # stayed float in some int8 files: slices, each used, convert to int8.)
                units = z.shape[-1] // 4
                z_i, z_c, z_o = z[:, :units], z[:, 2 * units:3 * units], z[:, 3 * units:]
            else:
                z_i, z_f, z_c, z_o = ops.split(z, 4, axis=-1)
            i = activation(cell.recurrent_activation, z_i)
            g = activation(cell.activation, z_c)
            o = activation(cell.recurrent_activation, z_o)
            if c is None:
                c = quantize("cell", i * g)
            else:
                f = activation(cell.recurrent_activation, z_f)
                c = quantize("cell", quantize("forget_cell", f * c) + quantize("input_cell", i * g))
            h = quantize("output", o * activation(cell.activation, c))
            outputs.append(h)
        return outputs


class _GRUSteps(QuantizedRecurrence):
    # (reset_after=True uses "reset_recurrent", reset_after=False "reset_state" and
    # "candidate_recurrent"; the other ranges keep their initial [-6, 6], unused.)
    INTERMEDIATE_RANGES = ("input_projection", "recurrent_projection", "gates", "candidate_preactivation",
                           "state_difference", "update", "first_update", "reset_recurrent", "reset_state",
                           "candidate_recurrent")

    def _steps(self, x, count, quantize, weight, activation):
        cell, units = self.cell, self.units
        kernel = weight(cell.kernel)
        bias = recurrent_bias = None
        if cell.use_bias:
            bias = ops.cast(cell.bias, "float32")
            if cell.reset_after:  # (2, 3 units): input bias, recurrent bias
                bias, recurrent_bias = bias[0], bias[1]
                # The update and reset parts of the recurrent bias add to the input projection.
                bias = bias + ops.concatenate([recurrent_bias[:2 * units], ops.zeros_like(recurrent_bias[2 * units:])])
                recurrent_bias = ops.concatenate(
                    [ops.zeros_like(recurrent_bias[:2 * units]), recurrent_bias[2 * units:]])
        if cell.reset_after:
            recurrent = weight(cell.recurrent_kernel)
        else:  # two products, two weights
            recurrent = weight(cell.recurrent_kernel[:, :2 * units])
            candidate_kernel = weight(cell.recurrent_kernel[:, 2 * units:])
        projected = self._input_projection(x, kernel, bias, quantize)
        h = None
        outputs = []
        for t in self._order(count):
            p = projected[:, t]
            x_zr, x_h = p[:, :2 * units], p[:, 2 * units:]
            if h is None:
                zr = x_zr
            else:
                r_all = ops.matmul(h, recurrent)
                if cell.reset_after and recurrent_bias is not None:
                    r_all = r_all + recurrent_bias
                r_all = quantize("recurrent_projection", r_all)
                zr = quantize("gates", x_zr + r_all[:, :2 * units])
            gates = activation(cell.recurrent_activation, zr)
            z, r = gates[:, :units], gates[:, units:]
            if cell.reset_after:
                if h is not None:
                    pre = x_h + quantize("reset_recurrent", r * r_all[:, 2 * units:])
                elif recurrent_bias is not None:  # zero state: the recurrent term is r * bias
                    pre = x_h + quantize("reset_recurrent", r * self._constant(recurrent_bias[2 * units:]))
                else:
                    pre = x_h
            elif h is not None:
                reset = quantize("reset_state", r * h)
                pre = x_h + quantize("candidate_recurrent", ops.matmul(reset, candidate_kernel))
            else:
                pre = x_h
            if pre is not x_h:
                pre = quantize("candidate_preactivation", pre)
            hh = activation(cell.activation, pre)
            if h is None:  # h = (1 - z) * hh
                h = quantize("output", hh - quantize("first_update", z * hh))
            else:  # h = z * h + (1 - z) * hh
                h = quantize("output", hh + quantize("update", z * quantize("state_difference", h - hh)))
            outputs.append(h)
        return outputs

    def _constant(self, value):
        """`value` behind a symmetric 8-bit fake quant of its own range (a
        constant gets quantization parameters only so), exact at its ends.
        In training the gradient is the identity (straight through): the
        range holds every value, and the fake quant's own gradient at the
        range's end (the largest value, a trained bias) is 0 or 1 as the
        float rounding of the range falls, TensorFlow and JAX differently."""
        m = ops.maximum(ops.max(ops.abs(value)), 1e-8)
        q = quantizers.fake_quant(value, -m, m, quantizers.QuantSpec(8, symmetric=True, narrow_range=True))
        if _state.exporting():
            return q  # the converter reads the FakeQuant op itself
        return ops.stop_gradient(q) + (value - ops.stop_gradient(value))


def _with_quantization(cls):
    """Gives a twin made by `twin(...)` the recurrent checks of `quantization_aware`:
    `Prunable` refuses weights held by a sublayer (the cell's); the recurrent
    twins read them in their own forward pass."""
    init = cls.__init__

    def __init__(self, *args, quantization_aware=None, folded_batch_norm=None, **kwargs):
        if folded_batch_norm is not None:
            raise ValueError(
                f"{cls.__name__}: `folded_batch_norm` is not supported for recurrent layers (received "
                f"folded_batch_norm={folded_batch_norm!r}). Fix: leave the BatchNormalization as a layer.")
        init(self, *args, **kwargs)
        self.quantization_aware = quantization_aware or None
        where = f"Layer '{self.name}' ({type(self).__name__}): `quantization_aware`"
        self.weight_quant_spec, self.output_quant_spec = (
            quantizers.get_training_precision(quantization_aware, where) if quantization_aware else (None, None))
        if quantization_aware:
            self._check_quantizable(quantization_aware)

    __init__.__signature__ = init.__signature__
    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__
    return cls


LSTM = _with_quantization(twin(keras.layers.LSTM, module=__name__, mixin=_LSTMSteps))
GRU = _with_quantization(twin(keras.layers.GRU, module=__name__, mixin=_GRUSteps))
SimpleRNN = twin(keras.layers.SimpleRNN, module=__name__)

LSTM.__doc__ += """
    Under `quantization_aware=`, computes the recurrence unrolled with ranges on
    every tensor LiteRT holds (see `tfopt/layers/recurrent.py`), for a
    full-integer int8 export without calibration data.

    Example:
    >>> import numpy as np, tfopt
    >>> layer = tfopt.layers.LSTM(4, pruning_schedule="baseline", name="lstm")
    >>> tuple(layer(np.ones((2, 5, 3), "float32")).shape)
    (2, 4)
    >>> [w.name for w in layer.weights if "mask" in w.name or "step" in w.name]
    ['kernel_mask', 'recurrent_kernel_mask', 'pruning_step']
    >>> qat = tfopt.layers.LSTM(4, quantization_aware="int8")
    >>> tuple(qat(np.ones((2, 5, 3), "float32"), training=True).shape)
    (2, 4)
"""

GRU.__doc__ += """
    Under `quantization_aware=`, computes the recurrence unrolled with ranges on
    every tensor LiteRT holds (see `tfopt/layers/recurrent.py`), for a
    full-integer int8 export without calibration data; both `reset_after` values.

    Example:
    >>> import numpy as np, tfopt
    >>> layer = tfopt.layers.GRU(4, quantization_aware="int8", return_sequences=True)
    >>> tuple(layer(np.ones((2, 5, 3), "float32"), training=True).shape)
    (2, 5, 4)
"""

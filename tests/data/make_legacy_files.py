"""Writes the `.keras` files that `tests/test_legacy_files.py` loads.

They were written once, by tfopt at commit ae227c0 (before the layout of
issue 10), and are kept as they are: a later tfopt must load them and give
the same outputs and the same tfopt state. Do not regenerate them with a
newer tfopt; add new files beside them instead.

    python tests/data/make_legacy_files.py
"""

import os

import keras
import numpy as np

import tfopt

HERE = os.path.dirname(os.path.abspath(__file__))


def _fit(model, x, y, steps=4):
    model.compile("adam", "mse")
    model.fit(x, y, batch_size=len(x) // steps, epochs=1, verbose=0)
    return model


def models():
    rng = np.random.default_rng(0)
    sched = tfopt.schedules.ConstantSparsity(0.5, begin_step=0, frequency=1)
    out = {}

    x = rng.standard_normal((16, 8, 8, 3)).astype("float32")
    layers = keras.Sequential([
        keras.Input((8, 8, 3)),
        tfopt.layers.Conv2D(4, 3, pruning_schedule=sched, name="conv"),
        tfopt.layers.DepthwiseConv2D(3, padding="same", pruning_schedule=sched, name="dw"),
        tfopt.layers.SeparableConv2D(4, 3, pruning_schedule=sched, structure="2:4", name="sep"),
        keras.layers.Flatten(),
        tfopt.layers.Dense(6, pruning_schedule=sched, structure=(1, 2), name="dense"),
    ], name="pruned_layers")
    out["pruned_layers"] = (_fit(layers, x, rng.standard_normal((16, 6)).astype("float32")), x)

    cnn = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Rescaling(1 / 255.0, offset=-0.5),
        keras.layers.Conv2D(4, 3, use_bias=False, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, name="head"),
    ], name="qat_cnn")
    pruned = tfopt.prune(cnn, sched, layers=["conv"])
    qat = tfopt.quantize_model(pruned, overrides={"head": "int4"})
    xq = (rng.uniform(0, 255, (16, 8, 8, 1))).astype("float32")
    out["qat_cnn"] = (_fit(qat, xq, rng.standard_normal((16, 3)).astype("float32")), xq)

    inputs = keras.Input((8, 8, 2), name="image")
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Activation("relu", name="act")(h)
    h = keras.layers.DepthwiseConv2D(3, use_bias=False, name="dw")(h)
    h = keras.layers.BatchNormalization(name="bn2")(h)
    h = keras.layers.Flatten()(h)
    folded = keras.Model(inputs, keras.layers.Dense(3, name="head")(h), name="folded")
    folded = tfopt.quantize_model(tfopt.prune(folded, sched, layers=["conv"]))
    xf = rng.standard_normal((16, 8, 8, 2)).astype("float32")
    out["folded"] = (_fit(folded, xf, rng.standard_normal((16, 3)).astype("float32")), xf)

    ids = rng.integers(0, 20, (16, 5)).astype("int32")
    emb = keras.Sequential([
        keras.Input((5,), dtype="int32"),
        tfopt.layers.Embedding(20, 8, pruning_schedule=sched, name="emb"),
        tfopt.layers.Conv1D(4, 2, pruning_schedule=sched, quantization_aware="int8", name="conv1d"),
        keras.layers.GlobalMaxPooling1D(),
        tfopt.layers.EinsumDense("ab,bc->ac", output_shape=2, quantization_aware="ternary", name="ein"),
    ], name="sequence")
    out["sequence"] = (_fit(emb, ids, rng.standard_normal((16, 2)).astype("float32")), ids)
    return out


def main():
    for name, (model, x) in models().items():
        model.save(os.path.join(HERE, f"legacy_{name}.keras"))
        state = {f"w{i}:{v.path}": np.asarray(v) for i, v in enumerate(model.weights)}
        np.savez(os.path.join(HERE, f"legacy_{name}.npz"), inputs=x, outputs=np.asarray(model(x)), **state)
        print(name, [v.path for v in model.weights])


if __name__ == "__main__":
    main()

"""keras-hub's BertBackbone through quantize_model -> fit -> int8 / int16x8 LiteRT.

A 2-layer `keras_hub.models.BertBackbone` built offline (vocabulary 64,
hidden 32, 2 heads, sequences of 16) with a 4-way classification head on its
pooled output, trained on a generated task (the class is the marker token
planted 4 times in a random sequence). keras-hub's TransformerEncoder and
PositionEmbedding are layers tfopt does not know, so `quantize_model` runs with
`unsupported="float"`; Dense/Embedding twins get QAT ranges. Exported as int8
from the QAT ranges alone, as int8 calibrated on 300 training sequences, and as
int16x8: float ops left, top-1 agreement with the Keras model on 400 test
sequences, file size. Needs the `hub` extra (`pip install 'tfopt[hub]'`).

Usage:
    python benchmarks/keras_hub_bert.py
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    import keras
    import keras_hub
    import numpy as np

    import tfopt
    from _common import table, write_section

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    vocabulary, steps = 64, 16
    backbone = keras_hub.models.BertBackbone(vocabulary_size=vocabulary, num_layers=2, num_heads=2, hidden_dim=32,
                                             intermediate_dim=64, max_sequence_length=steps)
    inputs = {k: keras.Input((steps,), dtype="int32", name=k) for k in ("token_ids", "segment_ids", "padding_mask")}
    model = keras.Model(inputs, keras.layers.Dense(4)(backbone(inputs)["pooled_output"]))

    def data(n):
        tokens, labels = rng.integers(4, vocabulary, (n, steps)), rng.integers(0, 4, n)
        for i in range(n):
            tokens[i, rng.choice(steps, 4, replace=False)] = labels[i]
        return {"token_ids": tokens.astype("int32"), "segment_ids": np.zeros((n, steps), "int32"),
                "padding_mask": np.ones((n, steps), "int32")}, labels

    (x_train, y_train), (x_test, y_test) = data(2000), data(400)
    qat = tfopt.quantize_model(model, "int8", unsupported="float")
    qat.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
    qat.fit(x_train, y_train, epochs=8, batch_size=64, verbose=0)
    accuracy = qat.evaluate(x_test, y_test, verbose=0)[1]
    order = [t.name for t in qat.inputs]
    rows = []
    for label, precision, calibrate in (("int8, QAT ranges", "int8", False), ("int8, calibrated", "int8", True),
                                        ("int16x8", "int16x8", True)):
        try:
            report = tfopt.export(qat, os.path.join(tempfile.mkdtemp(), "bert.tflite"),
                                  inputs=[x_test[k] for k in order], precision=precision,
                                  representative_data=[x_train[k][:300] for k in order] if calibrate else None)
            rows.append({"file": label, "float ops left": ", ".join(sorted(set(report.float_ops))) or "none",
                         "agreement with Keras": f"{report.top1_agreement:.1%}", "bytes": f"{report.size_bytes:,}"})
        except Exception as e:  # noqa: BLE001 (reported in the table)
            rows.append({"file": label, "float ops left": f"fails: {type(e).__name__}: {' '.join(str(e).split())[:120]}",
                         "agreement with Keras": "", "bytes": ""})
    body = table(rows, list(rows[0])) + (
        f"\n\nKeras QAT accuracy {accuracy:.1%} on the generated task. keras-hub's TransformerEncoder holds its "
        "own LayerNormalization sublayers, which export does not rebuild, so their NEG op stays float in the "
        "calibrated int8 file.")
    print(body)
    write_section("keras-hub-bert", "int8: keras-hub BertBackbone", "python benchmarks/keras_hub_bert.py", body)


if __name__ == "__main__":
    main()

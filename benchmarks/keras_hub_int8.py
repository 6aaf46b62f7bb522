"""keras-hub models through quantize_model -> fit -> int8 / int16x8 LiteRT files.

Two models built offline from configs (nothing downloaded), on generated tasks:

- a 2-layer `keras_hub.models.BertBackbone` (vocabulary 64, hidden 32, 2 heads,
  sequences of 16) with a 4-way head on its pooled output; the class is the
  marker token planted 4 times in a random sequence;
- a 2-layer `keras_hub.models.GPT2CausalLM` (vocabulary 64, hidden 64, 4 heads,
  sequences of 32) on token chains: each token is the image of the one before
  under a fixed permutation, except that 10% of them are random.

`tfopt.quantize_model(model, "int8")` (every block quantization-aware, nothing
left to `unsupported="float"`), 8 epochs of QAT, then LiteRT files: float32 (of
the stripped model), int8 from the QAT ranges alone, int8 calibrated on 300
training sequences, int16x8 (calibrated). Columns: float ops left, top-1
agreement with the Keras QAT model on the test set (per position for the
language model), file size and ratio to float32, interpreter latency at batch
1 (one thread, medians of 5 interleaved rounds of 50 runs). Needs the `hub`
extra (`pip install 'tfopt[hub]'`).

Usage:
    python benchmarks/keras_hub_int8.py
"""

import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROUNDS = 5


def _bert(rng):
    import keras
    import keras_hub
    import numpy as np

    vocabulary, steps = 64, 16
    backbone = keras_hub.models.BertBackbone(vocabulary_size=vocabulary, num_layers=2, num_heads=2, hidden_dim=32,
                                             intermediate_dim=64, max_sequence_length=steps)
    model = keras.Model(backbone.input, keras.layers.Dense(4)(backbone.output["pooled_output"]))

    def data(n):
        tokens, labels = rng.integers(4, vocabulary, (n, steps)), rng.integers(0, 4, n)
        for i in range(n):
            tokens[i, rng.choice(steps, 4, replace=False)] = labels[i]
        return {"token_ids": tokens.astype("int32"), "segment_ids": np.zeros((n, steps), "int32"),
                "padding_mask": np.ones((n, steps), "int32")}, labels.astype("int32")

    return model, data(2000), data(400)


def _gpt2(rng):
    import keras_hub
    import numpy as np

    vocabulary, steps = 64, 32
    model = keras_hub.models.GPT2CausalLM(keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary, num_layers=2, num_heads=4, hidden_dim=64, intermediate_dim=128,
        max_sequence_length=steps))
    permutation = np.random.default_rng(1).permutation(vocabulary)

    def data(n):
        tokens = np.zeros((n, steps + 1), "int32")
        tokens[:, 0] = rng.integers(0, vocabulary, n)
        for i in range(steps):
            noise = rng.random(n) < 0.1
            tokens[:, i + 1] = np.where(noise, rng.integers(0, vocabulary, n), permutation[tokens[:, i]])
        return {"token_ids": tokens[:, :-1], "padding_mask": np.ones((n, steps), "int32")}, tokens[:, 1:]

    return model, data(2000), data(200)


def _case(name, build, rng, out):
    import keras

    import tfopt
    from tfopt.litert import litert_latency_ms

    model, (x_train, y_train), (x_test, y_test) = build(rng)
    qat = tfopt.quantize_model(model, "int8")
    qat.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
    qat.fit(x_train, y_train, epochs=8, batch_size=64, verbose=0)
    accuracy = qat.evaluate(x_test, y_test, verbose=0)[1]
    order = [t.name for t in qat.inputs]
    files, rows = {}, []
    for label, precision, calibrate in (("float32", "float32", False), ("int8, QAT ranges", "int8", False),
                                        ("int8, calibrated", "int8", True), ("int16x8", "int16x8", True)):
        exported = tfopt.strip(qat) if precision == "float32" else qat
        try:
            report = tfopt.export(exported, os.path.join(out, f"{name}-{len(files)}.tflite"),
                                  inputs=[x_test[k] for k in order], precision=precision,
                                  representative_data=[x_train[k][:300] for k in order] if calibrate else None)
        except Exception as e:  # noqa: BLE001 (reported in the table)
            rows.append({"model": name, "file": label, "float ops left": f"fails: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:120]}"})
            continue
        with open(report.path, "rb") as f:
            files[label] = f.read()
        rows.append({"model": name, "file": label, "float ops left": (", ".join(sorted(set(report.float_ops)))
                                                                      or "none") if precision != "float32" else "",
                     "agreement with Keras": f"{report.top1_agreement:.1%}", "bytes": len(files[label])})
    first = [x_test[k][:1] for k in order]
    times = {label: [] for label in files}
    for _ in range(ROUNDS):
        for label, content in files.items():
            times[label].append(litert_latency_ms(content, first))
    for row in rows:
        if row["file"] in files:
            size, ms = row["bytes"] / len(files["float32"]), statistics.median(times[row["file"]])
            row.update({"bytes": f"{row['bytes']:,}", "size vs float": f"{size:.2f}x", "ms": f"{ms:.3f}",
                        "latency vs float": f"{ms / statistics.median(times['float32']):.2f}x"})
    return rows, accuracy


def main():
    import keras
    import numpy as np

    from _common import table, write_section

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    out = tempfile.mkdtemp()
    rows, notes = [], []
    for name, build in (("BertBackbone classifier", _bert), ("GPT2CausalLM", _gpt2)):
        case_rows, accuracy = _case(name, build, rng, out)
        rows += case_rows
        notes.append(f"{name}: Keras QAT accuracy {accuracy:.1%}")
    columns = ["model", "file", "float ops left", "agreement with Keras", "bytes", "size vs float", "ms",
               "latency vs float"]
    body = (__doc__.split("Usage:")[0].strip().split("\n\n", 1)[1] + "\n\n"
            + table([{c: row.get(c, "") for c in columns} for row in rows], columns)
            + "\n\n" + "; ".join(notes) + ".")
    print(body)
    write_section("keras-hub-int8", "int8: keras-hub BERT and GPT-2 through quantize_model",
                  "python benchmarks/keras_hub_int8.py", body)


if __name__ == "__main__":
    main()
